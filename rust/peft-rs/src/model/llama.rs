//! Llama as transformers 5 computes it in eval mode: [`LlamaForCausalLM`] (logits), with a
//! per-call KV cache and greedy [`Model::generate`].
//!
//! Every `nn.Linear` and `nn.Embedding` (`model.embed_tokens`, the attention and MLP projections,
//! `lm_head`) is a peft-rs [`Layer`] named by its transformers module path, so adapters target it
//! as PEFT would. RMSNorm weights are plain tensors. Rotary embeddings cover every `rope_type`
//! transformers computes for Llama; their frequencies are computed in f32 step by step as
//! transformers does.

use std::f64::consts::PI;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::checkpoint::{read_model_config, var_builder};
use super::{HiddenAct, Layer, Model, ModelBuilder, ModelInput, Modules};
use crate::error::{PeftError, Result};

/// The `config.json` fields the forward and `generate` depend on, with `LlamaConfig`'s defaults.
/// Training-only keys (`attention_dropout`, `initializer_range`, `pretraining_tp`...) are
/// ignored, as transformers ignores them in eval.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention; `None` = `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// `None` = `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub hidden_act: HiddenAct,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// transformers 5's RoPE settings (`rope_type`, `rope_theta`, `factor`...).
    pub rope_parameters: Option<Value>,
    /// The older names: a non-empty `rope_scaling` replaces `rope_parameters`; `rope_theta`
    /// and `partial_rotary_factor` fill keys the dict lacks.
    pub rope_scaling: Option<Value>,
    pub rope_theta: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
    /// When present at the top level it wins over the dict's value (llama3, yarn, longrope).
    pub original_max_position_embeddings: Option<f64>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<u32>,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: HiddenAct::Silu,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_parameters: None,
            rope_scaling: None,
            rope_theta: None,
            partial_rotary_factor: None,
            original_max_position_embeddings: None,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            eos_token_id: Some(TokenIds::One(2)),
            pad_token_id: None,
        }
    }
}

/// A token id or a list of them (`eos_token_id`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

impl LlamaConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut config: Self = read_model_config(dir)?;
        // `generate` takes eos/pad from generation_config.json when the directory has one.
        let generation = dir.join("generation_config.json");
        if generation.is_file() {
            let tokens: GenerationTokens = read_json(&generation)?;
            config.eos_token_id = tokens.eos_token_id;
            config.pad_token_id = tokens.pad_token_id;
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let heads = self.num_attention_heads;
        if heads == 0 || !self.hidden_size.is_multiple_of(heads) {
            return Err(PeftError::config(
                "num_attention_heads",
                format!(
                    "The hidden size ({}) is not a multiple of the number of attention heads \
                     ({heads}).",
                    self.hidden_size
                ),
            ));
        }
        let kv_heads = self.kv_heads();
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(PeftError::config(
                "num_key_value_heads",
                format!("{kv_heads} key/value heads cannot be shared by {heads} attention heads"),
            ));
        }
        let head_dim = self.head_dim();
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(PeftError::config(
                "head_dim",
                format!("RoPE needs a positive even head_dim, found {head_dim}"),
            ));
        }
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(PeftError::config(field, "must be positive"));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(PeftError::config(
                "rms_norm_eps",
                format!(
                    "must be a finite non-negative number, found {}",
                    self.rms_norm_eps
                ),
            ));
        }
        RopeConfig::from_config(self).map(|_| ())
    }

    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

/// The token ids of `generation_config.json` that greedy decoding uses.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct GenerationTokens {
    eos_token_id: Option<TokenIds>,
    pad_token_id: Option<u32>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    crate::config::deserialize_fields(value)
}

// ---------------------------------------------------------------------------------------------
// Rotary position embeddings

/// One `rope_type` and its parameters, after transformers' standardisation of the config.
#[derive(Debug, Clone, PartialEq)]
enum RopeType {
    Default,
    Linear {
        factor: f64,
    },
    Dynamic {
        factor: f64,
    },
    Yarn(Yarn),
    LongRope(LongRope),
    Llama3(Llama3),
    Proportional {
        factor: f64,
        partial_rotary_factor: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct Yarn {
    /// `None`: `max_position_embeddings / original_max`.
    factor: Option<f64>,
    original_max: f64,
    attention_factor: Option<f64>,
    beta_fast: f64,
    beta_slow: f64,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    truncate: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct LongRope {
    short_factor: Vec<f64>,
    long_factor: Vec<f64>,
    original_max: f64,
    factor: Option<f64>,
    attention_factor: Option<f64>,
}

impl LongRope {
    /// `attention_factor`, else `√(1 + ln f / ln original_max)` (1 for f ≤ 1), where `factor`
    /// defaults to `max_position_embeddings / original_max`.
    fn attention_scaling(&self, max_positions: usize) -> f64 {
        let factor = self
            .factor
            .unwrap_or(max_positions as f64 / self.original_max);
        self.attention_factor.unwrap_or(if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / self.original_max.ln()).sqrt()
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Llama3 {
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max: f64,
}

#[derive(Debug, Clone, PartialEq)]
struct RopeConfig {
    theta: f64,
    kind: RopeType,
}

const ROPE_TYPES: &str = "default, linear, dynamic, yarn, longrope, llama3, proportional";

/// The RoPE dict being read (errors name `rope_parameters.<key>`), with the config around it.
struct RopeDict<'a> {
    field: &'static str,
    map: &'a Map<String, Value>,
    rope_type: &'a str,
    cfg: &'a LlamaConfig,
}

impl RopeDict<'_> {
    fn error(&self, key: &str, reason: impl Into<String>) -> PeftError {
        PeftError::config(&format!("{}.{key}", self.field), reason)
    }

    /// A number, `None` when absent or null.
    fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.error(key, format!("must be a number, found {v}"))),
        }
    }

