//! [`PeftModel`]: a model with named adapters, by PEFT's names and semantics. It is a thin walk
//! over the model's [`Layer`]s: each targeted layer's [`crate::AdaptedModule`] holds the
//! adapters, and every operation here applies to all of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Tensor, Var};

use crate::base::ModuleKind;
use crate::config::ModuleSelector;
use crate::config::PeftConfig;
use crate::error::{PeftError, Result};
use crate::matching::{MIN_TARGETS_TO_CONDENSE, is_module_to_save, minimal_target_modules};
use crate::method::{LayerAdapter, MergeRule, MethodConfig, ParamSource};
use crate::model::{Layer, Model, ModelInput};
use crate::module::Below;
use crate::params::{Params, take_params};
use crate::peft_adapter::PeftAdapter;
use crate::rng::DropoutRng;

/// Layer names PEFT treats as embedding layers when saving (`EMBEDDING_LAYER_NAMES`).
const EMBEDDING_LAYER_NAMES: &[&str] = &["embed_tokens", "lm_head"];

/// The name PEFT gives batch rows that use no adapter in a mixed batch.
pub const BASE_ROWS: &str = "__base__";

/// A model with adapters. Adapters are kept in insertion order (PEFT's `peft_config`).
pub struct PeftModel {
    model: Arc<dyn Model>,
    configs: Vec<(String, PeftConfig)>,
    /// Adapter-wide tensors per adapter (VeRA's projections).
    shared: BTreeMap<String, BTreeMap<String, Tensor>>,
    /// Per adapter, the layers holding a `modules_to_save` copy of it rather than its method.
    copies: BTreeMap<String, Vec<String>>,
    active: Vec<String>,
}

impl PeftModel {
    /// The model without adapters.
    pub fn new(model: Arc<dyn Model>) -> Self {
        Self {
            model,
            configs: Vec::new(),
            shared: BTreeMap::new(),
            copies: BTreeMap::new(),
            active: Vec::new(),
        }
    }

    /// PEFT's `PeftModel.from_pretrained`: the adapter in `dir` loaded as `adapter_name`, active.
    pub fn from_pretrained(model: Arc<dyn Model>, dir: &Path, adapter_name: &str) -> Result<Self> {
        let mut peft = Self::new(model);
        peft.load_adapter(dir, adapter_name)?;
        peft.set_adapter(&[adapter_name])?;
        Ok(peft)
    }

    pub fn model(&self) -> &Arc<dyn Model> {
        &self.model
    }

