//! AdaLoRA (PEFT `tuners/adalora`): LoRA in SVD form, `ΔW = B (A ⊙ E) · s / (ranknum + 1e-5)`,
//! whose singular values `E` are pruned during training. Saved files hold only the kept ranks,
//! with the kept/pruned masks in `rank_pattern`; `ranknum` stays `init_r`, so the scaling of a
//! reloaded adapter is the one it was trained with.
//!
//! The layer math and the files are here (Linear, Conv1D, Conv2d); the training-time rank
//! allocator is not yet.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Tensor;
use serde_json::{Map, Value};

use crate::base::{BaseLayer, ModuleKind, conv2d, linear_rows};
use crate::config::{deserialize_fields, number, take_peft_type};
use crate::error::{PeftError, Result};
use crate::init::Initializer;
use crate::kernels::linear::{Extras, LowRank, matmul_scaled};
use crate::matching::Selection;
use crate::merge::adapter_dtype;
use crate::method::{
    BiasMode, InferredBase, LayerAdapter, MergeRule, MethodConfig, MethodEntry, ParamSource,
    dims_with_rank,
};
use crate::methods::lora::{LoraConfig, LoraInit};
use crate::module::Below;
use crate::params::{Params, take_params};

pub const PEFT_TYPE: &str = "ADALORA";

pub const ENTRY: MethodEntry = MethodEntry {
    peft_type: PEFT_TYPE,
    config_class: "AdaLoraConfig",
    from_json: |v| Ok(Arc::new(AdaLoraConfig::from_json(v)?)),
};

pub const ADALORA_A: &str = "lora_A";
pub const ADALORA_B: &str = "lora_B";
pub const ADALORA_E: &str = "lora_E";
pub const PARAM_NAMES: &[&str] = &[ADALORA_A, ADALORA_B, ADALORA_E];

/// The AdaLoRA-only fields of `AdaLoraConfig` (PEFT names and defaults).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaLoraFields {
    pub target_r: u32,
    pub init_r: u32,
    pub tinit: u64,
    pub tfinal: u64,
    #[serde(rename = "deltaT")]
    pub delta_t: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub orth_reg_weight: f64,
    pub total_step: Option<u64>,
    /// `"<module>.lora_E"` → which of the `init_r` ranks were kept.
    pub rank_pattern: Option<Map<String, Value>>,
}

impl Default for AdaLoraFields {
    fn default() -> Self {
        Self {
            target_r: 8,
            init_r: 12,
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step: None,
            rank_pattern: None,
        }
    }
}

const ADALORA_KEYS: &[&str] = &[
    "target_r",
    "init_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
    "rank_pattern",
];

/// PEFT's `AdaLoraConfig`: every LoRA field plus the AdaLoRA ones.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdaLoraConfig {
    /// The LoRA fields (`rank_pattern` there is unused: AdaLoRA's has another meaning).
    pub lora: LoraConfig,
    pub adalora: AdaLoraFields,
}

impl AdaLoraConfig {
    pub fn from_json(value: Value) -> Result<Self> {
        let mut value = value;
        take_peft_type(&mut value, PEFT_TYPE)?;
        let Value::Object(map) = value else {
            return Err(PeftError::config(
                "<root>",
                "a config must be a JSON object",
            ));
        };
        let (own, lora): (Map<String, Value>, Map<String, Value>) = map
            .into_iter()
            .partition(|(k, _)| ADALORA_KEYS.contains(&k.as_str()));
        let config = Self {
            lora: LoraConfig::from_json(Value::Object(lora))?,
            adalora: deserialize_fields(Value::Object(own))?,
        };
        config.validate()?;
        Ok(config)
    }

