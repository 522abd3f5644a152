//! What PEFT's LyCORIS methods, LoHa and LoKr, share (`tuners/lycoris_utils.py`): the config
//! fields of `LycorisConfig` plus the ones both configs declare, and the layer mechanics. A
//! LyCORIS adapter is a delta weight `ΔW` applied on top of the layer below it as
//! `below(x) + F.linear(x, ΔW)` (Conv2d: the base's convolution with `ΔW`, no bias), merged as
//! `W += ΔW`. In training, `rank_dropout` zeroes output rows of `ΔW` and `module_dropout` skips
//! the adapter for a whole forward.

use std::sync::Arc;

use candle_core::Tensor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::base::{BaseLayer, ModuleKind};
use crate::config::{ModuleSelector, OneOrMany, deserialize_fields, number, take_peft_type};
use crate::error::{PeftError, Result};
use crate::kernels::linear::{Extras, LowRank};
use crate::matching::{Selection, check_pattern_keys, pattern_value};
use crate::method::{LayerAdapter, MergeRule, MethodConfig};
use crate::methods::lora::Patterns;
use crate::module::Below;
use crate::params::Params;
use crate::rng::DropoutRng;

/// The fields `LoHaConfig` and `LoKrConfig` share, with PEFT's names and defaults (besides the
/// [`crate::config::CommonFields`] of every config). Each config writes them flattened into its
/// own JSON object and reads them back with [`take_fields`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LycorisFields {
    pub r: u32,
    /// PEFT's `alpha` (not `lora_alpha`); the scaling is `alpha / r`.
    #[serde(serialize_with = "serialize_number")]
    pub alpha: f64,
    pub rank_dropout: f64,
    pub module_dropout: f64,
    pub use_effective_conv2d: bool,
    pub target_modules: Option<ModuleSelector>,
    pub exclude_modules: Option<ModuleSelector>,
    pub layers_to_transform: Option<OneOrMany<i64>>,
    pub layers_pattern: Option<OneOrMany<String>>,
    pub modules_to_save: Option<Vec<String>>,
    pub rank_pattern: Patterns<u32>,
    pub alpha_pattern: Patterns<f64>,
}

fn serialize_number<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    number(*v).serialize(s)
}

impl Default for LycorisFields {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            use_effective_conv2d: false,
            target_modules: None,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            modules_to_save: None,
            rank_pattern: Patterns::default(),
            alpha_pattern: Patterns::default(),
        }
    }
}

impl LycorisFields {
    /// Checks every shared field, naming the field in the error.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            // PEFT raises when the layer is built; here the config itself is refused.
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
        if !self.alpha.is_finite() {
            return Err(PeftError::config("alpha", "must be finite"));
        }
        if let Some((k, _)) = self.alpha_pattern.0.iter().find(|(_, a)| !a.is_finite()) {
            return Err(PeftError::config(
                "alpha_pattern",
                format!("alpha for {k:?} must be finite"),
            ));
        }
        for (field, p) in [
            ("rank_dropout", self.rank_dropout),
            ("module_dropout", self.module_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(PeftError::config(
                    field,
                    format!("must be in [0, 1), found {p}"),
                ));
            }
        }
        self.validate_selection()
    }

    fn validate_selection(&self) -> Result<()> {
        self.selection().validate()?;
        check_pattern_keys("rank_pattern", &self.rank_pattern.0)?;
        check_pattern_keys("alpha_pattern", &self.alpha_pattern.0)
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
            pattern_value("alpha_pattern", &self.alpha_pattern.0, key)?.unwrap_or(self.alpha);
        Ok((r as usize, alpha))
    }
}

/// Moves the fields of `T` (the keys of its default's JSON form) out of `map` and deserialises
/// them. A config is read part by part this way rather than with `#[serde(flatten)]`, whose
/// errors do not say which field had a value of the wrong type.
pub(crate) fn take_fields<T: Serialize + DeserializeOwned + Default>(
    map: &mut Map<String, Value>,
) -> Result<T> {
    let names: Vec<String> = match serde_json::to_value(T::default()) {
        Ok(Value::Object(fields)) => fields.into_iter().map(|(k, _)| k).collect(),
        _ => Vec::new(),
    };
    let own: Map<String, Value> = names.iter().filter_map(|k| map.remove_entry(k)).collect();
    deserialize_fields(Value::Object(own))
}

