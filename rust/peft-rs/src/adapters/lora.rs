//! LoRA and rsLoRA (PEFT `tuners/lora`): `y = base(x) + s · B A dropout(x)`, with
//! `s = lora_alpha / r` (or `lora_alpha / sqrt(r)` with `use_rslora`).

use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::adapters::dora::{self, LORA_MAGNITUDE};
use crate::base::{BaseLayer, Conv2dParams, ModuleKind, conv2d, linear_rows};
use crate::config::{
    AdapterConfig, CommonFields, ModuleSelector, OneOrMany, PeftType, check_extra_fields,
    deserialize_fields, number, take_peft_type,
};
use crate::error::{PeftError, Result};
use crate::init::Initializer;
use crate::matching::{Selection, check_pattern_keys, pattern_value};
use crate::merge::{adapter_dtype, add_to, check_finite, check_merge_state};
use crate::params::Params;
use crate::traits::{Adapter, Mergeable};

pub const LORA_A: &str = "lora_A.weight";
pub const LORA_B: &str = "lora_B.weight";
pub const LORA_B_BIAS: &str = "lora_B.bias";
pub const LORA_EMBEDDING_A: &str = "lora_embedding_A";
pub const LORA_EMBEDDING_B: &str = "lora_embedding_B";

/// Every tensor name a LoRA layer can have, relative to its module.
pub const PARAM_NAMES: &[&str] = &[
    LORA_A,
    LORA_B,
    LORA_B_BIAS,
    LORA_EMBEDDING_A,
    LORA_EMBEDDING_B,
    LORA_MAGNITUDE,
];

/// Which biases are trained and saved alongside the adapter (`bias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasMode {
    #[default]
    None,
    All,
    LoraOnly,
}

/// `init_lora_weights`: `true`, `false` or the name of an initialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LoraInit {
    Flag(bool),
    Named(String),
}

impl Default for LoraInit {
    fn default() -> Self {
        Self::Flag(true)
    }
}

/// `rank_pattern` / `alpha_pattern`: regex → value, first match in order wins.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Patterns<T>(pub Vec<(String, T)>);

impl<T: Copy + Into<f64>> Serialize for Patterns<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let map: Map<String, Value> = self
            .0
            .iter()
            .map(|(k, v)| (k.clone(), number((*v).into())))
            .collect();
        map.serialize(s)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Patterns<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let map = Map::<String, Value>::deserialize(d)?;
        map.into_iter()
            .map(|(k, v)| {
                serde_json::from_value(v)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| serde::de::Error::custom(format!("value for {k:?}: {e}")))
            })
            .collect::<std::result::Result<_, _>>()
            .map(Patterns)
    }
}

/// PEFT's `LoraConfig`, with PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    #[serde(flatten)]
    pub common: CommonFields,
    pub r: u32,
    pub target_modules: Option<ModuleSelector>,
    pub exclude_modules: Option<ModuleSelector>,
    #[serde(serialize_with = "serialize_number")]
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub fan_in_fan_out: bool,
    pub bias: BiasMode,
    pub use_rslora: bool,
    pub modules_to_save: Option<Vec<String>>,
    pub init_lora_weights: LoraInit,
    pub layers_to_transform: Option<OneOrMany<i64>>,
    pub layers_pattern: Option<OneOrMany<String>>,
    pub rank_pattern: Patterns<u32>,
    pub alpha_pattern: Patterns<f64>,
    pub use_dora: bool,
    pub lora_bias: bool,
    /// Inert unless `megatron_config` is set, which peft-rs rejects; kept for round trips.
    pub megatron_core: String,
    /// Inert unless `use_qalora` is set, which peft-rs rejects; kept for round trips.
    pub qalora_group_size: u32,
    /// Fields of PEFT features peft-rs does not implement; [`LoraConfig::validate`] requires them
    /// to be at PEFT's default ("off").
    #[serde(flatten, skip_serializing)]
    pub unsupported: Map<String, Value>,
}