    pub fn selection(&self) -> Selection<'_> {
        self.lora.selection()
    }

    /// The kept-rank mask of `module` from `rank_pattern` (`None`: all `init_r` ranks kept).
    pub fn rank_mask(&self, module: &str) -> Result<Option<Vec<bool>>> {
        let key = format!("{module}.lora_E");
        let Some(mask) = self.adalora.rank_pattern.as_ref().and_then(|p| p.get(&key)) else {
            return Ok(None);
        };
        let mask: Vec<bool> = serde_json::from_value(mask.clone())
            .map_err(|e| PeftError::config("rank_pattern", format!("{key:?}: {e}")))?;
        if mask.len() != self.adalora.init_r as usize {
            return Err(PeftError::config(
                "rank_pattern",
                format!(
                    "{key:?} has {} entries, init_r is {}",
                    mask.len(),
                    self.adalora.init_r
                ),
            ));
        }
        Ok(Some(mask))
    }

    /// The rank a module keeps after pruning.
    pub fn rank(&self, module: &str) -> Result<usize> {
        Ok(match self.rank_mask(module)? {
            Some(mask) => mask.iter().filter(|k| **k).count(),
            None => self.adalora.init_r as usize,
        })
    }

    /// `s / (ranknum + 1e-5)`: `s = lora_alpha` (or `init_r` if alpha ≤ 0), `ranknum = init_r`.
    pub fn scaling(&self) -> f64 {
        let init_r = f64::from(self.adalora.init_r);
        let s = if self.lora.lora_alpha > 0.0 {
            self.lora.lora_alpha
        } else {
            init_r
        };
        s / (init_r + 1e-5)
    }
}

impl AdaLoraConfig {
    /// Checks every field; every constructor calls it, so a config in hand is valid.
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        let a = &self.adalora;
        match a.total_step {
            None | Some(0) => {
                return Err(PeftError::config(
                    "total_step",
                    "AdaLoRA requires total_step > 0",
                ));
            }
            Some(total) if a.tinit >= total.saturating_sub(a.tfinal) => {
                return Err(PeftError::config(
                    "tinit",
                    format!(
                        "tinit ({}) must be below total_step - tfinal ({total} - {})",
                        a.tinit, a.tfinal
                    ),
                ));
            }
            _ => {}
        }
        if a.init_r == 0 {
            return Err(PeftError::config("init_r", "must be positive"));
        }
        if a.orth_reg_weight < 0.0 {
            return Err(PeftError::config("orth_reg_weight", "must be >= 0"));
        }
        let l = &self.lora;
        for (field, set) in [
            ("use_dora", l.use_dora),
            ("use_rslora", l.use_rslora),
            ("lora_bias", l.lora_bias),
            ("rank_pattern", !l.rank_pattern.0.is_empty()),
            ("alpha_pattern", !l.alpha_pattern.0.is_empty()),
            (
                "init_lora_weights",
                matches!(l.init_lora_weights, LoraInit::Named(_)),
            ),
        ] {
            if set {
                return Err(PeftError::config(
                    field,
                    "is not supported by AdaLoRA (as in PEFT) or by peft-rs for it",
                ));
            }
        }
        if let Some(pattern) = &a.rank_pattern {
            for key in pattern.keys() {
                let module = key.strip_suffix(".lora_E").unwrap_or(key);
                self.rank_mask(module)?;
            }
        }
        Ok(())
    }
}