/// Moves one field out of `map` and deserialises it; `default` when absent.
pub(crate) fn take_field<T: DeserializeOwned>(
    map: &mut Map<String, Value>,
    name: &str,
    default: T,
) -> Result<T> {
    match map.remove(name) {
        None => Ok(default),
        Some(v) => serde_json::from_value(v).map_err(|e| PeftError::config(name, e.to_string())),
    }
}

/// The object of a config's JSON form, without its `peft_type` (which must be `peft_type`).
pub(crate) fn config_object(value: Value, peft_type: &str) -> Result<Map<String, Value>> {
    let mut value = value;
    take_peft_type(&mut value, peft_type)?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(PeftError::config(
            "<root>",
            "a config must be a JSON object",
        )),
    }
}

/// LyCORIS adapts `nn.Linear`, `nn.Conv1d` and `nn.Conv2d` (peft-rs has no `nn.Conv1d` kind);
/// PEFT refuses transformers `Conv1D` and `nn.Embedding` targets, and so does this.
pub(crate) fn check_kind(method: &str, base: &BaseLayer) -> Result<()> {
    match base.kind() {
        ModuleKind::Linear | ModuleKind::Conv2d(_) => Ok(()),
        kind => Err(PeftError::InvalidOperation(format!(
            "{method} does not support {kind:?} layers; PEFT adapts only nn.Linear, nn.Conv1d and nn.Conv2d"
        ))),
    }
}

/// `rank_dropout` and `module_dropout`, which act in training only. The draws come from the
/// model's training stream (PEFT uses torch's global generator, so the masks differ, not the law).
#[derive(Debug)]
pub(crate) struct TrainingDropout {
    rank: f64,
    module: f64,
    /// Whether kept rows are divided by the fraction kept (LoHa always, LoKr with
    /// `rank_dropout_scale`).
    rescale: bool,
}

impl TrainingDropout {
    pub fn new(rank: f64, module: f64, rescale: bool) -> Self {
        Self {
            rank,
            module,
            rescale,
        }
    }

    /// Whether this training forward (`rng` is the training stream, `None` in eval) skips the
    /// adapter: PEFT applies it when `rand() > p`.
    pub fn skip_module(&self, rng: Option<&DropoutRng>) -> bool {
        match rng {
            Some(rng) if self.module > 0.0 => f64::from(rng.uniform(1)[0]) <= self.module,
            _ => false,
        }
    }

    /// `delta` with each output row (dimension 0) kept when `rand() > rank_dropout`, in training
    /// only. PEFT divides the 0/1 mask by its mean when rescaling, which is 0/0 when every row
    /// is dropped; here such a delta is zero instead of NaN.
    pub fn drop_rows(&self, delta: Tensor, rng: Option<&DropoutRng>) -> Result<Tensor> {
        let Some(rng) = rng.filter(|_| self.rank > 0.0) else {
            return Ok(delta);
        };
        let rows = delta.dim(0)?;
        let keep: Vec<bool> = rng
            .uniform(rows)
            .iter()
            .map(|u| f64::from(*u) > self.rank)
            .collect();
        let kept = keep.iter().filter(|k| **k).count();
        let value = if self.rescale && kept > 0 {
            rows as f64 / kept as f64
        } else {
            1.0
        };
        let mask: Vec<f64> = keep.iter().map(|k| if *k { value } else { 0.0 }).collect();
        let mut shape = vec![1; delta.rank()];
        shape[0] = rows;
        let mask = Tensor::from_vec(mask, shape, delta.device())?.to_dtype(delta.dtype())?;
        Ok(delta.broadcast_mul(&mask)?)
    }
}

/// PEFT's LyCORIS forward on top of `below`: `below(x) + F.linear(x, ΔW)`, or the base's
/// convolution (stride, padding, dilation, groups) with `ΔW` and no bias. `x` is cast to `ΔW`'s
/// dtype, the sum is taken in the promoted dtype and cast back to `x`'s, as PEFT does.
/// What one LyCORIS method adds to the shared adapter: how its tensors make `ΔW`.
pub trait LycorisMethod: MethodConfig + Sized + 'static {
    /// `ΔW` in the base weight's layout, without rank dropout (PEFT's `get_delta_weight`).
    fn delta_weight(adapter: &LycorisAdapter<Self>, base: &BaseLayer) -> Result<Tensor>;

    /// `ΔW = up · down` (`down (R, in)`, `up (out, R)` with the scale in it) for a Linear weight
    /// where the method's factors give one and, for `rows` rows of input, `x·downᵀ·upᵀ` costs
    /// less than forming `ΔW` (see [`low_rank_pays`]); a forward then never forms `ΔW`.
    fn low_rank_form(
        _adapter: &LycorisAdapter<Self>,
        _base: &BaseLayer,
        _rows: usize,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
}