fn serialize_number<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    number(*v).serialize(s)
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            common: CommonFields::default(),
            r: 8,
            target_modules: None,
            exclude_modules: None,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            fan_in_fan_out: false,
            bias: BiasMode::None,
            use_rslora: false,
            modules_to_save: None,
            init_lora_weights: LoraInit::default(),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Patterns::default(),
            alpha_pattern: Patterns::default(),
            use_dora: false,
            lora_bias: false,
            megatron_core: "megatron.core".into(),
            qalora_group_size: 16,
            unsupported: Map::new(),
        }
    }
}

/// PEFT `LoraConfig` fields for features peft-rs does not implement, with PEFT's defaults.
fn unsupported_defaults() -> Vec<(&'static str, Value)> {
    vec![
        ("megatron_config", Value::Null),
        ("trainable_token_indices", Value::Null),
        ("loftq_config", json!({})),
        ("eva_config", Value::Null),
        ("corda_config", Value::Null),
        ("lora_ga_config", Value::Null),
        ("velora_config", Value::Null),
        ("monteclora_config", Value::Null),
        ("alora_invocation_tokens", Value::Null),
        ("use_qalora", Value::Bool(false)),
        ("layer_replication", Value::Null),
        ("target_parameters", Value::Null),
        ("use_bdlora", Value::Null),
        ("arrow_config", Value::Null),
        ("kasa_config", Value::Null),
        ("ensure_weight_tying", Value::Bool(false)),
    ]
}

impl LoraConfig {
    /// Reads a config from PEFT's JSON form (`adapter_config.json` or `LoraConfig.to_dict()`).
    pub fn from_json(value: Value) -> Result<Self> {
        let mut value = value;
        take_peft_type(&mut value, PeftType::Lora)?;
        if let Value::Object(map) = &mut value {
            // PEFT never writes it, but warns and drops it on load.
            map.remove("runtime_config");
        }
        let config: Self = deserialize_fields(value)?;
        config.validate()?;
        Ok(config)
    }

    pub fn selection(&self) -> Selection<'_> {
        Selection {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: self.exclude_modules.as_ref(),
            modules_to_save: self.modules_to_save.as_deref(),
            layers_to_transform: self.layers_to_transform.as_ref(),
            layers_pattern: self.layers_pattern.as_ref(),
        }
    }

    /// Rank and alpha of the module at `key` after `rank_pattern` / `alpha_pattern`.
    pub fn rank_and_alpha(&self, key: &str) -> Result<(usize, f64)> {
        let r = pattern_value("rank_pattern", &self.rank_pattern.0, key)?.unwrap_or(self.r);
        let alpha =
            pattern_value("alpha_pattern", &self.alpha_pattern.0, key)?.unwrap_or(self.lora_alpha);
        Ok((r as usize, alpha))
    }

    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

impl AdapterConfig for LoraConfig {
    fn peft_type(&self) -> PeftType {
        PeftType::Lora
    }

