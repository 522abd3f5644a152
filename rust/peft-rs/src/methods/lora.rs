//! LoRA and rsLoRA (PEFT `tuners/lora`): `y = base(x) + s · B A dropout(x)`, with
//! `s = lora_alpha / r` (or `lora_alpha / sqrt(r)` with `use_rslora`).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::base::{BaseLayer, Conv2dParams, ModuleKind, conv2d, linear_rows};
use crate::config::{
    CommonFields, ModuleSelector, OneOrMany, check_extra_fields, number, parse_config,
};
use crate::error::{PeftError, Result};
use crate::init::Initializer;
use crate::kernels::linear::{Extras, LowRank, matmul_scaled};
use crate::matching::{Selection, check_pattern_keys, pattern_value};
use crate::merge::{adapter_dtype, row_norms};
use crate::method::{
    BiasMode, InferredBase, LayerAdapter, MergeRule, MethodConfig, MethodEntry, ParamSource,
    dims_of, dims_with_rank,
};
use crate::module::Below;
use crate::params::{Params, take_params};

pub const PEFT_TYPE: &str = "LORA";

pub const ENTRY: MethodEntry = MethodEntry {
    peft_type: PEFT_TYPE,
    config_class: "LoraConfig",
    from_json: |v| Ok(Arc::new(LoraConfig::from_json(v)?)),
};

/// File name of DoRA's magnitude (PEFT strips the module's `.weight`).
pub const LORA_MAGNITUDE: &str = "lora_magnitude_vector";

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

/// LoRA's `bias`: which base-model biases are trained and saved with the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    #[default]
    None,
    All,
    LoraOnly,
}

impl From<LoraBias> for BiasMode {
    fn from(b: LoraBias) -> Self {
        match b {
            LoraBias::None => BiasMode::None,
            LoraBias::All => BiasMode::All,
            LoraBias::LoraOnly => BiasMode::AdaptedOnly,
        }
    }
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
    pub bias: LoraBias,
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
            bias: LoraBias::None,
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
        if let Value::Object(map) = &mut value {
            // PEFT never writes it, but warns and drops it on load.
            map.remove("runtime_config");
        }
        parse_config(value, PEFT_TYPE)
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

impl LoraConfig {
    /// Checks every field; every constructor calls it, so a config in hand is valid.
    pub fn validate(&self) -> Result<()> {
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
        self.selection().validate()?;
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
        params.push((LORA_MAGNITUDE, magnitude_shape(base)));
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

impl MethodConfig for LoraConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn validate(&self) -> Result<()> {
        LoraConfig::validate(self)
    }

    fn fields(&self) -> Value {
        let mut value = serde_json::to_value(self).expect("LoraConfig serialises");
        if let Value::Object(map) = &mut value {
            for (k, v) in unsupported_defaults() {
                map.insert(k.into(), v);
            }
        }
        value
    }

    fn selection(&self) -> Selection<'_> {
        LoraConfig::selection(self)
    }

    fn bias_mode(&self) -> BiasMode {
        self.bias.into()
    }

    fn param_names(&self) -> &'static [&'static str] {
        PARAM_NAMES
    }

    fn rank_for(&self, module: &str) -> Result<Option<usize>> {
        Ok(Some(self.rank_and_alpha(module)?.0))
    }

    fn build(
        &self,
        module: &str,
        base: &BaseLayer,
        source: ParamSource,
        _shared: &BTreeMap<String, Tensor>,
    ) -> Result<Box<dyn LayerAdapter>> {
        Ok(Box::new(LoraAdapter::new(
            module,
            base,
            self.clone(),
            source,
        )?))
    }

    fn for_targets(&self, kinds: &[ModuleKind]) -> Result<Option<Arc<dyn MethodConfig>>> {
        let mut config = self.clone();
        crate::methods::adapt_fan_in_fan_out(&mut config.fan_in_fan_out, kinds)?;
        Ok(Some(Arc::new(config)))
    }