/// Whether `rows` rows through rank-`rank` factors of an `out × in` `ΔW` cost fewer
/// multiply-adds than forming `ΔW` (`delta_work` of them) and adding it to the weight, counted
/// as three more per element (the passes that write `ΔW`, add it and read the sum again).
pub(crate) fn low_rank_pays(
    rows: usize,
    rank: usize,
    (out, inputs): (usize, usize),
    delta_work: usize,
) -> bool {
    (rows + 1) * rank * (out + inputs) <= delta_work + 3 * out * inputs
}

/// A LyCORIS adapter (LoHa, LoKr) on one module: its tensors, rank, scaling and training-time
/// dropouts; the method's config type supplies `ΔW`.
#[derive(Debug)]
pub struct LycorisAdapter<C> {
    pub(crate) config: Arc<C>,
    pub(crate) params: Params,
    pub(crate) r: usize,
    pub(crate) scaling: f64,
    pub(crate) dropout: TrainingDropout,
}

impl<C: LycorisMethod> LycorisAdapter<C> {
    pub fn r(&self) -> usize {
        self.r
    }

    /// `alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    pub fn delta_weight(&self, base: &BaseLayer) -> Result<Tensor> {
        C::delta_weight(self, base)
    }
}

impl<C: LycorisMethod + std::fmt::Debug> LayerAdapter for LycorisAdapter<C> {
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
        let rng = below.training_rng();
        if self.dropout.skip_module(rng) {
            return below.forward(x);
        }
        if rng.is_none() && below.is_base() {
            let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
            if let Some((down, up)) = C::low_rank_form(self, below.base(), rows)? {
                let term = || Ok(Extras::low_rank(LowRank::new(down, up, None, 1.0)));
                if let Some(y) = below.fused(x, 0.0, term)? {
                    return Ok(y);
                }
            }
        }
        let delta = self
            .dropout
            .drop_rows(self.delta_weight(below.base())?, rng)?;
        let fused = below.fused(x, 0.0, || {
            Ok(Extras {
                weight_delta: Some(delta.clone()),
                ..Extras::default()
            })
        })?;
        match fused {
            Some(y) => Ok(y),
            None => forward_with_delta(x, below, &delta),
        }
    }

    fn merge_rule(&self, base: &BaseLayer) -> Result<MergeRule> {
        Ok(MergeRule::Add {
            delta: self.delta_weight(base)?,
            bias: None,
        })
    }
}

pub(crate) fn forward_with_delta(x: &Tensor, below: &Below<'_>, delta: &Tensor) -> Result<Tensor> {
    let result = below.forward(x)?;
    let update = below
        .base()
        .forward_with(&x.to_dtype(delta.dtype())?, delta, None)?;
    Ok(result
        .to_dtype(update.dtype())?
        .add(&update)?
        .to_dtype(x.dtype())?)
}

/// The CP/Tucker kernel both methods use for an effective Conv2d:
/// `einsum("i j k l, i p, j q -> p q k l", t, wa, wb)` for `t: (R1, R2, kh, kw)`,
/// `wa: (R1, P)`, `wb: (R2, Q)`, giving `(P, Q, kh, kw)`.
pub(crate) fn cp_weight(t: &Tensor, wa: &Tensor, wb: &Tensor) -> Result<Tensor> {
    let (r1, r2, kh, kw) = t.dims4()?;
    let (p, q) = (wa.dim(1)?, wb.dim(1)?);
    // Contract j: (i, k, l, j) · (j, q) -> (i, k, l, q).
    let tj = t
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((r1 * kh * kw, r2))?;
    let tq = tj.matmul(wb)?.reshape((r1, kh * kw * q))?;
    // Contract i: (p, i) · (i, k l q) -> (p, k, l, q), then to (p, q, k, l).
    let pq = wa.t()?.matmul(&tq)?.reshape((p, kh, kw, q))?;
    Ok(pq.permute((0, 3, 1, 2))?.contiguous()?)
}