    fn validate(&self) -> Result<()> {
        self.common.validate()?;
        check_extra_fields(&self.unsupported, &unsupported_defaults())?;
        if self.r == 0 {
            return Err(PeftError::config(
                "r",
                "must be a positive integer, found 0",
            ));
        }
        if let Some((k, _)) = self.rank_pattern.0.iter().find(|(_, r)| *r == 0) {
            return Err(PeftError::config(
                "rank_pattern",
                format!("rank for {k:?} must be positive"),
            ));
        }
        if !self.lora_alpha.is_finite() {
            return Err(PeftError::config("lora_alpha", "must be finite"));
        }
        if let Some((k, _)) = self.alpha_pattern.0.iter().find(|(_, a)| !a.is_finite()) {
            return Err(PeftError::config(
                "alpha_pattern",
                format!("alpha for {k:?} must be finite"),
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::config(
                "lora_dropout",
                format!("must be in [0, 1), found {}", self.lora_dropout),
            ));
        }
        match &self.init_lora_weights {
            LoraInit::Flag(_) => {}
            LoraInit::Named(name) if name == "gaussian" => {}
            LoraInit::Named(name) => {
                return Err(PeftError::config(
                    "init_lora_weights",
                    format!(
                        "{name:?} is not implemented in peft-rs; use true, false or \"gaussian\""
                    ),
                ));
            }
        }
        if matches!(self.target_modules, Some(ModuleSelector::Regex(_)))
            && (self.layers_to_transform.is_some() || self.layers_pattern.is_some())
        {
            return Err(PeftError::config(
                "layers_to_transform",
                "cannot be used when target_modules is a str (regex)",
            ));
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(PeftError::config(
                "layers_pattern",
                "requires layers_to_transform to be set",
            ));
        }
        if matches!(&self.target_modules, Some(ModuleSelector::Regex(s)) if s.eq_ignore_ascii_case("all-linear"))
        {
            return Err(PeftError::config(
                "target_modules",
                "\"all-linear\" needs the model's module types; pass the expanded list of module names",
            ));
        }
        self.selection().check_patterns()?;
        check_pattern_keys("rank_pattern", &self.rank_pattern.0)?;
        check_pattern_keys("alpha_pattern", &self.alpha_pattern.0)?;
        if self.use_dora && self.lora_bias {
            return Err(PeftError::config(
                "use_dora",
                "DoRA cannot be combined with lora_bias (as in PEFT)",
            ));
        }
        if self.lora_bias && !matches!(self.init_lora_weights, LoraInit::Flag(_)) {
            return Err(PeftError::config(
                "lora_bias",
                "requires init_lora_weights to be true or false",
            ));
        }
        Ok(())
    }

    fn to_json(&self) -> Value {
        let mut value = serde_json::to_value(self).expect("LoraConfig serialises");
        if let Value::Object(map) = &mut value {
            map.insert("peft_type".into(), Value::from("LORA"));
            for (k, v) in unsupported_defaults() {
                map.insert(k.into(), v);
            }
        }
        value
    }
}

/// The tensor names and shapes a LoRA layer of rank `r` on `base` has.
fn expected_params(
    base: &BaseLayer,
    r: usize,
    lora_bias: bool,
    use_dora: bool,
) -> Result<Vec<(&'static str, Vec<usize>)>> {
    let (inp, out) = (base.in_features(), base.out_features());
    let mut params = match base.kind() {
        ModuleKind::Linear | ModuleKind::Conv1D => {
            vec![(LORA_A, vec![r, inp]), (LORA_B, vec![out, r])]
        }
        ModuleKind::Embedding => vec![
            (LORA_EMBEDDING_A, vec![r, inp]),
            (LORA_EMBEDDING_B, vec![out, r]),
        ],
        ModuleKind::Conv2d(p) => {
            if !r.is_multiple_of(p.groups) {
                return Err(PeftError::InvalidOperation(format!(
                    "LoRA rank {r} must be divisible by the Conv2d groups {}",
                    p.groups
                )));
            }
            if p.dilation != 1 {
                // PEFT's lora_A conv drops the dilation (peft issue #3697), so its output
                // cannot be added to the base output; refuse instead of computing something else.
                return Err(PeftError::InvalidOperation(
                    "LoRA on a dilated Conv2d is not supported (PEFT computes it inconsistently)"
                        .into(),
                ));
            }
            let (kh, kw) = base.kernel_size();
            vec![
                (LORA_A, vec![r, inp, kh, kw]),
                (LORA_B, vec![out, r / p.groups, 1, 1]),
            ]
        }
    };
    if use_dora {
        params.push((LORA_MAGNITUDE, dora::magnitude_shape(base)));
    }
    if lora_bias {
        if base.kind() == ModuleKind::Embedding {
            return Err(PeftError::config(
                "lora_bias",
                "is not supported on Embedding layers",
            ));
        }
        params.push((LORA_B_BIAS, vec![out]));
    }
    Ok(params)
}

/// One module with a LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    module: String,
    base: BaseLayer,
    params: Params,
    r: usize,
    scaling: f64,
    merged: bool,
    training: bool,
    /// DoRA: `‖W + ΔW‖` at merge time, which unmerge needs (as PEFT caches it).
    dora_merge_norm: Option<Tensor>,
    config: Arc<LoraConfig>,
}

