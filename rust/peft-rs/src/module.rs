//! [`AdaptedModule`]: one targeted module of a model. It owns the base layer once and holds any
//! number of named adapters (of any methods), the ordered list of active adapters and the stack
//! of merged ones, as PEFT's `BaseTunerLayer` does.
//!
//! Semantics follow PEFT's layers (`tuners_utils.py`), with two defects of PEFT fixed:
//! - The forward is the composition of the active adapters in order: the last active adapter
//!   wraps the ones before it, each wrapping the base layer ([`LayerAdapter::forward`]). For
//!   additive methods this is PEFT's sum, for IA³ its product, for BOFT its combined rotation.
//!   For OFT with several active adapters PEFT rotates the input by the first adapter first,
//!   which disagrees with PEFT's own merge of the same adapters; here the forward equals the
//!   merge in every case.
//! - With some adapters merged, PEFT's forward is the base layer alone and drops the active
//!   adapters that are not merged; here they are still applied on top of the merged weight.
//!
//! Disabling unmerges eagerly (PEFT does it lazily, at the first forward while disabled, with
//! the same end state).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Tensor;

use crate::base::BaseLayer;
use crate::error::{PeftError, Result};
use crate::kernels::linear::Extras;
use crate::merge::{apply_rule, apply_rule_in_place, check_finite, undo_rule};
use crate::method::{LayerAdapter, MergeRule, MethodConfig, ParamSource};
use crate::params::no_grad;
use crate::rng::DropoutRng;

/// An adapter merged into the base weight, with what its unmerge needs besides its tensors.
#[derive(Debug)]
struct MergedAdapter {
    name: String,
    /// What unmerging needs besides the adapter's tensors (DoRA's weight norm at merge time,
    /// the weights a module copy replaced).
    cache: Vec<Tensor>,
}

/// What [`AdaptedModule::merge`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    /// Adapters merged by this call, in order.
    pub merged: Vec<String>,
    /// Requested adapters that were merged already (PEFT warns and skips them).
    pub already_merged: Vec<String>,
}

#[derive(Debug)]
pub struct AdaptedModule {
    name: String,
    base: BaseLayer,
    /// In insertion order.
    adapters: Vec<(String, Box<dyn LayerAdapter>)>,
    active: Vec<String>,
    merged: Vec<MergedAdapter>,
    disabled: bool,
    training: bool,
    /// Where training-time dropout draws from; a model shares one stream across its modules.
    rng: Arc<DropoutRng>,
}