    /// Adapter names in insertion order.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.configs.iter().map(|(n, _)| n.as_str()).collect()
    }

    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    pub fn config(&self, adapter_name: &str) -> Result<&PeftConfig> {
        self.configs
            .iter()
            .find(|(n, _)| n == adapter_name)
            .map(|(_, c)| c)
            .ok_or_else(|| self.unknown(adapter_name))
    }

    fn unknown(&self, adapter_name: &str) -> PeftError {
        PeftError::MissingKey {
            key: adapter_name.to_string(),
            context: format!(
                "no adapter of that name; the adapters are {:?}",
                self.adapter_names()
            ),
        }
    }

    fn layers(&self) -> Vec<Layer> {
        self.model.modules().layers()
    }

    /// A new adapter initialised as `config` says (PEFT's `get_peft_model` / `add_adapter`). As
    /// in PEFT, the model's first adapter is active and later ones are added inactive. Layer `i`
    /// (in build order) is seeded with `seed + i`.
    pub fn add_adapter(&mut self, adapter_name: &str, config: PeftConfig, seed: u64) -> Result<()> {
        let config = with_task_heads(config)?;
        let copies = config.modules_to_save().to_vec();
        let init = |i: usize, _: &str| {
            Ok(ParamSource::Init {
                seed: seed.wrapping_add(i as u64),
            })
        };
        self.inject(adapter_name, config, init, None)?;
        // `modules_to_save`: trainable copies of the modules as they are now.
        let mut replaced = BTreeMap::new();
        for layer in self.layers() {
            if is_module_to_save(&copies, layer.path()) {
                let module = layer.module();
                replaced.insert(format!("{}.weight", layer.path()), module.base().weight()?);
                if let Some(b) = module.base().bias() {
                    replaced.insert(format!("{}.bias", layer.path()), b.clone());
                }
            }
        }
        if let Err(e) = self.install_replaced(adapter_name, &replaced) {
            self.remove(adapter_name);
            return Err(e);
        }
        Ok(())
    }

    /// PEFT's `add_weighted_adapter`: a new LoRA or IA³ adapter (the sources' method) combining
    /// `adapters` with `weights` ([`crate::arithmetic`]), added inactive. `combination`: LoRA's
    /// type (default `svd`); IA³ takes none (or `linear`). Does nothing and returns `None` if
    /// `adapter_name` exists (as PEFT); otherwise the report (`exact_svd`'s truncation errors).
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        adapter_name: &str,
        combination: Option<crate::arithmetic::Combination>,
        options: &crate::arithmetic::CombineOptions,
    ) -> Result<Option<crate::arithmetic::CombineReport>> {
        if self.config(adapter_name).is_ok() {
            return Ok(None);
        }
        let sources = adapters
            .iter()
            .map(|name| self.adapter(name))
            .collect::<Result<Vec<_>>>()?;
        let sources: Vec<&PeftAdapter> = sources.iter().collect();
        let paths: Vec<String> = self.layers().iter().map(|l| l.path().to_string()).collect();
        let (combined, report) = crate::arithmetic::combine_candidates(
            adapter_name,
            &sources,
            weights,
            combination,
            options,
            &paths,
        )?;
        let source =
            |_: usize, path: &str| Ok(ParamSource::Given(combined.tensors(path)?.to_vec()));
        self.inject(adapter_name, combined.config().clone(), source, None)?;
        Ok(Some(report))
    }

    /// The adapter saved in `dir` (by PEFT or by peft-rs) as `adapter_name` (inactive unless it is
    /// the first, as PEFT's `load_adapter`). Every module the config targets in this model must
    /// have its tensors in the file, and every tensor of the file must belong to such a module.
    pub fn load_adapter(&mut self, dir: &Path, adapter_name: &str) -> Result<()> {
        let file = PeftAdapter::from_pretrained(dir, None)?;
        let config = file.config().clone();
        let targets: Vec<String> = file.module_names().iter().map(|m| m.to_string()).collect();
        let shared = (!file.shared().is_empty()).then(|| file.shared().clone());
        let found = std::cell::RefCell::new(Vec::new());
        self.inject(
            adapter_name,
            config,
            |_, path| {
                found.borrow_mut().push(path.to_string());
                let tensors = file.tensors(path).map_err(|_| PeftError::MissingKey {
                    key: format!("{}{path}.*", crate::io::MODEL_PREFIX),
                    context: format!(
                        "the config targets `{path}` in this model, but {} has no tensors for it",
                        dir.display()
                    ),
                })?;
                Ok(ParamSource::Given(tensors.to_vec()))
            },
            shared,
        )?;
        let found = found.into_inner();
        if let Some(extra) = targets.iter().find(|m| !found.contains(m)) {
            self.remove(adapter_name);
            return Err(PeftError::UnexpectedKey {
                key: format!("{}{extra}", crate::io::MODEL_PREFIX),
                context: "the adapter has tensors for a module this model does not have or does not target".into(),
            });
        }
        let replaced = file.replaced_tensors().clone();
        if let Err(e) = self.install_replaced(adapter_name, &replaced) {
            self.remove(adapter_name);
            return Err(e);
        }
        Ok(())
    }

    /// Adds `adapter_name` on every targeted layer with tensors from `source(layer_index, path)`;
    /// on any error, nothing of the adapter is left behind.
    fn inject(
        &mut self,
        adapter_name: &str,
        config: PeftConfig,
        source: impl Fn(usize, &str) -> Result<ParamSource>,
        shared: Option<BTreeMap<String, Tensor>>,
    ) -> Result<()> {
        if self.configs.iter().any(|(n, _)| n == adapter_name) {
            return Err(PeftError::InvalidOperation(format!(
                "Adapter with name '{adapter_name}' already exists."
            )));
        }
        let layers = self.layers();
        let kinds: Vec<_> = layers
            .iter()
            .map(|l| (l.path().to_string(), l.module().base().kind()))
            .collect();
        let config = config.expand_all_linear(&kinds, self.model.output_head())?;
        let config = self.condense_targets(config)?;
        let mut targets = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            if config.selection().is_target(layer.path())? {
                targets.push((i, layer));
            }
        }
        if targets.is_empty() {
            return Err(PeftError::config(
                "target_modules",
                format!(
                    "Target modules {:?} not found in the base model. Please check the target modules and try again.",
                    config.selection().target_modules
                ),
            ));
        }
        let kinds: Vec<_> = targets
            .iter()
            .map(|(_, l)| l.module().base().kind())
            .collect();
        let config = match config.for_targets(&kinds)? {
            Some(adapted) => PeftConfig::new(adapted)?,
            None => config,
        };
        let shared = match shared {
            Some(s) => s,
            None => {
                let out_max = targets
                    .iter()
                    .map(|(_, l)| l.module().base().out_features())
                    .max();
                let in_max = targets
                    .iter()
                    .map(|(_, l)| l.module().base().in_features())
                    .max();
                config.generate_shared(out_max.unwrap_or(0), in_max.unwrap_or(0))?
            }
        };
        let first = self.configs.is_empty();
        self.configs
            .push((adapter_name.to_string(), config.clone()));
        self.shared.insert(adapter_name.to_string(), shared.clone());
        for (i, layer) in targets {
            let added = source(i, layer.path()).and_then(|source| {
                layer
                    .module_mut()
                    .add(adapter_name, &*config, source, &shared)
            });
            if let Err(e) = added {
                self.remove(adapter_name);
                return Err(e);
            }
        }
        // A layer's first adapter is active on it; the model's active set decides instead.
        let active: Vec<String> = if first {
            vec![adapter_name.to_string()]
        } else {
            self.active.clone()
        };
        self.set_adapter(&active.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// PEFT's rewrite of a long `target_modules` list (20 entries or more, not IA³) into the
    /// shortest suffixes that select the same modules, which it saves.
    fn condense_targets(&self, config: PeftConfig) -> Result<PeftConfig> {
        let Some(ModuleSelector::Names(targets)) = config.selection().target_modules else {
            return Ok(config);
        };
        if targets.len() < MIN_TARGETS_TO_CONDENSE || config.peft_type() == "IA3" {
            return Ok(config);
        }
        let modules = self.model.modules();
        let mut names = modules.paths();
        names.extend(self.layers().iter().map(|l| l.path().to_string()));
        let others: Vec<String> = names
            .into_iter()
            .filter(|n| {
                !targets.contains(n) && !targets.iter().any(|t| n.ends_with(&format!(".{t}")))
            })
            .collect();
        let condensed = minimal_target_modules(targets, &others);
        if condensed.len() >= targets.len() {
            return Ok(config);
        }
        let mut value = config.to_json();
        value["target_modules"] = serde_json::Value::from(condensed);
        PeftConfig::from_json(value)
    }

    /// `modules_to_save` copies (and trained biases of wrapped modules) from a file.
    fn install_replaced(
        &mut self,
        adapter_name: &str,
        replaced: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let config = self.config(adapter_name)?.clone();
        let mut by_module: BTreeMap<String, Vec<(String, Tensor)>> = BTreeMap::new();
        for (key, tensor) in replaced {
            let (module, param) = key.rsplit_once('.').unwrap_or(("", key.as_str()));
            by_module
                .entry(module.to_string())
                .or_default()
                .push((param.to_string(), tensor.clone()));
        }
        for (module, mut tensors) in by_module {
            // The base weight PEFT saves for a targeted embedding layer goes back into the model.
            if let Some(layer) = self.model.modules().get(&module)
                && layer.module().get(adapter_name).is_some()
            {
                let Some(pos) = tensors.iter().position(|(p, _)| p == "weight") else {
                    return Err(PeftError::InvalidOperation(format!(
                        "`{module}`: trained biases (bias=\"all\"/\"lora_only\") are not supported in PeftModel yet"
                    )));
                };
                let (_, weight) = tensors.swap_remove(pos);
                layer.module_mut().replace_base_weight(weight)?;
                if tensors.is_empty() {
                    continue;
                }
            }
            let layer = self.model.modules().get(&module).ok_or_else(|| {
                PeftError::InvalidOperation(format!(
                    "the adapter replaces tensors of `{module}`, which is not a layer peft-rs wraps \
                     in this model (modules_to_save copies are supported on Linear, Embedding and \
                     Conv layers)"
                ))
            })?;
            if !is_module_to_save(config.modules_to_save(), &module) {
                return Err(PeftError::InvalidOperation(format!(
                    "`{module}`: trained biases (bias=\"all\"/\"lora_only\") are not supported in PeftModel yet"
                )));
            }
            let copy = ModuleCopy::new(&module, &layer, config.arc().clone(), tensors)?;
            layer.module_mut().insert(adapter_name, Box::new(copy))?;
            self.copies
                .entry(adapter_name.to_string())
                .or_default()
                .push(module);
        }
        // A layer's first adapter is active on it; the model's active set decides instead.
        let active = self.active.clone();
        self.set_adapter(&active.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Removes every trace of an adapter (used to roll back a failed add or load).
    fn remove(&mut self, adapter_name: &str) {
        for layer in self.layers() {
            let mut module = layer.module_mut();
            if module.get(adapter_name).is_some() {
                // Never merged: a failed add never reaches a merge.
                let _ = module.delete(adapter_name);
            }
        }
        self.configs.retain(|(n, _)| n != adapter_name);
        self.shared.remove(adapter_name);
        self.copies.remove(adapter_name);
        self.active.retain(|n| n != adapter_name);
    }

    fn is_copy(&self, adapter_name: &str, path: &str) -> bool {
        self.copies
            .get(adapter_name)
            .is_some_and(|m| m.iter().any(|p| p == path))
    }

    /// Activates these adapters (several combine on each layer, in order). Unknown names are an
    /// error listing the known ones; merged layers are unmerged first (as PEFT).
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        for name in names {
            self.config(name)?;
        }
        for layer in self.layers() {
            let copies = names
                .iter()
                .filter(|n| self.is_copy(n, layer.path()))
                .count();
            if copies > 1 {
                return Err(PeftError::InvalidOperation(format!(
                    "Only one adapter can be set at a time for `{}` (modules_to_save), got {copies}",
                    layer.path()
                )));
            }
        }
        for layer in self.layers() {
            let mut module = layer.module_mut();
            let here: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| module.get(n).is_some())
                .collect();
            module.set_active(&here)?;
        }
        self.active = names.iter().map(|n| n.to_string()).collect();
        Ok(())
    }

    /// Disables (or re-enables) every adapter: the forward is the base model's.
    pub fn enable_adapters(&mut self, enabled: bool) -> Result<()> {
        for layer in self.layers() {
            layer.module_mut().enable_adapters(enabled)?;
        }
        Ok(())
    }

    /// Merges `names` (default: the active adapters) into every layer that holds them.
    pub fn merge_adapter(&mut self, names: Option<&[&str]>, safe_merge: bool) -> Result<()> {
        if let Some(names) = names {
            for name in names {
                self.config(name)?;
            }
        }
        for layer in self.layers() {
            layer.module_mut().merge(names, safe_merge)?;
        }
        Ok(())
    }

    pub fn unmerge_adapter(&mut self) -> Result<()> {
        for layer in self.layers() {
            layer.module_mut().unmerge()?;
        }
        Ok(())
    }

    /// Deletes an adapter everywhere (it must not be merged).
    pub fn delete_adapter(&mut self, adapter_name: &str) -> Result<()> {
        self.config(adapter_name)?;
        let layers = self.layers();
        if let Some(layer) = layers
            .iter()
            .find(|l| l.module().merged_adapters().contains(&adapter_name))
        {
            return Err(PeftError::InvalidOperation(format!(
                "Cannot delete adapter(s) ['{adapter_name}'] while they are merged (`{}`). Please unmerge them first.",
                layer.path()
            )));
        }
        for layer in layers {
            let mut module = layer.module_mut();
            if module.get(adapter_name).is_some() {
                module.delete(adapter_name)?;
            }
        }
        self.configs.retain(|(n, _)| n != adapter_name);
        self.shared.remove(adapter_name);
        self.copies.remove(adapter_name);
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

    pub fn forward(&self, input: &ModelInput) -> Result<Tensor> {
        self.model.forward(input)
    }

    /// A mixed batch: row `i` uses adapter `adapter_names[i]` (or `"__base__"`) alone, exactly
    /// as a batch of that adapter would. Works for every method.
    pub fn forward_mixed(&self, input: &ModelInput, adapter_names: &[String]) -> Result<Tensor> {
        self.check_row_adapters(input, adapter_names)?;
        self.model
            .modules()
            .with_row_adapters(adapter_names.to_vec(), || self.model.forward(input))
    }

    /// Greedy generation; with `adapter_names`, each row decodes with its own adapter.
    pub fn generate(
        &self,
        input: &ModelInput,
        max_new_tokens: usize,
        adapter_names: Option<&[String]>,
    ) -> Result<Tensor> {
        match adapter_names {
            None => self.model.generate(input, max_new_tokens),
            Some(names) => {
                self.check_row_adapters(input, names)?;
                self.model.modules().with_row_adapters(names.to_vec(), || {
                    self.model.generate(input, max_new_tokens)
                })
            }
        }
    }

    fn check_row_adapters(&self, input: &ModelInput, names: &[String]) -> Result<()> {
        let rows = input.input_ids.dim(0)?;
        if names.len() != rows {
            return Err(PeftError::InvalidOperation(format!(
                "Length of `adapter_names` should be the same as the number of inputs, but got {} and {rows} respectively.",
                names.len()
            )));
        }
        let mut unknown: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| *n != BASE_ROWS && self.config(n).is_err())
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            unknown.dedup();
            return Err(PeftError::InvalidOperation(format!(
                "Trying to infer with non-existing adapter(s): {}",
                unknown.join(", ")
            )));
        }
        Ok(())
    }

    /// Replaces an adapter's weights in place from another directory of the same method and
    /// shapes (PEFT's hot swap). Everything is checked before anything is written, so a
    /// mismatch leaves the old adapter as it was.
    pub fn hotswap_adapter(&mut self, dir: &Path, adapter_name: &str) -> Result<()> {
        let config = self.config(adapter_name)?.clone();
        let file = PeftAdapter::from_pretrained(dir, None)?;
        if file.config().peft_type() != config.peft_type() {
            return Err(PeftError::InvalidOperation(format!(
                "cannot hot-swap a {} adapter into {adapter_name:?}, a {} adapter",
                file.config().peft_type(),
                config.peft_type()
            )));
        }
        let mut staged = Vec::new();
        for layer in self.layers() {
            let module = layer.module();
            let Some(current) = module.get(adapter_name) else {
                continue;
            };
            if self.is_copy(adapter_name, layer.path()) {
                continue;
            }
            let tensors = file.tensors(layer.path())?;
            let mut fresh = Vec::new();
            for (name, old) in current.params().entries() {
                let new = tensors
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t)
                    .ok_or_else(|| PeftError::MissingKey {
                        key: format!("{}{}.{name}", crate::io::MODEL_PREFIX, layer.path()),
                        context: format!("hot swap from {}", dir.display()),
                    })?;
                if new.dims() != old.dims() {
                    return Err(PeftError::shape(
                        format!(
                            "{}{}.{name} (hot swap)",
                            crate::io::MODEL_PREFIX,
                            layer.path()
                        ),
                        old.dims(),
                        new.dims(),
                    ));
                }
                fresh.push((
                    name.clone(),
                    new.to_dtype(old.dtype())?.to_device(old.device())?,
                ));
            }
            staged.push((layer.clone(), fresh));
        }
        for (layer, fresh) in staged {
            let mut module = layer.module_mut();
            let adapter = module.get_mut(adapter_name).expect("staged above");
            *adapter.params_mut() = Params::new(fresh);
        }
        Ok(())
    }

    /// PEFT's `merge_and_unload`: the active adapters merged into every layer, then every adapter
    /// removed; the model computes as a plain model with the merged weights.
    pub fn merge_and_unload(mut self, safe_merge: bool) -> Result<Arc<dyn Model>> {
        self.merge_adapter(None, safe_merge)?;
        for layer in self.layers() {
            layer.module_mut().unload();
        }
        Ok(self.model)
    }

    /// The adapter `adapter_name` as PEFT would save it.
    pub fn adapter(&self, adapter_name: &str) -> Result<PeftAdapter> {
        let config = self.config(adapter_name)?.clone();
        let mut layers = BTreeMap::new();
        let mut replaced = BTreeMap::new();
        for layer in self.layers() {
            let module = layer.module();
            let Some(adapter) = module.get(adapter_name) else {
                continue;
            };
            let tensors = adapter.params().entries().to_vec();
            let leaf = layer.path().rsplit('.').next().unwrap_or_default();
            if EMBEDDING_LAYER_NAMES.contains(&leaf) && !self.is_copy(adapter_name, layer.path()) {
                // PEFT's `save_embedding_layers="auto"`: targeted embedding layers are saved with
                // their base weight.
                replaced.insert(format!("{}.weight", layer.path()), module.base().weight()?);
            }
            if self.is_copy(adapter_name, layer.path()) {
                for (name, t) in tensors {
                    replaced.insert(format!("{}.{name}", layer.path()), t);
                }
            } else {
                let saved = config.tensors_to_save(layer.path(), tensors)?;
                layers.insert(layer.path().to_string(), saved);
            }
        }
        let shared = self.shared.get(adapter_name).cloned().unwrap_or_default();
        Ok(PeftAdapter::from_parts(
            adapter_name,
            config,
            layers,
            replaced,
            shared,
        ))
    }

    /// PEFT's `save_pretrained`: the default adapter in `dir`, others in `dir/<name>`.
    pub fn save_pretrained(&self, dir: &Path, selected: Option<&[&str]>) -> Result<Vec<PathBuf>> {
        let names: Vec<&str> = match selected {
            Some(s) => s.to_vec(),
            None => self.adapter_names(),
        };
        names
            .iter()
            .map(|name| self.adapter(name)?.save_pretrained(dir))
            .collect()
    }

    /// The tensors of `adapter_name` as trainable variables, in model order (the order PEFT's
    /// `named_parameters()` visits them), keyed as in PEFT's saved files. The layers compute with
    /// these variables from now on, so an optimiser updating them updates the model. Base
    /// weights are never variables: they are frozen by construction.
    pub fn trainable_parameters(&self, adapter_name: &str) -> Result<Vec<TrainableParam>> {
        self.config(adapter_name)?;
        let mut out = Vec::new();
        for layer in self.layers() {
            let mut module = layer.module_mut();
            let kind = module.base().kind();
            let Some(adapter) = module.get_mut(adapter_name) else {
                continue;
            };
            let is_copy = self.is_copy(adapter_name, layer.path());
            let params = adapter.params_mut();
            for (name, var) in params.vars()? {
                out.push(TrainableParam {
                    key: crate::params::file_key(layer.path(), &name),
                    frozen: params.is_tensor_frozen(&name),
                    module: layer.path().to_string(),
                    name,
                    var,
                    kind,
                    is_copy,
                });
            }
        }
        Ok(out)
    }

    /// Freezes or unfreezes tensors of `adapter_name`: all of them, or those named `tensor`
    /// (`"lora_A"`) in every module.
    pub fn set_frozen(&self, adapter_name: &str, tensor: Option<&str>, frozen: bool) -> Result<()> {
        self.config(adapter_name)?;
        for layer in self.layers() {
            let mut module = layer.module_mut();
            let Some(adapter) = module.get_mut(adapter_name) else {
                continue;
            };
            let params = adapter.params_mut();
            match tensor {
                None => params.set_frozen(frozen),
                Some(name) if params.entries().iter().any(|(n, _)| n == name) => {
                    params.set_tensor_frozen(name, frozen)?
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Training mode (dropouts on) or eval mode for every adapted layer; training draws from
    /// `rng`, one stream for the whole model.
    pub fn set_training(&self, training: bool, rng: &Arc<DropoutRng>) {
        for layer in self.layers() {
            let mut module = layer.module_mut();
            module.set_training(training);
            module.set_dropout_rng(rng.clone());
        }
    }

    /// Whether any layer has a merged adapter (training needs none).
    pub fn is_merged(&self) -> bool {
        self.layers().iter().any(|l| l.module().is_merged())
    }

    /// Replaces the config of `adapter_name` by one of the same method (AdaLoRA's trainer
    /// records the final `rank_pattern` so).
    pub fn replace_config(&mut self, adapter_name: &str, config: PeftConfig) -> Result<()> {
        let slot = self
            .configs
            .iter_mut()
            .find(|(n, _)| n == adapter_name)
            .map(|(_, c)| c);
        match slot {
            Some(c) if c.peft_type() == config.peft_type() => {
                *c = config;
                Ok(())
            }
            Some(c) => Err(PeftError::InvalidOperation(format!(
                "cannot replace the {} config of {adapter_name:?} by a {} config",
                c.peft_type(),
                config.peft_type()
            ))),
            None => Err(self.unknown(adapter_name)),
        }
    }

    /// `(trainable, all)` scalars: adapters' tensors, and those plus the base layers' weights.
    pub fn num_parameters(&self) -> (usize, usize) {
        let mut adapters = 0;
        let mut base = 0;
        for layer in self.layers() {
            let module = layer.module();
            base += module.base().weight_dims().iter().product::<usize>()
                + module.base().bias().map_or(0, |b| b.elem_count());
            adapters += module
                .adapter_names()
                .iter()
                .filter_map(|n| module.get(n))
                .map(|a| a.params().num_elements())
                .sum::<usize>();
        }
        (adapters, adapters + base)
    }
}

/// One trainable tensor of an adapter ([`PeftModel::trainable_parameters`]).
#[derive(Debug, Clone)]
pub struct TrainableParam {
    /// The key in PEFT's saved files (`base_model.model.<module>.lora_A.weight`).
    pub key: String,
    /// The module path and the tensor's name in it (`"lora_A.weight"`, or `"weight"` for a
    /// `modules_to_save` copy).
    pub module: String,
    pub name: String,
    pub var: Var,
    /// The module's kind (LoRA+ gives embeddings their own learning rate).
    pub kind: ModuleKind,
    /// Whether the tensor belongs to a `modules_to_save` copy rather than the method.
    pub is_copy: bool,
    pub frozen: bool,
}

/// PEFT's task wrappers (`PeftModelForSequenceClassification`...) add the task head to
/// `modules_to_save` when they create an adapter, and save it so.
fn with_task_heads(config: PeftConfig) -> Result<PeftConfig> {
    let mut value = config.to_json();
    let heads: &[&str] = match value.get("task_type").and_then(serde_json::Value::as_str) {
        Some("SEQ_CLS" | "TOKEN_CLS") => &["classifier", "score"],
        Some("QUESTION_ANS") => &["qa_outputs"],
        _ => return Ok(config),
    };
    let mut modules: Vec<serde_json::Value> = match value.get("modules_to_save") {
        Some(serde_json::Value::Array(m)) => m.clone(),
        _ => Vec::new(),
    };
    modules.extend(heads.iter().map(|h| serde_json::Value::from(*h)));
    value["modules_to_save"] = serde_json::Value::from(modules);
    PeftConfig::from_json(value)
}

/// A `modules_to_save` copy of a whole layer: the adapter's trained weight and bias replace the
/// module's while the adapter is active; merging writes them into the module.
#[derive(Debug)]
struct ModuleCopy {
    config: Arc<dyn MethodConfig>,
    params: Params,
}

impl ModuleCopy {
    fn new(
        module: &str,
        layer: &Layer,
        config: Arc<dyn MethodConfig>,
        tensors: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        let base = layer.module();
        let base = base.base();
        let mut expected = vec![("weight", base.weight_dims().to_vec())];
        if let Some(b) = base.bias() {
            expected.push(("bias", b.dims().to_vec()));
        }
        let params = take_params(
            module,
            "modules_to_save copy",
            tensors,
            &expected,
            base.dtype(),
            base.device(),
        )?;
        Ok(Self { config, params })
    }
}

impl LayerAdapter for ModuleCopy {
    fn config(&self) -> &dyn MethodConfig {
        &*self.config
    }

    fn params(&self) -> &Params {
        &self.params
    }

    fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }

    fn forward(&self, x: &Tensor, below: &Below<'_>) -> Result<Tensor> {
        let bias = self.params.get_opt("bias");
        below
            .base()
            .forward_with(x, &self.params.get("weight")?, bias.as_ref())
    }

    fn merge_rule(&self, _base: &crate::base::BaseLayer) -> Result<MergeRule> {
        Ok(MergeRule::Replace {
            weight: self.params.get("weight")?,
            bias: self.params.get_opt("bias"),
        })
    }
}