impl LoraLayer {
    /// A freshly initialised adapter on `base`, following `init_lora_weights`.
    pub fn new(module: &str, base: BaseLayer, config: Arc<LoraConfig>, seed: u64) -> Result<Self> {
        let (r, _) = config.rank_and_alpha(module)?;
        let dtype = adapter_dtype(base.dtype());
        let mut init = Initializer::new(seed);
        let mut weights = Vec::new();
        for (name, shape) in expected_params(&base, r, config.lora_bias, config.use_dora)? {
            if name == LORA_MAGNITUDE {
                // Computed from the initialised A and B below (PEFT does the same).
                continue;
            }
            let t = match (&config.init_lora_weights, name) {
                // Embedding is the reverse of Linear: A zero, B standard normal.
                (LoraInit::Flag(false), LORA_EMBEDDING_A | LORA_EMBEDDING_B) => {
                    init.normal(&shape, 1.0, dtype)?
                }
                (_, LORA_EMBEDDING_A) => Tensor::zeros(shape, dtype, &candle_core::Device::Cpu)?,
                (_, LORA_EMBEDDING_B) => init.normal(&shape, 1.0, dtype)?,
                // `false` keeps PyTorch's default Linear/Conv init for A, B and B's bias, whose
                // fan-in is B's: r / groups.
                (LoraInit::Flag(false), LORA_B_BIAS) => {
                    let groups = match base.kind() {
                        ModuleKind::Conv2d(p) => p.groups,
                        _ => 1,
                    };
                    init.uniform(&shape, 1.0 / ((r / groups) as f64).sqrt(), dtype)?
                }
                (LoraInit::Flag(false), _) => init.kaiming_uniform(&shape, dtype)?,
                (LoraInit::Named(_), LORA_A) => init.normal(&shape, 1.0 / r as f64, dtype)?,
                (LoraInit::Flag(true), LORA_A) => init.kaiming_uniform(&shape, dtype)?,
                _ => Tensor::zeros(shape, dtype, &candle_core::Device::Cpu)?,
            };
            weights.push((name.to_string(), t));
        }
        Self::build(module, base, config, weights, true)
    }

    /// An adapter on `base` with the given tensors (named as in [`PARAM_NAMES`]). Every expected
    /// tensor must be present with its exact shape; the tensors are cast to the adapter dtype
    /// PEFT uses (f32, or f64 for an f64 base).
    pub fn from_weights(
        module: &str,
        base: BaseLayer,
        config: Arc<LoraConfig>,
        weights: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        Self::build(module, base, config, weights, false)
    }