impl MethodConfig for AdaLoraConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn validate(&self) -> Result<()> {
        AdaLoraConfig::validate(self)
    }

    fn fields(&self) -> Value {
        let mut value = self.lora.fields();
        let own = serde_json::to_value(&self.adalora).expect("AdaLoraFields serialise");
        if let (Value::Object(map), Value::Object(own)) = (&mut value, own) {
            map.extend(own);
            for key in ["beta1", "beta2", "orth_reg_weight"] {
                if let Some(v) = map.get(key).and_then(Value::as_f64) {
                    map.insert(key.into(), number(v));
                }
            }
        }
        value
    }

    fn selection(&self) -> Selection<'_> {
        self.lora.selection()
    }

    fn bias_mode(&self) -> BiasMode {
        self.lora.bias.into()
    }

    fn param_names(&self) -> &'static [&'static str] {
        PARAM_NAMES
    }

    /// PEFT's `resize_state_dict_by_rank_pattern`: rows of `lora_A` / `lora_E` and columns of
    /// `lora_B` for the kept ranks, when the tensors still hold all `init_r` ranks (a layer
    /// loaded from a saved file holds only the kept ones already).
    fn tensors_to_save(
        &self,
        module: &str,
        tensors: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>> {
        let Some(mask) = self.rank_mask(module)? else {
            return Ok(tensors);
        };
        let kept: Vec<u32> = (0..mask.len() as u32)
            .filter(|i| mask[*i as usize])
            .collect();
        let full = |t: &Tensor, dim: usize| t.dims().get(dim) == Some(&mask.len());
        tensors
            .into_iter()
            .map(|(name, t)| {
                let dim = if name == ADALORA_B { 1 } else { 0 };
                if !full(&t, dim) || kept.len() == mask.len() {
                    return Ok((name, t));
                }
                let idx = Tensor::new(kept.as_slice(), t.device())?;
                Ok((name, t.index_select(&idx, dim)?.contiguous()?))
            })
            .collect()
    }

    fn rank_for(&self, module: &str) -> Result<Option<usize>> {
        Ok(Some(self.rank(module)?))
    }

    fn build(
        &self,
        module: &str,
        base: &BaseLayer,
        source: ParamSource,
        _shared: &BTreeMap<String, Tensor>,
    ) -> Result<Box<dyn LayerAdapter>> {
        Ok(Box::new(AdaLoraAdapter::new(
            module,
            base,
            self.clone(),
            source,
        )?))
    }

    fn for_targets(&self, kinds: &[ModuleKind]) -> Result<Option<Arc<dyn MethodConfig>>> {
        let mut config = self.clone();
        crate::methods::adapt_fan_in_fan_out(&mut config.lora.fan_in_fan_out, kinds)?;
        Ok(Some(Arc::new(config)))
    }

    /// Outputs from `lora_B`'s rows, inputs from `lora_A`'s columns (the kept ranks do not
    /// matter: `build` checks them against `rank_pattern`). A Conv2d's flattened
    /// `in · kh · kw` cannot be split, so it is told as a Linear of that many inputs.
    fn infer_base(
        &self,
        module: &str,
        tensors: &[(String, Tensor)],
        _shared: &BTreeMap<String, Tensor>,
    ) -> Result<Option<InferredBase>> {
        let a = dims_with_rank(module, tensors, ADALORA_A, &[2])?;
        let b = dims_with_rank(module, tensors, ADALORA_B, &[2])?;
        Ok(Some(InferredBase::linear(
            b[0],
            a[1],
            self.lora.fan_in_fan_out,
        )))
    }
}

/// A `(r, in)` (Conv2d: `(r, in/groups · kh · kw)`), B `(out, r)`, E `(r, 1)`.
fn expected_params(base: &BaseLayer, r: usize) -> Result<Vec<(&'static str, Vec<usize>)>> {
    let a_cols = match base.kind() {
        ModuleKind::Linear | ModuleKind::Conv1D => base.in_features(),
        ModuleKind::Conv2d(_) => base.weight_dims()[1..].iter().product(),
        kind @ ModuleKind::Embedding => {
            return Err(PeftError::InvalidOperation(format!(
                "AdaLoRA does not support {kind:?} layers (as in PEFT)"
            )));
        }
    };
    Ok(vec![
        (ADALORA_A, vec![r, a_cols]),
        (ADALORA_B, vec![base.out_features(), r]),
        (ADALORA_E, vec![r, 1]),
    ])
}

/// An AdaLoRA adapter on one Linear / Conv1D / Conv2d module.
#[derive(Debug)]
pub struct AdaLoraAdapter {
    config: Arc<AdaLoraConfig>,
    params: Params,
    kind: ModuleKind,
    r: usize,
    scaling: f64,
}