/// What the LoHa and LoKr unit tests share: tensors made by a formula that the Python script
/// producing PEFT's reference numbers used too, and the comparison.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Device, Tensor};

    use crate::base::{BaseLayer, Conv2dParams, ModuleKind};
    use crate::method::ParamSource;

    /// A layer's tensors and PEFT's `ΔW` for them.
    pub struct Case {
        pub weight: &'static [usize],
        /// Name, shape and the scale of `arange(n) * scale - 0.5`.
        pub params: &'static [(&'static str, &'static [usize], f64)],
        pub delta: &'static [f32],
    }

    /// `torch.arange(n, dtype=float32).reshape(shape) * scale - 0.5`.
    pub fn arange(shape: &[usize], scale: f64) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::arange(0f32, n as f32, &Device::Cpu)
            .unwrap()
            .affine(scale, -0.5)
            .unwrap()
            .reshape(shape)
            .unwrap()
    }

    /// A zero Linear (2-D) or Conv2d (4-D, stride 1) base layer of this weight shape.
    pub fn base(weight: &[usize]) -> BaseLayer {
        let kind = if weight.len() == 4 {
            ModuleKind::Conv2d(Conv2dParams::default())
        } else {
            ModuleKind::Linear
        };
        let w = Tensor::zeros(weight, DType::F32, &Device::Cpu).unwrap();
        BaseLayer::new(kind, w, None).unwrap()
    }

    pub fn given(case: &Case) -> ParamSource {
        ParamSource::Given(
            case.params
                .iter()
                .map(|(name, shape, scale)| (name.to_string(), arange(shape, *scale)))
                .collect(),
        )
    }

    pub fn assert_close(got: &Tensor, want: &[f32], what: &str) {
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                "{what}[{i}]: {g} vs PEFT's {w}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::testing::arange;
    use super::*;

    /// `torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb)` with
    /// `t = arange(2*3*2*2).reshape(2,3,2,2)*0.1-0.5`, `wa = arange(2*4).reshape(2,4)*0.2-0.5`,
    /// `wb = arange(3*2).reshape(3,2)*0.3-0.5`; the first and last 4 values, from PyTorch.
    #[test]
    fn cp_weight_matches_torch_einsum() {
        let t = arange(&[2, 3, 2, 2], 0.1);
        let wa = arange(&[2, 4], 0.2);
        let wb = arange(&[3, 2], 0.3);
        let w = cp_weight(&t, &wa, &wb).unwrap();
        assert_eq!(w.dims(), &[4, 2, 2, 2]);
        let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let (first, last) = CP_EXPECTED;
        for (got, want) in v[..4].iter().zip(first).chain(v[28..].iter().zip(last)) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    const CP_EXPECTED: ([f32; 4], [f32; 4]) = (
        [0.018000022, 0.012000039, 0.006000042, 1.4901161e-8],
        [1.6559999, 1.776, 1.896, 2.016],
    );

    #[test]
    fn rank_dropout_keeps_rows_with_the_right_rescale() {
        let delta = Tensor::ones((4000, 3), DType::F32, &Device::Cpu).unwrap();
        let d = TrainingDropout::new(0.25, 0.0, true);
        let rng = DropoutRng::new(1);
        // Not in training: untouched.
        let same = d.drop_rows(delta.clone(), None).unwrap();
        assert_eq!(same.sum_all().unwrap().to_scalar::<f32>().unwrap(), 12000.0);
        let dropped = d.drop_rows(delta.clone(), Some(&rng)).unwrap();
        let rows: Vec<Vec<f32>> = dropped.to_vec2().unwrap();
        let kept = rows.iter().filter(|r| r[0] != 0.0).count();
        assert!((kept as f64 / 4000.0 - 0.75).abs() < 0.03, "kept {kept}");
        // Rescaled so the mean of the mask is 1; each row is dropped or kept whole.
        let mean = dropped.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean - 1.0).abs() < 1e-5);
        assert!(rows.iter().all(|r| r.iter().all(|v| *v == r[0])));
        let plain = TrainingDropout::new(0.25, 0.0, false)
            .drop_rows(delta, Some(&rng))
            .unwrap();
        assert!(
            plain
                .to_vec2::<f32>()
                .unwrap()
                .iter()
                .all(|r| r[0] == 0.0 || r[0] == 1.0)
        );
    }

    #[test]
    fn module_dropout_only_in_training() {
        let d = TrainingDropout::new(0.0, 0.5, true);
        let rng = DropoutRng::new(3);
        assert!((0..100).all(|_| !d.skip_module(None)));
        let skipped = (0..2000).filter(|_| d.skip_module(Some(&rng))).count();
        assert!((skipped as f64 / 2000.0 - 0.5).abs() < 0.05, "{skipped}");
        let never = TrainingDropout::new(0.0, 0.0, true);
        assert!((0..100).all(|_| !never.skip_module(Some(&rng))));
    }
}