    /// `from_weights`; with `init_magnitude`, a missing DoRA magnitude is set to `‖W + s·BA‖`
    /// (the identity), as PEFT initialises it.
    fn build(
        module: &str,
        base: BaseLayer,
        config: Arc<LoraConfig>,
        weights: Vec<(String, Tensor)>,
        init_magnitude: bool,
    ) -> Result<Self> {
        let (r, alpha) = config.rank_and_alpha(module)?;
        let expected = expected_params(&base, r, config.lora_bias, config.use_dora)?;
        if let Some((name, _)) = weights
            .iter()
            .find(|(n, _)| !expected.iter().any(|(e, _)| e == n))
        {
            return Err(PeftError::UnexpectedKey {
                key: format!("{module}.{name}"),
                context: format!(
                    "a LoRA {:?} layer has {:?}",
                    base.kind(),
                    expected.iter().map(|e| e.0).collect::<Vec<_>>()
                ),
            });
        }
        let dtype = adapter_dtype(base.dtype());
        let mut params = Vec::with_capacity(expected.len());
        for (name, shape) in expected {
            if name == LORA_MAGNITUDE && init_magnitude {
                continue;
            }
            let t = weights
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| PeftError::MissingKey {
                    key: format!("{module}.{name}"),
                    context: format!("LoRA layer with r={r}"),
                })?;
            if t.dims() != shape.as_slice() {
                return Err(PeftError::shape(
                    format!("{module}.{name} (r={r})"),
                    &shape,
                    t.dims(),
                ));
            }
            if !t.dtype().is_float() {
                return Err(PeftError::DType {
                    what: format!("{module}.{name}"),
                    expected: "a floating-point dtype".into(),
                    found: format!("{:?}", t.dtype()),
                });
            }
            // Adapter tensors live where the base weight lives (a no-op on the CPU).
            let t = t.to_dtype(dtype)?.to_device(base.weight().device())?;
            params.push((name.to_string(), t));
        }
        let mut layer = Self {
            module: module.to_string(),
            scaling: config.scaling(r, alpha),
            base,
            params: Params::new(params),
            r,
            merged: false,
            training: false,
            dora_merge_norm: None,
            config,
        };
        if layer.config.use_dora && init_magnitude {
            let norm = dora::weight_norm(&layer.base, &layer.delta_weight()?)?;
            let m = norm.reshape(dora::magnitude_shape(&layer.base))?;
            layer.params.push(LORA_MAGNITUDE, m);
        }
        Ok(layer)
    }

    pub fn module(&self) -> &str {
        &self.module
    }

    pub fn r(&self) -> usize {
        self.r
    }

    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// DoRA's magnitude as a flat vector.
    fn magnitude(&self) -> Result<Tensor> {
        Ok(self.params.get(LORA_MAGNITUDE)?.flatten_all()?)
    }

    /// DoRA's `m / ‖W + s·BA‖` shaped for an output of rank `rank` (`None` without DoRA). The norm
    /// carries no gradient; `m` does.
    fn dora_scale(&self, rank: usize) -> Result<Option<Tensor>> {
        if !self.config.use_dora {
            return Ok(None);
        }
        let norm = dora::weight_norm(&self.base, &self.delta_weight()?)?;
        let scale = self.magnitude()?.div(&norm)?;
        Ok(Some(dora::per_output_for_activations(
            &self.base, &scale, rank,
        )?))
    }

    /// Dropout on the adapter input, in training mode only.
    fn dropout(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.config.lora_dropout;
        if self.training && p > 0.0 {
            Ok(candle_nn::ops::dropout(x, p as f32)?)
        } else {
            Ok(x.clone())
        }
    }

    /// The adapter's contribution `s · B A x` for an input already in the adapter dtype (and
    /// dropped out); token ids for Embedding.
    fn lora_path(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.scaling;
        let bias = self
            .params
            .get_opt(LORA_B_BIAS)
            .map(|b| b.affine(s, 0.0))
            .transpose()?;
        match self.base.kind() {
            ModuleKind::Linear | ModuleKind::Conv1D => {
                let a = self.params.get(LORA_A)?;
                let b = self.params.get(LORA_B)?;
                // Scaling the rank-r intermediate is cheaper than scaling the output.
                let h = linear_rows(x, &a.t()?, None, a.dim(1)?)?.affine(s, 0.0)?;
                linear_rows(&h, &b.t()?, bias.as_ref(), self.r)
            }
            ModuleKind::Embedding => {
                let a = self.params.get(LORA_EMBEDDING_A)?;
                let b = self.params.get(LORA_EMBEDDING_B)?;
                // Rows of Aᵀ are columns of A: select them without materialising Aᵀ.
                let ids = x.flatten_all()?;
                let h = a.index_select(&ids, 1)?.t()?.affine(s, 0.0)?;
                let y = h.matmul(&b.t()?)?;
                let mut dims = x.dims().to_vec();
                dims.push(b.dim(0)?);
                Ok(y.reshape(dims)?)
            }
            ModuleKind::Conv2d(p) => {
                let a = self.params.get(LORA_A)?;
                let b = self.params.get(LORA_B)?;
                let a_params = Conv2dParams {
                    dilation: 1,
                    groups: 1,
                    ..p
                };
                let h = conv2d(x, &a, a_params, a.dim(1)?)?;
                let b_params = Conv2dParams {
                    stride: 1,
                    padding: 0,
                    dilation: 1,
                    groups: p.groups,
                };
                let y = conv2d(&h, &b, b_params, self.r)?.affine(s, 0.0)?;
                match bias {
                    Some(bias) => {
                        let shape: &[usize] = if y.rank() == 4 {
                            &[1, bias.dim(0)?, 1, 1]
                        } else {
                            &[bias.dim(0)?, 1, 1]
                        };
                        Ok(y.broadcast_add(&bias.reshape(shape)?)?)
                    }
                    None => Ok(y),
                }
            }
        }
    }
}