impl AdaLoraAdapter {
    /// The adapter for `module` on `base` at the module's kept rank: given (already
    /// rank-truncated) tensors, or fresh ones: A, B ~ N(0, 0.02²) and E = 0 (the identity), or
    /// all N(0, 1) with `init_lora_weights=false`.
    pub fn new(
        module: &str,
        base: &BaseLayer,
        config: AdaLoraConfig,
        source: ParamSource,
    ) -> Result<Self> {
        let r = config.rank(module)?;
        let expected = expected_params(base, r)?;
        let dtype = adapter_dtype(base.dtype());
        let given = match source {
            ParamSource::Given(tensors) => tensors,
            ParamSource::Init { seed } => {
                let mut init = Initializer::new(seed);
                let identity = matches!(config.lora.init_lora_weights, LoraInit::Flag(true));
                let mut weights = Vec::new();
                for (name, shape) in &expected {
                    let t = match (identity, *name) {
                        (true, ADALORA_E) => Tensor::zeros(shape.as_slice(), dtype, base.device())?,
                        (true, _) => init.normal(shape, 0.02, dtype)?,
                        (false, _) => init.normal(shape, 1.0, dtype)?,
                    };
                    weights.push((name.to_string(), t));
                }
                weights
            }
        };
        let what = format!("AdaLoRA {:?} rank {r}", base.kind());
        let params = take_params(module, &what, given, &expected, dtype, base.device())?;
        Ok(Self {
            scaling: config.scaling(),
            config: Arc::new(config),
            params,
            kind: base.kind(),
            r,
        })
    }

    /// The rank kept after pruning (`rank_pattern`).
    pub fn r(&self) -> usize {
        self.r
    }

    /// `A ⊙ E`, shape `(r, in)`.
    fn scaled_a(&self) -> Result<Tensor> {
        Ok(self
            .params
            .get(ADALORA_A)?
            .broadcast_mul(&self.params.get(ADALORA_E)?)?)
    }

    /// `B (A ⊙ E) · scaling` in the base weight's layout (zero at rank 0).
    fn delta_weight(&self, base: &BaseLayer) -> Result<Tensor> {
        let dims = base.weight_dims();
        if self.r == 0 {
            return Ok(Tensor::zeros(
                dims,
                adapter_dtype(base.dtype()),
                base.device(),
            )?);
        }
        let delta = matmul_scaled(
            &self.params.get(ADALORA_B)?,
            &self.scaled_a()?,
            self.scaling,
        )?;
        Ok(match self.kind {
            ModuleKind::Conv1D => delta.t()?.contiguous()?,
            ModuleKind::Conv2d(_) => delta.reshape(dims)?,
            _ => delta,
        })
    }
}

impl LayerAdapter for AdaLoraAdapter {
    fn config(&self) -> &dyn MethodConfig {
        &*self.config
    }

    fn params(&self) -> &Params {
        &self.params
    }

    fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }

    /// PEFT's forward: the adapter path runs in the adapter dtype on the dropped-out input, is
    /// added to the output below and the sum cast back to that output's dtype.
    fn forward(&self, x: &Tensor, below: &Below<'_>) -> Result<Tensor> {
        if self.r == 0 {
            return below.forward(x);
        }
        if matches!(self.kind, ModuleKind::Linear | ModuleKind::Conv1D) {
            let fused = below.fused(x, self.config.lora.lora_dropout, || {
                Ok(Extras::low_rank(LowRank::new(
                    self.scaled_a()?,
                    self.params.get(ADALORA_B)?,
                    None,
                    self.scaling,
                )))
            })?;
            if let Some(y) = fused {
                return Ok(y);
            }
        }
        let result = below.forward(x)?;
        let base = below.base();
        let dtype = adapter_dtype(base.dtype());
        let x = below.dropout(&x.to_dtype(dtype)?, self.config.lora.lora_dropout)?;
        let lora = match self.kind {
            // PEFT's SVDConv2d convolves the input with ΔW itself.
            ModuleKind::Conv2d(p) => conv2d(&x, &self.delta_weight(base)?, p, base.in_features())?,
            _ => {
                let h = linear_rows(&x, &self.scaled_a()?.t()?, None, base.in_features())?;
                linear_rows(&h, &self.params.get(ADALORA_B)?.t()?, None, self.r)?
                    .affine(self.scaling, 0.0)?
            }
        };
        Ok(result
            .to_dtype(dtype)?
            .add(&lora)?
            .to_dtype(result.dtype())?)
    }

    fn merge_rule(&self, base: &BaseLayer) -> Result<MergeRule> {
        if self.kind == ModuleKind::Linear && self.r > 0 {
            return Ok(MergeRule::AddProduct {
                left: self.params.get(ADALORA_B)?,
                right: self.scaled_a()?,
                scale: self.scaling,
                bias: None,
            });
        }
        Ok(MergeRule::Add {
            delta: self.delta_weight(base)?,
            bias: None,
        })
    }
}