    /// transformers' message for a missing required key.
    fn missing(&self, key: &str) -> PeftError {
        let message = "Missing required keys in `rope_parameters` for";
        let rope_type = self.rope_type;
        self.error(
            key,
            format!("{message} 'rope_type'='{rope_type}': {{'{key}'}}"),
        )
    }

    /// A required factor: finite and positive (transformers divides by it).
    fn factor(&self, key: &str) -> Result<f64> {
        let value = self.number(key)?.ok_or_else(|| self.missing(key))?;
        self.positive(key, value)
    }

    fn positive(&self, key: &str, value: f64) -> Result<f64> {
        if value.is_finite() && value > 0.0 {
            Ok(value)
        } else {
            Err(self.error(key, format!("must be a positive number, found {value}")))
        }
    }

    fn numbers(&self, key: &str, len: usize) -> Result<Vec<f64>> {
        let list = match self.map.get(key) {
            None | Some(Value::Null) => return Err(self.missing(key)),
            Some(Value::Array(items)) => items
                .iter()
                .map(Value::as_f64)
                .collect::<Option<Vec<f64>>>(),
            Some(_) => None,
        };
        let list = list.ok_or_else(|| self.error(key, "must be a list of numbers"))?;
        if list.len() != len {
            return Err(self.error(
                key,
                format!(
                    "must have length {len} (head_dim / 2), found {}",
                    list.len()
                ),
            ));
        }
        Ok(list)
    }

    fn flag(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.error(key, format!("must be a boolean, found {v}"))),
        }
    }
}

impl RopeConfig {
    /// transformers' `convert_rope_params_to_dict` + `standardize_rope_params`, then the
    /// per-type required keys. What transformers rejects or fails on is a config error.
    fn from_config(cfg: &LlamaConfig) -> Result<Self> {
        let empty = Map::new();
        let (field, value) = rope_source(cfg);
        let map = match value {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(map)) => map,
            Some(other) => {
                let reason = format!("must be an object, found {other}");
                return Err(PeftError::config(field, reason));
            }
        };
        let rope_type = match map.get("rope_type").or_else(|| map.get("type")) {
            None | Some(Value::Null) => "default",
            Some(Value::String(s)) => s.as_str(),
            Some(v) => {
                let reason = format!("must be a string, found {v}");
                return Err(PeftError::config(&format!("{field}.rope_type"), reason));
            }
        };
        let dict = RopeDict {
            field,
            map,
            rope_type,
            cfg,
        };
        let theta = dict.number("rope_theta")?.or(cfg.rope_theta);
        let theta = dict.positive("rope_theta", theta.unwrap_or(10_000.0))?;
        let kind = match rope_type {
            "default" => RopeType::Default,
            "linear" => RopeType::Linear {
                factor: dict.factor("factor")?,
            },
            "dynamic" => dict.dynamic()?,
            "yarn" => RopeType::Yarn(dict.yarn()?),
            "longrope" => RopeType::LongRope(dict.longrope()?),
            "llama3" => RopeType::Llama3(dict.llama3()?),
            "proportional" => dict.proportional()?,
            other => {
                let reason = format!("unknown rope_type {other:?}; Llama supports {ROPE_TYPES}");
                return Err(dict.error("rope_type", reason));
            }
        };
        if !matches!(kind, RopeType::Default | RopeType::Proportional { .. }) {
            dict.check_full_width()?;
        }
        Ok(Self { theta, kind })
    }
}

/// Which dict holds the RoPE settings: transformers' `rope_scaling or rope_parameters`, so a
/// non-empty legacy `rope_scaling` wins.
fn rope_source(cfg: &LlamaConfig) -> (&'static str, Option<&Value>) {
    match &cfg.rope_scaling {
        None | Some(Value::Null) => ("rope_parameters", cfg.rope_parameters.as_ref()),
        Some(Value::Object(map)) if map.is_empty() => {
            ("rope_parameters", cfg.rope_parameters.as_ref())
        }
        Some(scaling) => ("rope_scaling", Some(scaling)),
    }
}