impl Adapter for LoraLayer {
    /// PEFT's forward: the LoRA path runs in the adapter dtype, is added to the base output in
    /// that (promoted) dtype, and the sum is cast back to the base output's dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let result = self.base.forward(x)?;
        if self.merged {
            return Ok(result);
        }
        let dtype = adapter_dtype(self.base.dtype());
        let out_dtype = result.dtype();
        let base_out = result.to_dtype(dtype)?;
        let out = if self.base.kind() == ModuleKind::Embedding {
            let lora = self.lora_path(x)?;
            match self.dora_scale(base_out.rank())? {
                // DoRA rescales the whole embedding output.
                Some(mag) => base_out
                    .broadcast_mul(&mag)?
                    .add(&lora.broadcast_mul(&mag)?)?,
                None => base_out.add(&lora)?,
            }
        } else {
            let x_d = self.dropout(&x.to_dtype(dtype)?)?;
            let lora = self.lora_path(&x_d)?;
            match self.dora_scale(base_out.rank())? {
                Some(mag) => {
                    // (m/‖W+sBA‖ − 1)·W x + (m/‖W+sBA‖)·s·BA x on top of the base output; with
                    // dropout active the W x term uses the dropped-out input, as in PEFT.
                    let wx = if self.training && self.config.lora_dropout > 0.0 {
                        self.base.forward_without_bias(&x_d)?
                    } else {
                        match self.base.bias() {
                            Some(b) => {
                                let b = dora::per_output_for_activations(
                                    &self.base,
                                    b,
                                    base_out.rank(),
                                )?;
                                base_out.broadcast_sub(&b.to_dtype(dtype)?)?
                            }
                            None => base_out.clone(),
                        }
                    };
                    let extra = wx
                        .broadcast_mul(&(&mag - 1.0)?)?
                        .add(&lora.broadcast_mul(&mag)?)?;
                    base_out.add(&extra)?
                }
                None => base_out.add(&lora)?,
            }
        };
        Ok(out.to_dtype(out_dtype)?)
    }

    fn weights(&self) -> Vec<(String, Tensor)> {
        self.params.entries().to_vec()
    }

    fn config(&self) -> &dyn AdapterConfig {
        &*self.config
    }

    fn base(&self) -> &BaseLayer {
        &self.base
    }
}