impl AdaptedModule {
    /// `name` is the module's path in its model (`"encoder.layer.0.attention.self.query"`); it
    /// selects per-module settings (`rank_pattern`, IA³'s `feedforward_modules`).
    pub fn new(name: &str, base: BaseLayer) -> Self {
        Self {
            name: name.to_string(),
            base,
            adapters: Vec::new(),
            active: Vec::new(),
            merged: Vec::new(),
            disabled: false,
            training: false,
            rng: Arc::new(DropoutRng::new(0)),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn base(&self) -> &BaseLayer {
        &self.base
    }

    /// Builds an adapter of `config`'s method for this module and adds it (see
    /// [`AdaptedModule::insert`]).
    pub fn add(
        &mut self,
        adapter_name: &str,
        config: &dyn MethodConfig,
        source: ParamSource,
        shared: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        self.check_new_name(adapter_name)?;
        config.validate()?;
        let adapter = config.build(&self.name, &self.base, source, shared)?;
        self.insert(adapter_name, adapter)
    }

    /// Adds an adapter built elsewhere. As in PEFT, a module's first adapter is active and later
    /// ones are added inactive.
    pub fn insert(&mut self, adapter_name: &str, adapter: Box<dyn LayerAdapter>) -> Result<()> {
        self.check_new_name(adapter_name)?;
        if self.adapters.is_empty() {
            self.active = vec![adapter_name.to_string()];
        }
        self.adapters.push((adapter_name.to_string(), adapter));
        Ok(())
    }

    fn check_new_name(&self, adapter_name: &str) -> Result<()> {
        if self.get(adapter_name).is_some() {
            return Err(PeftError::InvalidOperation(format!(
                "`{}`: an adapter named {adapter_name:?} already exists",
                self.name
            )));
        }
        Ok(())
    }

    /// Names of every adapter, in insertion order.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.iter().map(|(n, _)| n.as_str()).collect()
    }

    pub fn get(&self, adapter_name: &str) -> Option<&dyn LayerAdapter> {
        self.adapters
            .iter()
            .find(|(n, _)| n == adapter_name)
            .map(|(_, a)| a.as_ref())
    }

    pub fn get_mut(&mut self, adapter_name: &str) -> Option<&mut Box<dyn LayerAdapter>> {
        self.adapters
            .iter_mut()
            .find(|(n, _)| n == adapter_name)
            .map(|(_, a)| a)
    }

    /// The adapter named `adapter_name`, or an error listing the known names.
    pub fn adapter(&self, adapter_name: &str) -> Result<&dyn LayerAdapter> {
        self.get(adapter_name)
            .ok_or_else(|| self.unknown(adapter_name))
    }

    fn unknown(&self, adapter_name: &str) -> PeftError {
        PeftError::MissingKey {
            key: adapter_name.to_string(),
            context: format!(
                "no adapter of that name on `{}`; its adapters are {:?}",
                self.name,
                self.adapter_names()
            ),
        }
    }

    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// Activates these adapters, in this order (several combine, see the module docs). Unknown
    /// names are an error listing the known ones. As in PEFT, a change of the active adapters
    /// unmerges merged adapters first; returns those unmerged.
    pub fn set_active(&mut self, names: &[&str]) -> Result<Vec<String>> {
        for name in names {
            self.adapter(name)?;
        }
        if self
            .active
            .iter()
            .map(String::as_str)
            .eq(names.iter().copied())
        {
            return Ok(Vec::new());
        }
        let unmerged = self.unmerge()?;
        self.active = names.iter().map(|n| n.to_string()).collect();
        Ok(unmerged)
    }

    /// Names of the merged adapters, in merge order.
    pub fn merged_adapters(&self) -> Vec<&str> {
        self.merged.iter().map(|m| m.name.as_str()).collect()
    }

    pub fn is_merged(&self) -> bool {
        !self.merged.is_empty()
    }

    /// Removes an adapter. A merged adapter must be unmerged first. If it was active, the other
    /// active adapters stay active; if none is left, the alphabetically first remaining adapter
    /// becomes active (PEFT's rule).
    pub fn delete(&mut self, adapter_name: &str) -> Result<()> {
        self.adapter(adapter_name)?;
        if self.merged.iter().any(|m| m.name == adapter_name) {
            return Err(PeftError::InvalidOperation(format!(
                "`{}`: cannot delete adapter {adapter_name:?} while it is merged; unmerge first",
                self.name
            )));
        }
        self.adapters.retain(|(n, _)| n != adapter_name);
        if self.active.iter().any(|n| n == adapter_name) {
            self.active.retain(|n| n != adapter_name);
            if self.active.is_empty() {
                let mut remaining = self.adapter_names();
                remaining.sort();
                self.active = remaining
                    .first()
                    .map(|n| n.to_string())
                    .into_iter()
                    .collect();
            }
        }
        Ok(())
    }

    /// Disabling makes the forward the base layer's alone; merged adapters are unmerged (PEFT
    /// does so at the first forward while disabled). Returns the adapters unmerged.
    pub fn enable_adapters(&mut self, enabled: bool) -> Result<Vec<String>> {
        let unmerged = if enabled { Vec::new() } else { self.unmerge()? };
        self.disabled = !enabled;
        Ok(unmerged)
    }

    /// Replaces the base weight (same shape) while nothing is merged: a checkpoint's own copy of
    /// it, such as the embedding weights PEFT saves with adapters on embedding layers.
    pub fn replace_base_weight(&mut self, weight: Tensor) -> Result<()> {
        if self.is_merged() {
            return Err(PeftError::InvalidOperation(format!(
                "`{}`: cannot replace the base weight while adapters are merged",
                self.name
            )));
        }
        let bias = self.base.bias().cloned();
        self.base.set_weights(weight, bias, false)
    }

    /// Removes every adapter, keeping the base weight as it is (with merged adapters folded in):
    /// PEFT's `unload`, and `merge_and_unload` after a merge.
    pub fn unload(&mut self) {
        self.adapters.clear();
        self.active.clear();
        self.merged.clear();
        self.disabled = false;
    }

    pub fn adapters_enabled(&self) -> bool {
        !self.disabled
    }

    /// Training mode turns on dropout and the methods' other training-only behaviour.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    /// The random stream training-time dropout draws from.
    pub fn set_dropout_rng(&mut self, rng: Arc<DropoutRng>) {
        self.rng = rng;
    }

    /// The layer's output: the base layer with every active adapter that is not merged applied.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.disabled {
            return self.base.forward(x);
        }
        let stack: Vec<&dyn LayerAdapter> = self
            .active
            .iter()
            .filter(|n| !self.merged.iter().any(|m| &m.name == *n))
            .filter_map(|n| self.get(n))
            .collect();
        self.below(&stack).forward(x)
    }

    /// Gradients of `sum(forward(x) · grad_output)`: with respect to `x` (`None` for integer
    /// inputs such as token ids) and to each tensor of the active adapters (`"<adapter>.<name>"`;
    /// frozen tensors get none). The adapters' tensors become trainable variables.
    #[allow(clippy::type_complexity)]
    pub fn gradients(
        &mut self,
        x: &Tensor,
        grad_output: &Tensor,
    ) -> Result<(Option<Tensor>, Vec<(String, Tensor)>)> {
        let mut vars = Vec::new();
        for name in self.active.clone() {
            if let Some(adapter) = self.get_mut(&name) {
                let params = adapter.params_mut();
                for (tensor, var) in params.vars()? {
                    if !params.is_tensor_frozen(&tensor) {
                        vars.push((format!("{name}.{tensor}"), var));
                    }
                }
            }
        }
        let input = if x.dtype().is_float() {
            Some(candle_core::Var::from_tensor(x)?)
        } else {
            None
        };
        let y = self.forward(input.as_ref().map_or(x, |v| v.as_tensor()))?;
        if y.dims() != grad_output.dims() {
            return Err(PeftError::shape(
                "grad_output",
                y.dims(),
                grad_output.dims(),
            ));
        }
        let objective = y
            .to_dtype(candle_core::DType::F32)?
            .mul(&grad_output.to_dtype(candle_core::DType::F32)?)?
            .sum_all()?;
        let grads = objective.backward()?;
        let grad_x = match &input {
            Some(v) => Some(match grads.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.zeros_like()?,
            }),
            None => None,
        };
        let named = vars
            .into_iter()
            .filter_map(|(name, var)| grads.get(var.as_tensor()).map(|g| (name, g.clone())))
            .collect();
        Ok((grad_x, named))
    }

    /// A mixed batch: row `i` of `x` (dimension 0) goes through `row_adapters[i]` alone, exactly
    /// as a batch of that adapter alone would (`"__base__"`, or an adapter this module does not
    /// hold: the base layer). Works for every method, since each group of rows runs the module's
    /// own forward with one adapter active. Merged adapters make it an error (as in PEFT).
    pub fn forward_rows(&self, x: &Tensor, row_adapters: &[String]) -> Result<Tensor> {
        let rows = x.dim(0)?;
        if row_adapters.len() != rows {
            return Err(PeftError::InvalidOperation(format!(
                "Length of `adapter_names` should be the same as the number of inputs, but got {} and {rows} respectively.",
                row_adapters.len()
            )));
        }
        if self.is_merged() {
            return Err(PeftError::InvalidOperation(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first.".into(),
            ));
        }
        if self.training {
            return Err(PeftError::InvalidOperation(
                "Cannot pass `adapter_names` when the model is in training mode.".into(),
            ));
        }
        if self.disabled {
            return self.base.forward(x);
        }
        // Rows grouped by adapter, in first-seen order; `order` lists the rows group by group.
        let mut groups: Vec<(&str, Vec<u32>)> = Vec::new();
        for (row, name) in row_adapters.iter().enumerate() {
            match groups.iter_mut().find(|(n, _)| n == name) {
                Some((_, idx)) => idx.push(row as u32),
                None => groups.push((name, vec![row as u32])),
            }
        }
        if let [(name, _)] = groups.as_slice() {
            return self.forward_with_only(x, name);
        }
        if groups.iter().all(|(name, _)| self.get(name).is_none()) {
            // None of these adapters is on this module: every row is the base layer's.
            return self.base.forward(x);
        }
        // The base output of every row, computed once when a group can use it.
        let mut base_out: Option<Tensor> = None;
        let mut outputs = Vec::with_capacity(groups.len());
        let mut order = Vec::with_capacity(rows);
        for (name, idx) in &groups {
            let idx_t = Tensor::new(idx.as_slice(), x.device())?;
            let x_rows = x.index_select(&idx_t, 0)?;
            let adapter = self.get(name);
            let term = match adapter {
                Some(a) => a.additive_term(&x_rows, &self.base)?,
                None => None,
            };
            let out = match (adapter, term) {
                (Some(a), None) => self.below(&[a]).forward(&x_rows)?,
                (_, term) => {
                    if base_out.is_none() {
                        base_out = Some(self.base.forward(x)?);
                    }
                    let base_rows = base_out
                        .as_ref()
                        .expect("computed above")
                        .index_select(&idx_t, 0)?;
                    match term {
                        Some(t) => base_rows
                            .to_dtype(t.dtype())?
                            .add(&t)?
                            .to_dtype(base_rows.dtype())?,
                        None => base_rows,
                    }
                }
            };
            outputs.push(out);
            order.extend_from_slice(idx);
        }
        let mut inverse = vec![0u32; rows];
        for (position, row) in order.iter().enumerate() {
            inverse[*row as usize] = position as u32;
        }
        let stacked = Tensor::cat(&outputs, 0)?;
        Ok(stacked.index_select(&Tensor::new(inverse.as_slice(), x.device())?, 0)?)
    }

    /// The forward with only `name` active (the base layer for `"__base__"` or a name this module
    /// does not hold).
    fn forward_with_only(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        match self.get(name) {
            Some(adapter) => self.below(&[adapter]).forward(x),
            None => self.base.forward(x),
        }
    }

    fn below<'a>(&'a self, adapters: &'a [&'a dyn LayerAdapter]) -> Below<'a> {
        Below {
            base: &self.base,
            adapters,
            training: self.training,
            rng: &self.rng,
        }
    }

    /// Folds adapters into the base weight: `names`, or the active adapters when `None`, in
    /// order. Adapters merged already are skipped (reported in the outcome, as PEFT warns);
    /// names that are not on this module are skipped too, since a model merges by name across
    /// modules that hold different adapters. With `safe_merge` each new weight is checked for
    /// NaN/inf before it is written, so a failing merge leaves the weights as they were.
    pub fn merge(&mut self, names: Option<&[&str]>, safe_merge: bool) -> Result<MergeOutcome> {
        // Merged weights are plain tensors: no autograd graph back to trained adapters.
        no_grad(|| self.fold_in(names, safe_merge))
    }

    fn fold_in(&mut self, names: Option<&[&str]>, safe_merge: bool) -> Result<MergeOutcome> {
        let names: Vec<String> = match names {
            Some(n) => n.iter().map(|s| s.to_string()).collect(),
            None => self.active.clone(),
        };
        let mut outcome = MergeOutcome::default();
        for name in names {
            if self.merged.iter().any(|m| m.name == name) {
                outcome.already_merged.push(name);
                continue;
            }
            let Some(adapter) = self.get(&name) else {
                continue;
            };
            let rule = adapter.merge_rule(&self.base)?;
            let weight = self.base.dense_weight()?;
            // In place where it can (PEFT merges in place too); safe_merge checks a copy first.
            let in_place = if safe_merge || !self.base.owns_weight() {
                None
            } else {
                apply_rule_in_place(&self.base, &rule, &weight, self.base.bias(), false)?
            };
            let (weight, bias, cache) = match in_place {
                Some(bias) => (weight, bias, Vec::new()),
                None => apply_rule(&self.base, &rule, &weight, self.base.bias())?,
            };
            if safe_merge {
                let what = format!("{} (adapter {name:?})", self.name);
                check_finite(&what, &weight)?;
                if let Some(b) = &bias {
                    check_finite(&what, b)?;
                }
            }
            // A fresh tensor, or this layer's own written in place.
            self.base.set_weights(weight, bias, true)?;
            self.merged.push(MergedAdapter {
                name: name.clone(),
                cache,
            });
            outcome.merged.push(name);
        }
        Ok(outcome)
    }

    /// Undoes every merge, last merged first, with the adapters' current tensors (as PEFT).
    /// Returns the adapters unmerged, in that order (empty: nothing was merged).
    pub fn unmerge(&mut self) -> Result<Vec<String>> {
        no_grad(|| self.fold_out())
    }

    fn fold_out(&mut self) -> Result<Vec<String>> {
        let mut done = Vec::new();
        while let Some(top) = self.merged.last() {
            let adapter = self.adapter(&top.name)?;
            let rule = adapter.merge_rule(&self.base)?;
            let weight = self.base.dense_weight()?;
            let bias = self.base.bias();
            let in_place = if self.base.owns_weight() {
                apply_rule_in_place(&self.base, &rule, &weight, bias, true)?
            } else {
                None
            };
            // Undoing a replacement restores the weight kept at merge, which may be lent.
            let owned = !matches!(rule, MergeRule::Replace { .. });
            let (weight, bias) = match in_place {
                Some(bias) => (weight, bias),
                None => undo_rule(&self.base, &rule, &weight, bias, &top.cache)?,
            };
            self.base.set_weights(weight, bias, owned)?;
            let top = self.merged.pop().expect("checked above");
            done.push(top.name);
        }
        Ok(done)
    }

    /// The weight and bias [`AdaptedModule::merge`] would write for these names: the current
    /// weight with those not merged yet folded in, in order; nothing is written.
    pub fn merged_weights(&self, names: &[&str]) -> Result<(Tensor, Option<Tensor>)> {
        no_grad(|| self.fold_in_copy(names))
    }

    fn fold_in_copy(&self, names: &[&str]) -> Result<(Tensor, Option<Tensor>)> {
        let adapters = names
            .iter()
            .filter(|n| !self.merged.iter().any(|m| m.name == **n))
            .map(|n| self.adapter(n))
            .collect::<Result<Vec<_>>>()?;
        self.below(&adapters).weights()
    }
}