/// The per-type parameters.
impl RopeDict<'_> {
    fn partial_rotary_factor(&self) -> Result<Option<f64>> {
        Ok(self
            .number("partial_rotary_factor")?
            .or(self.cfg.partial_rotary_factor))
    }

    /// Only `default` ignores `partial_rotary_factor`; the other types compute frequencies for
    /// `int(head_dim · p)` dimensions, which Llama's full-width rotation cannot use.
    fn check_full_width(&self) -> Result<()> {
        let head_dim = self.cfg.head_dim();
        match self.partial_rotary_factor()? {
            Some(p) if (head_dim as f64 * p).floor() != head_dim as f64 => Err(self.error(
                "partial_rotary_factor",
                format!(
                    "Llama rotates the whole head; rope_type '{}' with partial_rotary_factor {p} \
                     rotates {} of its {head_dim} dimensions (transformers fails on it)",
                    self.rope_type,
                    (head_dim as f64 * p).floor()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// A top-level `original_max_position_embeddings` wins over the dict's; the default is
    /// `max_position_embeddings`.
    fn original_max(&self) -> Result<f64> {
        let value = match self.cfg.original_max_position_embeddings {
            Some(top_level) => top_level,
            None => self
                .number("original_max_position_embeddings")?
                .unwrap_or(self.cfg.max_position_embeddings as f64),
        };
        self.positive("original_max_position_embeddings", value)
    }

    /// An optional factor, positive when given.
    fn optional_factor(&self, key: &str) -> Result<Option<f64>> {
        self.number(key)?.map(|f| self.positive(key, f)).transpose()
    }

    fn dynamic(&self) -> Result<RopeType> {
        if self.cfg.head_dim() <= 2 {
            return Err(PeftError::config(
                "head_dim",
                "dynamic RoPE needs head_dim > 2 (its exponent is dim / (dim - 2))",
            ));
        }
        Ok(RopeType::Dynamic {
            factor: self.factor("factor")?,
        })
    }

    fn yarn(&self) -> Result<Yarn> {
        // `factor` is a required key, but null means `max_position / original_max`.
        if !self.map.contains_key("factor") {
            return Err(self.missing("factor"));
        }
        // transformers reads `get("beta_fast") or 32`: 0 also means the default.
        let beta = |key: &str, default: f64| -> Result<f64> {
            Ok(self.number(key)?.filter(|b| *b != 0.0).unwrap_or(default))
        };
        Ok(Yarn {
            factor: self.optional_factor("factor")?,
            original_max: self.original_max()?,
            attention_factor: self.number("attention_factor")?,
            beta_fast: beta("beta_fast", 32.0)?,
            beta_slow: beta("beta_slow", 1.0)?,
            mscale: self.number("mscale")?,
            mscale_all_dim: self.number("mscale_all_dim")?,
            truncate: self.flag("truncate")?.unwrap_or(true),
        })
    }

    fn longrope(&self) -> Result<LongRope> {
        let half = self.cfg.head_dim() / 2;
        Ok(LongRope {
            short_factor: self.numbers("short_factor", half)?,
            long_factor: self.numbers("long_factor", half)?,
            original_max: self.original_max()?,
            factor: self.optional_factor("factor")?,
            attention_factor: self.number("attention_factor")?,
        })
    }

    fn llama3(&self) -> Result<Llama3> {
        let low = self.factor("low_freq_factor")?;
        let high = self.factor("high_freq_factor")?;
        if high <= low {
            let reason = format!("must be greater than low_freq_factor ({low}), found {high}");
            return Err(self.error("high_freq_factor", reason));
        }
        Ok(Llama3 {
            factor: self.factor("factor")?,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max: self.original_max()?,
        })
    }

    fn proportional(&self) -> Result<RopeType> {
        let p = self.partial_rotary_factor()?.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&p) {
            let reason = format!("must be in [0, 1] for proportional RoPE, found {p}");
            return Err(self.error("partial_rotary_factor", reason));
        }
        Ok(RopeType::Proportional {
            factor: self.optional_factor("factor")?.unwrap_or(1.0),
            partial_rotary_factor: p,
        })
    }
}

/// `1 / θ^(2i/dim)` for `i < dim/2`, in f32 as torch computes
/// `1.0 / (base ** (arange(0, dim, 2) / dim))`.
fn inverse_frequencies(theta: f32, dim: usize) -> Vec<f32> {
    (0..dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / dim as f32))
        .collect()
}

/// What makes frequencies depend on the positions of a forward.
#[derive(Debug, Clone)]
enum RopeUpdate {
    Fixed,
    /// Recomputed for `seq_len = max(position) + 1` beyond `max_positions`. (A transformers
    /// model also remembers the largest length it has seen across calls; this one, like a freshly
    /// loaded transformers model, uses the current call's length. Within one `generate` the
    /// two agree.)
    Dynamic {
        factor: f64,
        theta: f64,
        max_positions: usize,
    },
    /// The long factors once `max(position) + 1` exceeds `original_max`.
    LongRope {
        long: Tensor,
        original_max: f64,
    },
}

/// `LlamaRotaryEmbedding`: frequencies (f32) and the cos/sin scale (`attention_scaling`).
#[derive(Debug, Clone)]
struct Rotary {
    inv_freq: Tensor,
    attention_scaling: f64,
    update: RopeUpdate,
    dim: usize,
}

impl Rotary {
    fn new(cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let rope = RopeConfig::from_config(cfg)?;
        let dim = cfg.head_dim();
        let max_positions = cfg.max_position_embeddings;
        let theta = rope.theta as f32;
        let mut update = RopeUpdate::Fixed;
        let (inv_freq, attention_scaling) = match &rope.kind {
            RopeType::Default => (inverse_frequencies(theta, dim), 1.0),
            RopeType::Linear { factor } => {
                let f = *factor as f32;
                let inv = inverse_frequencies(theta, dim);
                (inv.into_iter().map(|v| v / f).collect(), 1.0)
            }
            RopeType::Dynamic { factor } => {
                update = RopeUpdate::Dynamic {
                    factor: *factor,
                    theta: rope.theta,
                    max_positions,
                };
                // At init (seq_len = max_position_embeddings) Python floats give θ itself back.
                let ratio = factor * max_positions as f64 / max_positions as f64 - (factor - 1.0);
                let base = rope.theta * ratio.powf(dim as f64 / (dim as f64 - 2.0));
                (inverse_frequencies(base as f32, dim), 1.0)
            }
            RopeType::Yarn(params) => yarn(params, rope.theta, dim, max_positions),
            RopeType::LongRope(params) => {
                let long = scaled_frequencies(theta, dim, &params.long_factor);
                update = RopeUpdate::LongRope {
                    long: Tensor::new(long, device)?,
                    original_max: params.original_max,
                };
                let short = scaled_frequencies(theta, dim, &params.short_factor);
                (short, params.attention_scaling(max_positions))
            }
            RopeType::Llama3(params) => (llama3(params, rope.theta, dim), 1.0),
            RopeType::Proportional {
                factor,
                partial_rotary_factor,
            } => (
                proportional(theta, dim, *factor, *partial_rotary_factor),
                1.0,
            ),
        };
        Ok(Self {
            inv_freq: Tensor::new(inv_freq, device)?,
            attention_scaling,
            update,
            dim,
        })
    }

    /// The frequencies for a forward whose largest position is `max_position`.
    fn frequencies(&self, max_position: usize) -> Result<Tensor> {
        let seq_len = max_position + 1;
        Ok(match &self.update {
            RopeUpdate::Fixed => self.inv_freq.clone(),
            RopeUpdate::Dynamic {
                factor,
                theta,
                max_positions,
            } if seq_len > *max_positions => {
                // transformers recomputes with 0-d f32 tensors here, so f32 arithmetic.
                let ratio = (*factor as f32 * seq_len as f32) / *max_positions as f32
                    - (*factor - 1.0) as f32;
                let exponent = (self.dim as f64 / (self.dim as f64 - 2.0)) as f32;
                let base = *theta as f32 * ratio.powf(exponent);
                Tensor::new(inverse_frequencies(base, self.dim), self.inv_freq.device())?
            }
            RopeUpdate::LongRope { long, original_max } if seq_len as f64 > *original_max => {
                long.clone()
            }
            _ => self.inv_freq.clone(),
        })
    }

    /// cos and sin of `positions · inv_freq` (f32), times `attention_scaling`, in `dtype`:
    /// `(seq, dim/2)` for positions shared by every row, `(batch, seq, dim/2)` otherwise.
    fn cos_sin(&self, positions: &Positions, dtype: DType) -> Result<(Tensor, Tensor)> {
        let inv_freq = self.frequencies(positions.max)?;
        let freqs = positions
            .values
            .unsqueeze(D::Minus1)?
            .broadcast_mul(&inv_freq)?;
        let scale = |t: Tensor| -> Result<Tensor> {
            let t = if self.attention_scaling == 1.0 {
                t
            } else {
                (t * self.attention_scaling)?
            };
            Ok(t.to_dtype(dtype)?.contiguous()?)
        };
        Ok((scale(freqs.cos()?)?, scale(freqs.sin()?)?))
    }
}

/// LongRoPE: `1 / (ext_i · θ^(2i/dim))` in f32.
fn scaled_frequencies(theta: f32, dim: usize, ext: &[f64]) -> Vec<f32> {
    (0..dim)
        .step_by(2)
        .zip(ext)
        .map(|(i, e)| 1.0 / (*e as f32 * theta.powf(i as f32 / dim as f32)))
        .collect()
}

/// YaRN: extrapolated frequencies for the fast dimensions, interpolated (`/ factor`) for the
/// slow ones, a linear ramp between; the cos/sin scale from `attention_factor` or `mscale`.
fn yarn(y: &Yarn, theta: f64, dim: usize, max_positions: usize) -> (Vec<f32>, f64) {
    let factor = y.factor.unwrap_or(max_positions as f64 / y.original_max);
    let get_mscale = |scale: f64, m: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    };
    let scaling = y
        .attention_factor
        .unwrap_or(match (y.mscale, y.mscale_all_dim) {
            (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                get_mscale(factor, m) / get_mscale(factor, a)
            }
            _ => get_mscale(factor, 1.0),
        });
    // The dimension whose wavelength makes `rotations` turns over the original context.
    let correction = |rotations: f64| {
        dim as f64 * (y.original_max / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (correction(y.beta_fast), correction(y.beta_slow));
    if y.truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min((dim - 1) as f64));
    if low == high {
        high += 0.001;
    }
    let theta = theta as f32;
    let inv = (0..dim / 2)
        .map(|i| {
            let pos = theta.powf((2 * i) as f32 / dim as f32);
            let extrapolation = 1.0 / pos;
            let interpolation = 1.0 / (factor as f32 * pos);
            let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
            let keep = 1.0 - ramp;
            interpolation * (1.0 - keep) + extrapolation * keep
        })
        .collect();
    (inv, scaling)
}

/// Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
fn llama3(l: &Llama3, theta: f64, dim: usize) -> Vec<f32> {
    let (low, high) = (l.low_freq_factor, l.high_freq_factor);
    let low_wavelen = (l.original_max / low) as f32;
    let high_wavelen = (l.original_max / high) as f32;
    let factor = l.factor as f32;
    inverse_frequencies(theta as f32, dim)
        .into_iter()
        .map(|inv| {
            let wavelen = (2.0 * PI) as f32 / inv;
            let scaled = if wavelen > low_wavelen {
                inv / factor
            } else {
                inv
            };
            if wavelen < high_wavelen || wavelen > low_wavelen {
                return scaled;
            }
            let smooth = (l.original_max as f32 / wavelen - low as f32) / (high - low) as f32;
            (1.0 - smooth) * scaled / factor + smooth * scaled
        })
        .collect()
}

/// Proportional RoPE: the first `⌊p·head_dim/2⌋` frequencies (exponents over the full head),
/// zeros (no rotation) for the rest, all divided by `factor`.
fn proportional(theta: f32, head_dim: usize, factor: f64, partial: f64) -> Vec<f32> {
    let angles = ((partial * head_dim as f64) / 2.0).floor() as usize;
    let factor = factor as f32;
    (0..head_dim / 2)
        .map(|i| {
            let inv = if i < angles {
                1.0 / theta.powf((2 * i) as f32 / head_dim as f32)
            } else {
                0.0
            };
            inv / factor
        })
        .collect()
}

/// Position ids of one forward (f32): `(seq,)` shared by every row or `(batch, seq)`, and their
/// largest value (dynamic and long RoPE depend on it).
struct Positions {
    values: Tensor,
    max: usize,
}

impl Positions {
    /// `past .. past + seq` for every row, as transformers' forward numbers tokens.
    fn range(past: usize, seq: usize, device: &Device) -> Result<Self> {
        let values =
            Tensor::arange(past as u32, (past + seq) as u32, device)?.to_dtype(DType::F32)?;
        Ok(Self {
            values,
            max: past + seq - 1,
        })
    }

    fn per_row(rows: &[Vec<u32>], device: &Device) -> Result<Self> {
        let max = rows.iter().flatten().copied().max().unwrap_or(0) as usize;
        let seq = rows.first().map_or(0, Vec::len);
        let flat: Vec<f32> = rows.iter().flatten().map(|&p| p as f32).collect();
        Ok(Self {
            values: Tensor::from_vec(flat, (rows.len(), seq), device)?,
            max,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Layers

/// `LlamaRMSNorm`: normalised in f32, cast back to the input dtype, then scaled by the weight.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_rms = (variance + self.eps)?.sqrt()?.recip()?;
        let normed = x32.broadcast_mul(&inv_rms)?.to_dtype(x.dtype())?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

/// Rotated keys and values of one layer, `(batch, kv_heads, seq, head_dim)`.
type LayerCache = Option<(Tensor, Tensor)>;

/// The keys and values of every layer so far, for one generation call (the model itself holds
/// no state, so it can serve several calls at once).
struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    fn seq_len(&self) -> Result<usize> {
        Ok(match self.layers.first() {
            Some(Some((k, _))) => k.dim(2)?,
            _ => 0,
        })
    }
}

/// `LlamaAttention` with grouped-query attention.
struct Attention {
    q_proj: Layer,
    k_proj: Layer,
    v_proj: Layer,
    o_proj: Layer,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(b: &ModelBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.kv_heads());
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: b.pp("q_proj").linear(h, heads * d, bias)?,
            k_proj: b.pp("k_proj").linear(h, kv_heads * d, bias)?,
            v_proj: b.pp("v_proj").linear(h, kv_heads * d, bias)?,
            o_proj: b.pp("o_proj").linear(heads * d, h, bias)?,
            heads,
            kv_heads,
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize| -> Result<Tensor> {
            Ok(t.reshape((batch, seq, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.q_proj.forward(x)?, self.heads)?;
        let k = split(self.k_proj.forward(x)?, self.kv_heads)?;
        let v = split(self.v_proj.forward(x)?, self.kv_heads)?;
        let q = super::ops::rope(&q, cos, sin)?;
        let k = super::ops::rope(&k, cos, sin)?;
        let (k, v) = match cache.take() {
            Some((past_k, past_v)) => (
                Tensor::cat(&[&past_k, &k], 2)?,
                Tensor::cat(&[&past_v, &v], 2)?,
            ),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let context = self.attend(&q, &k, &v, mask)?;
        let context = context
            .transpose(1, 2)?
            .reshape((batch, seq, self.heads * self.head_dim))?;
        self.o_proj.forward(&context)
    }

    /// Softmax attention. Each key/value head serves `heads / kv_heads` consecutive query
    /// heads (transformers' `repeat_kv`); the query heads of a group are stacked along the
    /// sequence instead of copying keys and values. Scores are rounded to the activation dtype
    /// after scaling and the softmax runs in f32, as transformers' eager attention does.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (batch, _, seq, d) = q.dims4()?;
        let kv_len = k.dim(2)?;
        let group = self.heads / self.kv_heads;
        let grouped = q.reshape((batch, self.kv_heads, group * seq, d))?;
        let scores = grouped
            .matmul(&k.t()?)?
            .reshape((batch, self.heads, seq, kv_len))?;
        let scale = (d as f64).powf(-0.5);
        let scores = (scores.to_dtype(DType::F32)? * scale)?
            .to_dtype(q.dtype())?
            .to_dtype(DType::F32)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = super::ops::softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
        let probs = probs.reshape((batch, self.kv_heads, group * seq, kv_len))?;
        Ok(probs.matmul(v)?.reshape((batch, self.heads, seq, d))?)
    }
}

/// `LlamaMLP`: `down(act(gate(x)) · up(x))`.
struct Mlp {
    gate_proj: Layer,
    up_proj: Layer,
    down_proj: Layer,
    act: HiddenAct,
}

impl Mlp {
    fn new(b: &ModelBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: b.pp("gate_proj").linear(h, i, bias)?,
            up_proj: b.pp("up_proj").linear(h, i, bias)?,
            down_proj: b.pp("down_proj").linear(i, h, bias)?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.act.apply(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

/// `LlamaDecoderLayer` (pre-norm).
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(b: &ModelBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let norm = |name: &str| RmsNorm::new(b.vb().pp(name), cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            self_attn: Attention::new(&b.pp("self_attn"), cfg)?,
            mlp: Mlp::new(&b.pp("mlp"), cfg)?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos_sin: (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let attended =
            self.self_attn
                .forward(&self.input_layernorm.forward(x)?, cos_sin, mask, cache)?;
        let x = (x + attended)?;
        let out = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + out)?)
    }
}

/// The additive attention mask `(batch | 1, 1, seq, past + seq)` in f32: 0 where a query may
/// attend (causal, and a real token when `keep` is given), f32's lowest value elsewhere, like
/// transformers' eager mask. `None` when nothing is masked (one query, no padding).
fn causal_mask(
    keep: Option<&Tensor>,
    seq: usize,
    past: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    if keep.is_none() && seq == 1 {
        return Ok(None);
    }
    let kv_len = past + seq;
    let causal: Vec<u8> = (0..seq)
        .flat_map(|i| (0..kv_len).map(move |j| u8::from(j <= past + i)))
        .collect();
    let mut allowed = Tensor::from_vec(causal, (1, 1, seq, kv_len), device)?;
    if let Some(keep) = keep {
        let batch = keep.dim(0)?;
        let keep = keep.reshape((batch, 1, 1, kv_len))?;
        allowed = allowed.broadcast_mul(&keep)?;
    }
    let open = Tensor::zeros(allowed.shape(), DType::F32, device)?;
    let blocked = Tensor::full(f32::MIN, allowed.shape(), device)?;
    Ok(Some(allowed.where_cond(&open, &blocked)?))
}

/// `attention_mask` (any dtype, nonzero = real token) as u8 0/1, checked against `(batch, len)`.
fn keep_mask(mask: &Tensor, batch: usize, len: usize) -> Result<Tensor> {
    if mask.dims() != [batch, len] {
        return Err(PeftError::shape(
            "attention_mask",
            &[batch, len],
            mask.dims(),
        ));
    }
    Ok(mask.ne(&mask.zeros_like()?)?)
}

fn batch_and_seq(ids: &Tensor) -> Result<(usize, usize)> {
    match *ids.dims() {
        [batch, seq] if batch > 0 && seq > 0 => Ok((batch, seq)),
        _ => Err(PeftError::InvalidOperation(format!(
            "input_ids must have shape (batch, seq) with both positive, found {:?}",
            ids.dims()
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// The model

/// transformers' `LlamaForCausalLM`: logits `(batch, seq, vocab)` in the model's dtype.
pub struct LlamaForCausalLM {
    embed_tokens: Layer,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Layer,
    rotary: Rotary,
    eos_token_ids: Vec<u32>,
    pad_token_id: Option<u32>,
    config: LlamaConfig,
    modules: Modules,
}

impl LlamaForCausalLM {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = LlamaConfig::from_dir(dir)?;
        let b = ModelBuilder::new(checkpoint_weights(dir, &cfg, dtype, device)?);
        let model = b.pp("model");
        let embed_tokens = model
            .pp("embed_tokens")
            .embedding(cfg.vocab_size, cfg.hidden_size)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(&model.pp("layers").pp(i), &cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(model.vb().pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = b
            .pp("lm_head")
            .linear(cfg.hidden_size, cfg.vocab_size, false)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: Rotary::new(&cfg, device)?,
            eos_token_ids: cfg
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
            pad_token_id: cfg.pad_token_id,
            config: cfg,
            modules: b.modules(),
        })
    }

    pub fn load_boxed(dir: &Path, dtype: DType, device: &Device) -> Result<Box<dyn Model>> {
        Ok(Box::new(Self::load(dir, dtype, device)?))
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The final-norm hidden states of `ids`, extending `cache`; `keep` is the attention mask
    /// over the cached and new tokens.
    fn hidden_states(
        &self,
        ids: &Tensor,
        positions: &Positions,
        keep: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let seq = ids.dim(1)?;
        let past = cache.seq_len()?;
        let mut x = self.embed_tokens.forward(ids)?;
        let (cos, sin) = self.rotary.cos_sin(positions, x.dtype())?;
        let mask = causal_mask(keep, seq, past, x.device())?;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, (&cos, &sin), mask.as_ref(), layer_cache)?;
        }
        self.norm.forward(&x)
    }

    /// The next token of each row: argmax of the last position's logits (first index on ties).
    fn next_tokens(&self, hidden: &Tensor) -> Result<Vec<u32>> {
        let seq = hidden.dim(1)?;
        let last = hidden.narrow(1, seq - 1, 1)?.contiguous()?;
        let logits = self
            .lm_head
            .forward(&last)?
            .squeeze(1)?
            .to_dtype(DType::F32)?;
        Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
    }
}

/// The directory's weights; with tied embeddings and no `lm_head.weight` in the checkpoint,
/// `lm_head` reads `model.embed_tokens.weight` (it stays its own targetable layer).
fn checkpoint_weights(
    dir: &Path,
    cfg: &LlamaConfig,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let vb = var_builder(dir, dtype, device)?;
    const EMBED: &str = "model.embed_tokens.weight";
    const HEAD: &str = "lm_head.weight";
    if !vb.contains_tensor(EMBED) {
        return Err(PeftError::MissingKey {
            key: EMBED.into(),
            context: format!("{}: not a LlamaForCausalLM checkpoint", dir.display()),
        });
    }
    if vb.contains_tensor(HEAD) {
        return Ok(vb);
    }
    if !cfg.tie_word_embeddings {
        return Err(PeftError::MissingKey {
            key: HEAD.into(),
            context: format!(
                "{}: the checkpoint has no lm_head and tie_word_embeddings is false",
                dir.display()
            ),
        });
    }
    Ok(vb.rename_f(|name| if name == HEAD { EMBED } else { name }.to_string()))
}

impl Model for LlamaForCausalLM {
    fn forward(&self, input: &ModelInput) -> Result<Tensor> {
        if input.token_type_ids.is_some() {
            return Err(PeftError::InvalidOperation(
                "LlamaForCausalLM takes no token_type_ids".into(),
            ));
        }
        let ids = &input.input_ids;
        let (batch, seq) = batch_and_seq(ids)?;
        let keep = match &input.attention_mask {
            Some(m) => Some(keep_mask(m, batch, seq)?),
            None => None,
        };
        // transformers' forward numbers positions 0..seq whatever the padding (only `generate`
        // derives them from the mask).
        let positions = Positions::range(0, seq, ids.device())?;
        let mut cache = KvCache::new(self.layers.len());
        let hidden = self.hidden_states(ids, &positions, keep.as_ref(), &mut cache)?;
        self.lm_head.forward(&hidden)
    }

    fn modules(&self) -> &Modules {
        &self.modules
    }

    fn architecture(&self) -> &'static str {
        "LlamaForCausalLM"
    }

    /// transformers' greedy `generate(do_sample=False, max_new_tokens=n)` for a decoder-only
    /// model: positions `cumsum(mask) - 1` (0 on padding), a KV cache, one token per step; a row
    /// that produced an eos token gets `pad_token_id` (or the first eos id) from then on, and
    /// decoding stops once every row has finished. Returns the prompt followed by the new
    /// tokens, as i64 (torch.long).
    fn generate(&self, input: &ModelInput, max_new_tokens: usize) -> Result<Tensor> {
        if max_new_tokens == 0 {
            return Err(PeftError::config(
                "max_new_tokens",
                "`max_new_tokens` must be greater than 0, but is 0.",
            ));
        }
        if input.token_type_ids.is_some() {
            return Err(PeftError::InvalidOperation(
                "LlamaForCausalLM takes no token_type_ids".into(),
            ));
        }
        let ids = &input.input_ids;
        let (batch, seq) = batch_and_seq(ids)?;
        let prompt = ids.to_dtype(DType::I64)?;
        let mask = self.generation_mask(&prompt, input.attention_mask.as_ref(), batch, seq)?;
        let mut decoding = Decoding::start(mask, batch, seq, self.layers.len(), ids.device())?;
        let mut step_ids = ids.clone();
        let mut generated: Vec<u32> = Vec::with_capacity(batch * max_new_tokens);
        let mut steps = 0;
        loop {
            let hidden = self.hidden_states(
                &step_ids,
                &decoding.positions()?,
                decoding.keep.as_ref(),
                &mut decoding.cache,
            )?;
            let next = decoding.finish_rows(self.next_tokens(&hidden)?, self);
            generated.extend_from_slice(&next);
            steps += 1;
            if steps == max_new_tokens || decoding.all_finished() {
                break;
            }
            step_ids = decoding.advance(next)?;
        }
        let new = Tensor::from_vec(generated, (steps, batch), ids.device())?
            .t()?
            .to_dtype(DType::I64)?;
        Ok(Tensor::cat(&[&prompt, &new], 1)?)
    }
}

/// One greedy decoding call: the KV cache, the positions of the tokens fed next, the attention
/// mask so far (`None` when nothing is padded) and which rows are still generating.
struct Decoding {
    cache: KvCache,
    positions: Vec<Vec<u32>>,
    keep: Option<Tensor>,
    unfinished: Vec<bool>,
    device: Device,
}

impl Decoding {
    fn start(
        mask: Option<Vec<Vec<u8>>>,
        batch: usize,
        seq: usize,
        num_layers: usize,
        device: &Device,
    ) -> Result<Self> {
        let positions = match &mask {
            Some(rows) => rows.iter().map(|row| mask_positions(row)).collect(),
            None => vec![(0..seq as u32).collect(); batch],
        };
        // An all-ones mask is dropped, as transformers does (same result, less work).
        let keep = match mask {
            Some(rows) if rows.iter().flatten().any(|&m| m == 0) => {
                let flat: Vec<u8> = rows.into_iter().flatten().collect();
                Some(Tensor::from_vec(flat, (batch, seq), device)?)
            }
            _ => None,
        };
        Ok(Self {
            cache: KvCache::new(num_layers),
            positions,
            keep,
            unfinished: vec![true; batch],
            device: device.clone(),
        })
    }

    fn positions(&self) -> Result<Positions> {
        Positions::per_row(&self.positions, &self.device)
    }

    /// Rows that finished earlier get the pad id (`pad_token_id`, else the first eos id); a row
    /// whose token is an eos id finishes.
    fn finish_rows(&mut self, mut next: Vec<u32>, model: &LlamaForCausalLM) -> Vec<u32> {
        let eos = &model.eos_token_ids;
        let pad = model.pad_token_id.or(eos.first().copied());
        for (token, unfinished) in next.iter_mut().zip(self.unfinished.iter_mut()) {
            if !*unfinished {
                // Rows only finish with eos ids, so `pad` is set here.
                *token = pad.unwrap_or(*token);
            }
            if eos.contains(token) {
                *unfinished = false;
            }
        }
        next
    }

    fn all_finished(&self) -> bool {
        !self.unfinished.contains(&true)
    }

    /// Appends `next` (one token per row): the ids to feed, one position further, a mask
    /// column of ones.
    fn advance(&mut self, next: Vec<u32>) -> Result<Tensor> {
        let batch = next.len();
        for row in &mut self.positions {
            *row = vec![row.last().map_or(0, |p| p + 1)];
        }
        if let Some(keep) = &self.keep {
            let ones = Tensor::ones((batch, 1), DType::U8, &self.device)?;
            self.keep = Some(Tensor::cat(&[keep, &ones], 1)?);
        }
        Ok(Tensor::from_vec(next, (batch, 1), &self.device)?)
    }
}

impl LlamaForCausalLM {
    /// The prompt's attention mask on the host (0/1 per token), or `None` for all ones. Without
    /// one, transformers masks the pad token when it occurs in the prompt and is not an eos id.
    fn generation_mask(
        &self,
        prompt: &Tensor,
        attention_mask: Option<&Tensor>,
        batch: usize,
        seq: usize,
    ) -> Result<Option<Vec<Vec<u8>>>> {
        if let Some(mask) = attention_mask {
            return Ok(Some(keep_mask(mask, batch, seq)?.to_vec2::<u8>()?));
        }
        let Some(pad) = self.pad_token_id else {
            return Ok(None);
        };
        if self.eos_token_ids.contains(&pad) {
            return Ok(None);
        }
        let ids = prompt.to_vec2::<i64>()?;
        if !ids.iter().flatten().any(|&t| t == i64::from(pad)) {
            return Ok(None);
        }
        Ok(Some(
            ids.iter()
                .map(|row| row.iter().map(|&t| u8::from(t != i64::from(pad))).collect())
                .collect(),
        ))
    }
}

/// `cumsum(mask) - 1`, with 0 at padding (transformers' `_prepare_position_ids_for_generation`).
fn mask_positions(mask: &[u8]) -> Vec<u32> {
    let mut seen = 0u32;
    mask.iter()
        .map(|&m| {
            if m == 0 {
                0
            } else {
                seen += 1;
                seen - 1
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::deserialize_fields;
    use serde_json::json;

    fn parse(value: Value) -> Result<LlamaConfig> {
        let cfg: LlamaConfig = deserialize_fields(value)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn field_of(err: PeftError) -> String {
        match err {
            PeftError::InvalidConfig { field, .. } => field,
            other => panic!("expected a config error, got {other}"),
        }
    }

    /// head_dim 8, θ 10⁴ (transformers-models.md §4.7's worked examples).
    fn tiny(rope: Value, max_positions: usize) -> LlamaConfig {
        parse(json!({
            "hidden_size": 32, "num_attention_heads": 4,
            "max_position_embeddings": max_positions, "rope_parameters": rope,
        }))
        .unwrap()
    }

    fn frequencies(cfg: &LlamaConfig) -> (Vec<f32>, f64) {
        let rotary = Rotary::new(cfg, &Device::Cpu).unwrap();
        (rotary.inv_freq.to_vec1().unwrap(), rotary.attention_scaling)
    }

    fn assert_close(found: &[f32], expected: &[f32]) {
        assert_eq!(found.len(), expected.len());
        for (f, e) in found.iter().zip(expected) {
            assert!(
                (f - e).abs() <= 1e-6 * e.abs().max(1e-3),
                "{found:?} vs {expected:?}"
            );
        }
    }

    #[test]
    fn rope_frequencies_as_transformers_examples() {
        let default = tiny(json!({"rope_type": "default", "rope_theta": 10000.0}), 128);
        assert_close(&frequencies(&default).0, &[1.0, 0.1, 0.01, 0.001]);
        let linear = tiny(json!({"rope_type": "linear", "factor": 2.0}), 128);
        assert_close(&frequencies(&linear).0, &[0.5, 0.05, 0.005, 0.0005]);
        let yarn = tiny(
            json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
            128,
        );
        let (inv, scaling) = frequencies(&yarn);
        assert_close(&inv, &[1.0, 0.025, 0.0025, 0.00025]);
        assert!((scaling - 1.1386294).abs() < 1e-6);
        let llama3 = tiny(
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
            128,
        );
        assert_close(&frequencies(&llama3).0, &[1.0, 0.0125, 0.00125, 0.000125]);
        let longrope = tiny(
            json!({"rope_type": "longrope", "short_factor": [1, 1, 1, 1],
                   "long_factor": [2, 2, 2, 2], "original_max_position_embeddings": 32}),
            128,
        );
        assert!((frequencies(&longrope).1 - 1.1832160).abs() < 1e-6);
    }

    #[test]
    fn legacy_rope_scaling_replaces_rope_parameters() {
        let cfg = parse(json!({
            "hidden_size": 32, "num_attention_heads": 4, "rope_theta": 500.0,
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "default"},
        }))
        .unwrap();
        let rope = RopeConfig::from_config(&cfg).unwrap();
        assert_eq!(rope.theta, 500.0);
        assert_eq!(rope.kind, RopeType::Linear { factor: 2.0 });
    }

    #[test]
    fn config_errors_name_the_field() {
        let base = json!({"hidden_size": 32, "num_attention_heads": 4});
        let with = |extra: Value| {
            let mut v = base.clone();
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            field_of(parse(v).unwrap_err())
        };
        assert_eq!(
            with(json!({"num_attention_heads": 5})),
            "num_attention_heads"
        );
        assert_eq!(
            with(json!({"num_key_value_heads": 3})),
            "num_key_value_heads"
        );
        assert_eq!(with(json!({"hidden_act": "swiglu"})), "hidden_act");
        assert_eq!(
            with(json!({"rope_parameters": {"rope_type": "foo"}})),
            "rope_parameters.rope_type"
        );
        assert_eq!(
            with(json!({"rope_parameters": {"rope_type": "linear"}})),
            "rope_parameters.factor"
        );
        assert_eq!(
            with(json!({"rope_scaling": {"type": "dynamic", "factor": "2"}})),
            "rope_scaling.factor"
        );
        assert_eq!(
            with(
                json!({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}})
            ),
            "rope_parameters.partial_rotary_factor"
        );
        assert_eq!(
            with(
                json!({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0],
                         "long_factor": [1.0, 1.0, 1.0, 1.0]}})
            ),
            "rope_parameters.short_factor"
        );
        assert_eq!(with(json!({"eos_token_id": "x"})), "eos_token_id");
    }

    #[test]
    fn generation_positions_skip_padding() {
        assert_eq!(mask_positions(&[0, 0, 1, 1, 1]), vec![0, 0, 0, 1, 2]);
        assert_eq!(mask_positions(&[1, 1, 0]), vec![0, 1, 0]);
    }
}