impl Mergeable for LoraLayer {
    fn delta_weight(&self) -> Result<Tensor> {
        let s = self.scaling;
        let w = self.base.weight();
        match self.base.kind() {
            ModuleKind::Linear => {
                let ba = self.params.get(LORA_B)?.matmul(&self.params.get(LORA_A)?)?;
                Ok(ba.affine(s, 0.0)?)
            }
            ModuleKind::Conv1D => {
                let ba = self.params.get(LORA_B)?.matmul(&self.params.get(LORA_A)?)?;
                Ok(ba.t()?.contiguous()?.affine(s, 0.0)?)
            }
            ModuleKind::Embedding => {
                let a = self.params.get(LORA_EMBEDDING_A)?;
                let b = self.params.get(LORA_EMBEDDING_B)?;
                Ok(a.t()?.matmul(&b.t()?)?.affine(s, 0.0)?)
            }
            ModuleKind::Conv2d(p) => {
                if p.groups != 1 {
                    return Err(PeftError::InvalidOperation(format!(
                        "`{}`: merging LoRA into a grouped Conv2d (groups={}) is not supported, as in PEFT",
                        self.module, p.groups
                    )));
                }
                let a = self.params.get(LORA_A)?;
                let b = self.params.get(LORA_B)?;
                let b2 = b.reshape((b.dim(0)?, self.r))?;
                let a2 = a.reshape((self.r, ()))?;
                Ok(b2.matmul(&a2)?.reshape(w.dims())?.affine(s, 0.0)?)
            }
        }
    }

    fn merge(&mut self, safe_merge: bool) -> Result<()> {
        check_merge_state(&self.module, self.merged, true)?;
        let delta = self.delta_weight()?;
        let (weight, dora_norm) = if self.config.use_dora {
            // W' = (m / ‖W + ΔW‖) (W + ΔW); the norm is kept for unmerge.
            let norm = dora::weight_norm(&self.base, &delta)?;
            let factor = self.magnitude()?.div(&norm)?;
            let factor = dora::per_output_for_weight(&self.base, &factor)?;
            let w = self.base.weight();
            let merged = w
                .to_dtype(delta.dtype())?
                .add(&delta)?
                .broadcast_mul(&factor)?;
            (merged.to_dtype(w.dtype())?, Some(norm))
        } else {
            (add_to(self.base.weight(), &delta, 1.0)?, None)
        };
        let bias = self.merged_bias(1.0)?;
        if safe_merge {
            check_finite(&self.module, &weight)?;
            if let Some(b) = &bias {
                check_finite(&self.module, b)?;
            }
        }
        self.base.set_weights(weight, bias);
        self.dora_merge_norm = dora_norm;
        self.merged = true;
        Ok(())
    }

    fn unmerge(&mut self) -> Result<()> {
        check_merge_state(&self.module, self.merged, false)?;
        let delta = self.delta_weight()?;
        let weight = match self.dora_merge_norm.take() {
            Some(norm) => {
                let factor = self.magnitude()?.div(&norm)?;
                let factor = dora::per_output_for_weight(&self.base, &factor)?;
                let w = self.base.weight();
                let unscaled = w
                    .to_dtype(delta.dtype())?
                    .broadcast_div(&factor)?
                    .sub(&delta)?;
                unscaled.to_dtype(w.dtype())?
            }
            None => add_to(self.base.weight(), &delta, -1.0)?,
        };
        let bias = self.merged_bias(-1.0)?;
        self.base.set_weights(weight, bias);
        self.merged = false;
        Ok(())
    }

    fn is_merged(&self) -> bool {
        self.merged
    }
}

impl LoraLayer {
    /// The base bias with `sign · s · lora_B.bias` added (`lora_bias`), or the base bias as is.
    fn merged_bias(&self, sign: f64) -> Result<Option<Tensor>> {
        let base_bias = self.base.bias().cloned();
        let Some(lora_bias) = self.params.get_opt(LORA_B_BIAS) else {
            return Ok(base_bias);
        };
        let base_bias = base_bias.ok_or_else(|| {
            PeftError::InvalidOperation(format!(
                "`{}`: lora_bias cannot be merged into a base layer without a bias",
                self.module
            ))
        })?;
        Ok(Some(add_to(&base_bias, &lora_bias, sign * self.scaling)?))
    }