/// The layer beneath an adapter: the base layer with the adapters below it in the active order.
/// A method's forward calls [`Below::forward`] where PEFT calls the base layer; the few methods
/// whose forward needs a weight (DoRA's norm, BOFT on Conv2d) ask [`Below::weights`].
pub struct Below<'a> {
    base: &'a BaseLayer,
    adapters: &'a [&'a dyn LayerAdapter],
    training: bool,
    rng: &'a DropoutRng,
}

impl Below<'_> {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.adapters.split_last() {
            None => self.base.forward(x),
            Some((top, rest)) => top.forward(
                x,
                &Below {
                    base: self.base,
                    adapters: rest,
                    training: self.training,
                    rng: self.rng,
                },
            ),
        }
    }

    /// The weight and bias equal to this layer (base with these adapters merged in order).
    pub fn weights(&self) -> Result<(Tensor, Option<Tensor>)> {
        let mut weight = self.base.weight()?;
        let mut bias = self.base.bias().cloned();
        for adapter in self.adapters {
            let rule = adapter.merge_rule(self.base)?;
            let (w, b, _) = apply_rule(self.base, &rule, &weight, bias.as_ref())?;
            (weight, bias) = (w, b);
        }
        Ok((weight, bias))
    }

    /// The base layer and an adapter's `extras` computed in one pass on the CPU (see
    /// `kernels::linear`), when nothing lies between the adapter and the base and its dropout
    /// (probability `dropout`) draws nothing; `None` otherwise, or where that kernel does not
    /// apply: the adapter then runs its plain path. `extras` is built only when it is used.
    pub(crate) fn fused(
        &self,
        x: &Tensor,
        dropout: f64,
        extras: impl FnOnce() -> Result<Extras>,
    ) -> Result<Option<Tensor>> {
        if !self.adapters.is_empty() || (self.training && dropout > 0.0) {
            return Ok(None);
        }
        self.base.forward_fused(x, &extras()?)
    }

    /// The module's base layer (its kind, shapes and hyper-parameters).
    pub fn base(&self) -> &BaseLayer {
        self.base
    }

    /// Whether nothing lies between this adapter and the base layer.
    pub fn is_base(&self) -> bool {
        self.adapters.is_empty()
    }

    pub fn training(&self) -> bool {
        self.training
    }

    /// The training stream, in training mode only (what the methods' dropouts draw from).
    pub fn training_rng(&self) -> Option<&DropoutRng> {
        self.training.then_some(self.rng)
    }

    /// Inverted dropout of `x` with probability `p` in training (`torch.nn.Dropout`: kept values
    /// scaled by `1/(1-p)`); `x` itself otherwise.
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        if !self.training || p == 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - p) as f32;
        let mask: Vec<f32> = self
            .rng
            .uniform(x.elem_count())
            .into_iter()
            .map(|u| if u >= p as f32 { keep } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.mul(&mask)?)
    }
}