    /// Inputs (and kernel) from `lora_A`, outputs from `lora_B`; `lora_embedding_*` tell an
    /// Embedding.
    fn infer_base(
        &self,
        module: &str,
        tensors: &[(String, Tensor)],
        _shared: &BTreeMap<String, Tensor>,
    ) -> Result<Option<InferredBase>> {
        if dims_of(tensors, LORA_EMBEDDING_A).is_some()
            || dims_of(tensors, LORA_EMBEDDING_B).is_some()
        {
            let a = dims_with_rank(module, tensors, LORA_EMBEDDING_A, &[2])?;
            let b = dims_with_rank(module, tensors, LORA_EMBEDDING_B, &[2])?;
            return Ok(Some(InferredBase::embedding(a[1], b[0])));
        }
        let a = dims_with_rank(module, tensors, LORA_A, &[2, 4])?;
        let b = dims_with_rank(module, tensors, LORA_B, &[2, 4])?;
        Ok(Some(match a {
            [_, inp, kh, kw] => InferredBase::conv2d(b[0], *inp, *kh, *kw),
            _ => InferredBase::linear(b[0], a[1], self.fan_in_fan_out),
        }))
    }
}

/// DoRA's magnitude shape in PEFT's files: `(out,)`, or `(1, out, 1, 1)` for Conv2d.
fn magnitude_shape(base: &BaseLayer) -> Vec<usize> {
    match base.kind() {
        ModuleKind::Conv2d(_) => vec![1, base.out_features(), 1, 1],
        _ => vec![base.out_features()],
    }
}

/// A LoRA (or DoRA) adapter on one module.
#[derive(Debug)]
pub struct LoraAdapter {
    config: Arc<LoraConfig>,
    params: Params,
    kind: ModuleKind,
    r: usize,
    scaling: f64,
}

impl LoraAdapter {
    /// The adapter for `module` on `base`: given tensors, or initialised following
    /// `init_lora_weights`. A DoRA magnitude missing at initialisation is set to `‖W + s·BA‖`
    /// (the identity), as PEFT initialises it.
    pub fn new(
        module: &str,
        base: &BaseLayer,
        config: LoraConfig,
        source: ParamSource,
    ) -> Result<Self> {
        let (r, alpha) = config.rank_and_alpha(module)?;
        let expected = expected_params(base, r, config.lora_bias, config.use_dora)?;
        let dtype = adapter_dtype(base.dtype());
        let what = format!("LoRA {:?} r={r}", base.kind());
        let init = matches!(source, ParamSource::Init { .. });
        let given = match source {
            ParamSource::Given(tensors) => tensors,
            ParamSource::Init { seed } => init_params(&config, base, r, &expected, seed, dtype)?,
        };
        let expected: Vec<_> = expected
            .into_iter()
            .filter(|(n, _)| !(init && *n == LORA_MAGNITUDE))
            .collect();
        let params = take_params(module, &what, given, &expected, dtype, base.device())?;
        let mut adapter = Self {
            scaling: config.scaling(r, alpha),
            config: Arc::new(config),
            params,
            kind: base.kind(),
            r,
        };
        if adapter.config.use_dora && init {
            let norm = row_norms(base, &base.weight()?, &adapter.delta_weight(base)?)?;
            adapter
                .params
                .push(LORA_MAGNITUDE, norm.reshape(magnitude_shape(base))?);
        }
        Ok(adapter)
    }

    pub fn r(&self) -> usize {
        self.r
    }