    pub fn dtype(&self) -> DType {
        adapter_dtype(self.base.dtype())
    }
}

crate::params::impl_trainable!(LoraLayer);

/// Checks the tensors of a saved LoRA layer against the config: the pair for its module kind
/// must be there, with the rank the config gives the module, and `lora_B.bias` exactly when
/// `lora_bias` is set. Returns the module kind the tensors were saved for.
pub fn check_saved_layer(
    config: &LoraConfig,
    module: &str,
    tensors: &[(String, Tensor)],
) -> Result<ModuleKind> {
    let get = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t);
    let is_embedding = get(LORA_EMBEDDING_A).is_some() || get(LORA_EMBEDDING_B).is_some();
    let (a_name, b_name) = if is_embedding {
        (LORA_EMBEDDING_A, LORA_EMBEDDING_B)
    } else {
        (LORA_A, LORA_B)
    };
    let missing = |name: &str| PeftError::MissingKey {
        key: format!("{}{module}.{name}", crate::io::MODEL_PREFIX),
        context: "required for this LoRA layer by its config".into(),
    };
    let a = get(a_name).ok_or_else(|| missing(a_name))?;
    let b = get(b_name).ok_or_else(|| missing(b_name))?;
    let (r, _) = config.rank_and_alpha(module)?;
    let a_rank = a.dims().first().copied().unwrap_or(0);
    if a_rank != r || a.rank() < 2 {
        let mut expected = a.dims().to_vec();
        if expected.len() < 2 {
            expected = vec![r, 0];
        }
        expected[0] = r;
        return Err(PeftError::shape(
            format!(
                "{}{module}.{a_name} (config r={r})",
                crate::io::MODEL_PREFIX
            ),
            &expected,
            a.dims(),
        ));
    }
    // Conv2d B has r / groups input channels.
    let b_rank = b.dims().get(1).copied().unwrap_or(0);
    if b.rank() < 2 || b_rank == 0 || r % b_rank != 0 || (a.rank() == 2 && b_rank != r) {
        let mut expected = b.dims().to_vec();
        if expected.len() >= 2 {
            expected[1] = r;
        }
        return Err(PeftError::shape(
            format!(
                "{}{module}.{b_name} (config r={r})",
                crate::io::MODEL_PREFIX
            ),
            &expected,
            b.dims(),
        ));
    }
    // Optional tensors must be present exactly when the config asks for them.
    for (name, wanted, setting) in [
        (LORA_B_BIAS, config.lora_bias && !is_embedding, "lora_bias"),
        (LORA_MAGNITUDE, config.use_dora, "use_dora"),
    ] {
        match (wanted, get(name).is_some()) {
            (true, false) => return Err(missing(name)),
            (false, true) => {
                return Err(PeftError::UnexpectedKey {
                    key: format!("{}{module}.{name}", crate::io::MODEL_PREFIX),
                    context: format!("the config has {setting}=false"),
                });
            }
            _ => {}
        }
    }
    if let Some((name, _)) = tensors.iter().find(|(n, _)| {
        let allowed: &[&str] = if is_embedding {
            &[LORA_EMBEDDING_A, LORA_EMBEDDING_B, LORA_MAGNITUDE]
        } else {
            &[LORA_A, LORA_B, LORA_B_BIAS, LORA_MAGNITUDE]
        };
        !allowed.contains(&n.as_str())
    }) {
        return Err(PeftError::UnexpectedKey {
            key: format!("{}{module}.{name}", crate::io::MODEL_PREFIX),
            context: "mixes Embedding and Linear/Conv LoRA tensors".into(),
        });
    }
    Ok(if is_embedding {
        ModuleKind::Embedding
    } else if a.rank() == 4 {
        ModuleKind::Conv2d(Conv2dParams::default())
    } else if config.fan_in_fan_out {
        ModuleKind::Conv1D
    } else {
        ModuleKind::Linear
    })
}