    pub fn scaling(&self) -> f64 {
        self.scaling
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
        match self.kind {
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

    /// `s · B A` in the base weight's layout.
    fn delta_weight(&self, base: &BaseLayer) -> Result<Tensor> {
        let s = self.scaling;
        match self.kind {
            ModuleKind::Linear => {
                matmul_scaled(&self.params.get(LORA_B)?, &self.params.get(LORA_A)?, s)
            }
            // (B·A)ᵀ = Aᵀ·Bᵀ, computed in Conv1D's `(in, out)` layout directly.
            ModuleKind::Conv1D => matmul_scaled(
                &self.params.get(LORA_A)?.t()?,
                &self.params.get(LORA_B)?.t()?,
                s,
            ),
            ModuleKind::Embedding => {
                let a = self.params.get(LORA_EMBEDDING_A)?;
                let b = self.params.get(LORA_EMBEDDING_B)?;
                Ok(a.t()?.matmul(&b.t()?)?.affine(s, 0.0)?)
            }
            ModuleKind::Conv2d(p) => {
                if p.groups != 1 {
                    return Err(PeftError::InvalidOperation(format!(
                        "merging LoRA into a grouped Conv2d (groups={}) is not supported, as in PEFT",
                        p.groups
                    )));
                }
                let a = self.params.get(LORA_A)?;
                let b = self.params.get(LORA_B)?;
                let b2 = b.reshape((b.dim(0)?, self.r))?;
                let a2 = a.reshape((self.r, ()))?;
                Ok(matmul_scaled(&b2, &a2, s)?.reshape(base.weight_dims())?)
            }
        }
    }

    /// `s · lora_B.bias` (`lora_bias`).
    /// The base layer and this adapter in one pass where the fused kernel applies. DoRA's
    /// `m/‖W + ΔW‖ ⊙ (W x + ΔW x) + b` is the low-rank term with an output scale before the
    /// bias (f32 only: PEFT's bf16 DoRA rounds in between, which the plain path follows).
    fn fused_forward(&self, x: &Tensor, below: &Below<'_>) -> Result<Option<Tensor>> {
        let linear = matches!(self.kind, ModuleKind::Linear | ModuleKind::Conv1D);
        if !linear || (self.config.use_dora && x.dtype() != DType::F32) {
            return Ok(None);
        }
        below.fused(x, self.config.lora_dropout, || {
            let term = LowRank::new(
                self.params.get(LORA_A)?,
                self.params.get(LORA_B)?,
                self.params.get_opt(LORA_B_BIAS),
                self.scaling,
            );
            if !self.config.use_dora {
                return Ok(Extras::low_rank(term));
            }
            let base = below.base();
            let norm = row_norms(base, &base.dense_weight()?, &self.delta_weight(base)?)?;
            let magnitude = self.params.get(LORA_MAGNITUDE)?.flatten_all()?;
            Ok(Extras {
                out_scale: Some(magnitude.div(&norm)?),
                unscaled_bias: true,
                ..Extras::low_rank(term)
            })
        })
    }

    fn bias_delta(&self) -> Result<Option<Tensor>> {
        Ok(self
            .params
            .get_opt(LORA_B_BIAS)
            .map(|b| b.affine(self.scaling, 0.0))
            .transpose()?)
    }
}

impl LayerAdapter for LoraAdapter {
    fn config(&self) -> &dyn MethodConfig {
        &*self.config
    }

    fn params(&self) -> &Params {
        &self.params
    }

    fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }

    /// PEFT's forward: the LoRA path runs in the adapter dtype, is added to the output below in
    /// that (promoted) dtype, and the sum is cast back to that output's dtype.
    fn forward(&self, x: &Tensor, below: &Below<'_>) -> Result<Tensor> {
        if let Some(y) = self.fused_forward(x, below)? {
            return Ok(y);
        }
        let result = below.forward(x)?;
        let base = below.base();
        let dtype = adapter_dtype(base.dtype());
        let out_dtype = result.dtype();
        let base_out = result.to_dtype(dtype)?;
        let is_embedding = self.kind == ModuleKind::Embedding;
        let x_d = if is_embedding {
            x.clone()
        } else {
            below.dropout(&x.to_dtype(dtype)?, self.config.lora_dropout)?
        };
        let lora = self.lora_path(&x_d)?;
        if !self.config.use_dora {
            return Ok(base_out.add(&lora)?.to_dtype(out_dtype)?);
        }
        // DoRA: m / ‖W + s·BA‖ per output feature, with W the weight beneath this adapter; the
        // norm carries no gradient, m does.
        let (weight, bias) = below.weights()?;
        let norm = row_norms(base, &weight, &self.delta_weight(base)?)?;
        let magnitude = self.params.get(LORA_MAGNITUDE)?.flatten_all()?;
        let mag = base.per_output(&magnitude.div(&norm)?, base_out.rank())?;
        let out = if is_embedding {
            // DoRA rescales the whole embedding output.
            base_out
                .broadcast_mul(&mag)?
                .add(&lora.broadcast_mul(&mag)?)?
        } else {
            // (m/‖W+sBA‖ − 1)·W x + (m/‖W+sBA‖)·s·BA x on top of the output below; with dropout
            // active the W x term uses the dropped-out input, as in PEFT.
            let wx = if below.training() && self.config.lora_dropout > 0.0 {
                base.forward_with(&x_d, &weight.to_dtype(dtype)?, None)?
            } else {
                match bias {
                    Some(b) => base_out
                        .broadcast_sub(&base.per_output(&b.to_dtype(dtype)?, base_out.rank())?)?,
                    None => base_out.clone(),
                }
            };
            let extra = wx
                .broadcast_mul(&(&mag - 1.0)?)?
                .add(&lora.broadcast_mul(&mag)?)?;
            base_out.add(&extra)?
        };
        Ok(out.to_dtype(out_dtype)?)
    }

    fn additive_term(&self, x: &Tensor, base: &BaseLayer) -> Result<Option<Tensor>> {
        if self.config.use_dora {
            return Ok(None);
        }
        // Mixed batches are inference only: no dropout.
        let x = if self.kind == ModuleKind::Embedding {
            x.clone()
        } else {
            x.to_dtype(adapter_dtype(base.dtype()))?
        };
        Ok(Some(self.lora_path(&x)?))
    }

    fn merge_rule(&self, base: &BaseLayer) -> Result<MergeRule> {
        let bias = self.bias_delta()?;
        if self.kind == ModuleKind::Linear && !self.config.use_dora {
            return Ok(MergeRule::AddProduct {
                left: self.params.get(LORA_B)?,
                right: self.params.get(LORA_A)?,
                scale: self.scaling,
                bias,
            });
        }
        let delta = self.delta_weight(base)?;
        Ok(if self.config.use_dora {
            MergeRule::Magnitude {
                delta,
                magnitude: self.params.get(LORA_MAGNITUDE)?,
                bias,
            }
        } else {
            MergeRule::Add { delta, bias }
        })
    }
}

/// Fresh tensors following `init_lora_weights` (DoRA's magnitude is derived afterwards).
fn init_params(
    config: &LoraConfig,
    base: &BaseLayer,
    r: usize,
    expected: &[(&'static str, Vec<usize>)],
    seed: u64,
    dtype: DType,
) -> Result<Vec<(String, Tensor)>> {
    let mut init = Initializer::new(seed);
    let dev = &candle_core::Device::Cpu;
    let mut weights = Vec::new();
    for (name, shape) in expected {
        let shape = shape.as_slice();
        let t = match (&config.init_lora_weights, *name) {
            (_, LORA_MAGNITUDE) => continue,
            // Embedding is the reverse of Linear: A zero, B standard normal.
            (LoraInit::Flag(false), LORA_EMBEDDING_A | LORA_EMBEDDING_B) => {
                init.normal(shape, 1.0, dtype)?
            }
            (_, LORA_EMBEDDING_A) => Tensor::zeros(shape, dtype, dev)?,
            (_, LORA_EMBEDDING_B) => init.normal(shape, 1.0, dtype)?,
            // `false` keeps PyTorch's default Linear/Conv init for A, B and B's bias, whose
            // fan-in is B's: r / groups.
            (LoraInit::Flag(false), LORA_B_BIAS) => {
                let groups = match base.kind() {
                    ModuleKind::Conv2d(p) => p.groups,
                    _ => 1,
                };
                init.uniform(shape, 1.0 / ((r / groups) as f64).sqrt(), dtype)?
            }
            (LoraInit::Flag(false), _) => init.kaiming_uniform(shape, dtype)?,
            (LoraInit::Named(_), LORA_A) => init.normal(shape, 1.0 / r as f64, dtype)?,
            (LoraInit::Flag(true), LORA_A) => init.kaiming_uniform(shape, dtype)?,
            _ => Tensor::zeros(shape, dtype, dev)?,
        };
        weights.push((name.to_string(), t));
    }
    Ok(weights)
}

#[cfg(test)]
mod infer_tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::config::PeftConfig;
    use crate::method::InferredBase;
    use crate::peft_adapter::{BaseModule, PeftAdapter};

    fn zeros(dims: &[usize]) -> Tensor {
        Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap()
    }

    fn named(items: &[(&str, &[usize])]) -> Vec<(String, Tensor)> {
        items
            .iter()
            .map(|(n, d)| (n.to_string(), zeros(d)))
            .collect()
    }

    #[test]
    fn infer_base_reads_every_layer_kind() {
        let config = LoraConfig::default();
        let none = BTreeMap::new();
        let infer = |c: &LoraConfig, t: &[(String, Tensor)]| c.infer_base("m", t, &none).unwrap();
        let linear = named(&[(LORA_A, &[8, 10]), (LORA_B, &[20, 8])]);
        assert_eq!(
            infer(&config, &linear),
            Some(InferredBase::linear(20, 10, false))
        );
        let gpt2 = LoraConfig {
            fan_in_fan_out: true,
            ..LoraConfig::default()
        };
        let conv1d = infer(&gpt2, &linear).unwrap();
        assert_eq!(
            (conv1d.kind, conv1d.dims),
            (ModuleKind::Conv1D, vec![10, 20])
        );
        let emb = named(&[(LORA_EMBEDDING_A, &[8, 50]), (LORA_EMBEDDING_B, &[12, 8])]);
        assert_eq!(infer(&config, &emb), Some(InferredBase::embedding(50, 12)));
        let conv = named(&[(LORA_A, &[8, 3, 3, 3]), (LORA_B, &[4, 8, 1, 1])]);
        assert_eq!(
            infer(&config, &conv),
            Some(InferredBase::conv2d(4, 3, 3, 3))
        );
        // A missing or flat tensor is named.
        let err = config
            .infer_base("m", &named(&[(LORA_A, &[8])]), &none)
            .unwrap_err()
            .to_string();
        assert!(err.contains("base_model.model.m.lora_A.weight"), "{err}");
    }

    #[test]
    fn check_finds_rank_mismatch_without_a_model() {
        let config = LoraConfig {
            r: 8,
            target_modules: Some(crate::config::ModuleSelector::Names(vec!["q".into()])),
            use_dora: true,
            ..LoraConfig::default()
        };
        let config = PeftConfig::new(Arc::new(config)).unwrap();
        let base = BaseLayer::new(ModuleKind::Linear, zeros(&[384, 384]), None).unwrap();
        let modules = vec![BaseModule {
            name: "q".into(),
            layer: base,
        }];
        let adapter =
            PeftAdapter::create("default", config.clone(), modules, &HashMap::new(), 0).unwrap();
        assert!(adapter.check().is_empty(), "{:?}", adapter.check());
        let tensors = adapter
            .to_state_dict()
            .into_iter()
            .map(|(k, t)| match k.ends_with("lora_B.weight") {
                true => (k, zeros(&[384, 4])),
                false => (k, t),
            })
            .collect();
        let bad = PeftAdapter::from_state_dict("default", config, tensors).unwrap();
        let problems = bad.check();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].module, "q");
        let msg = &problems[0].message;
        assert!(msg.contains("base_model.model.q.lora_B.weight"), "{msg}");
        assert!(
            msg.contains("[384, 8]") && msg.contains("[384, 4]"),
            "{msg}"
        );
    }
}
