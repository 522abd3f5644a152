//! VeRA (PEFT `tuners/vera`): frozen random projections `A (r, in_max)`, `B (out_max, r)` shared
//! by every layer (each slices what it needs) and trainable per-layer vectors:
//! `y = base(x) + λ_b ⊙ B_s (λ_d ⊙ A_s x)`.
//!
//! Without `save_projection` the projections are not in the file: they are regenerated
//! bit-exactly as PyTorch's CPU generator draws them (`projection_prng_key`).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::base::{BaseLayer, ModuleKind, linear_rows};
use crate::config::{
    CommonFields, ModuleSelector, OneOrMany, check_extra_fields, number, parse_config,
};
use crate::error::{PeftError, Result};
use crate::init::Initializer;
use crate::kernels::linear::{Extras, LowRank, matmul_scaled};
use crate::matching::Selection;
use crate::merge::adapter_dtype;
use crate::method::{
    BiasMode, InferredBase, LayerAdapter, MergeRule, MethodConfig, MethodEntry, ParamSource,
    dims_with_rank,
};
use crate::module::Below;
use crate::params::{Params, take_params};
use crate::rng::TorchGenerator;

pub const PEFT_TYPE: &str = "VERA";

pub const ENTRY: MethodEntry = MethodEntry {
    peft_type: PEFT_TYPE,
    config_class: "VeraConfig",
    from_json: |v| Ok(Arc::new(VeraConfig::from_json(v)?)),
};

pub const VERA_LAMBDA_B: &str = "vera_lambda_b";
pub const VERA_LAMBDA_D: &str = "vera_lambda_d";
pub const PARAM_NAMES: &[&str] = &[VERA_LAMBDA_B, VERA_LAMBDA_D];
pub const VERA_A: &str = "vera_A";
pub const VERA_B: &str = "vera_B";
/// Adapter-wide tensors, saved as `base_model.<name>`.
pub const SHARED_NAMES: &[&str] = &[VERA_A, VERA_B];

/// VeRA's `bias`: which base-model biases are trained and saved with the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VeraBias {
    #[default]
    None,
    All,
    VeraOnly,
}

impl From<VeraBias> for BiasMode {
    fn from(b: VeraBias) -> Self {
        match b {
            VeraBias::None => BiasMode::None,
            VeraBias::All => BiasMode::All,
            VeraBias::VeraOnly => BiasMode::AdaptedOnly,
        }
    }
}

/// PEFT's `VeraConfig`, with PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VeraConfig {
    #[serde(flatten)]
    pub common: CommonFields,
    pub r: u32,
    pub target_modules: Option<ModuleSelector>,
    pub projection_prng_key: u64,
    pub save_projection: bool,
    pub vera_dropout: f64,
    #[serde(serialize_with = "serialize_number")]
    pub d_initial: f64,
    pub fan_in_fan_out: bool,
    pub bias: VeraBias,
    pub modules_to_save: Option<Vec<String>>,
    pub init_weights: bool,
    pub layers_to_transform: Option<OneOrMany<i64>>,
    pub layers_pattern: Option<OneOrMany<String>>,
    #[serde(flatten, skip_serializing)]
    pub unsupported: Map<String, Value>,
}

fn serialize_number<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    number(*v).serialize(s)
}

impl Default for VeraConfig {
    fn default() -> Self {
        Self {
            common: CommonFields::default(),
            r: 256,
            target_modules: None,
            projection_prng_key: 0,
            save_projection: true,
            vera_dropout: 0.0,
            d_initial: 0.1,
            fan_in_fan_out: false,
            bias: VeraBias::None,
            modules_to_save: None,
            init_weights: true,
            layers_to_transform: None,
            layers_pattern: None,
            unsupported: Map::new(),
        }
    }
}

impl VeraConfig {
    pub fn from_json(value: Value) -> Result<Self> {
        parse_config(value, PEFT_TYPE)
    }

    pub fn selection(&self) -> Selection<'_> {
        Selection {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: None,
            modules_to_save: self.modules_to_save.as_deref(),
            layers_to_transform: self.layers_to_transform.as_ref(),
            layers_pattern: self.layers_pattern.as_ref(),
        }
    }

    /// The shared projections for layers of at most `out_max` outputs and `in_max` inputs, drawn
    /// as PEFT draws them: `kaiming_uniform` (gain √2) from a CPU generator seeded with
    /// `projection_prng_key`, `vera_A` first.
    pub fn generate_projections(
        &self,
        out_max: usize,
        in_max: usize,
    ) -> Result<BTreeMap<String, Tensor>> {
        let mut mt = TorchGenerator::new(self.projection_prng_key);
        let r = self.r as usize;
        let a = kaiming_uniform(&mut mt, r, in_max)?;
        let b = kaiming_uniform(&mut mt, out_max, r)?;
        Ok(BTreeMap::from([
            (VERA_A.to_string(), a),
            (VERA_B.to_string(), b),
        ]))
    }
}

impl VeraConfig {
    /// Checks every field; every constructor calls it, so a config in hand is valid.
    pub fn validate(&self) -> Result<()> {
        self.common.validate()?;
        check_extra_fields(&self.unsupported, &[])?;
        self.selection().validate()?;
        if self.r == 0 {
            return Err(PeftError::config(
                "r",
                "must be a positive integer, found 0",
            ));
        }
        if !(0.0..1.0).contains(&self.vera_dropout) {
            return Err(PeftError::config(
                "vera_dropout",
                format!("must be in [0, 1), found {}", self.vera_dropout),
            ));
        }
        if !self.d_initial.is_finite() {
            return Err(PeftError::config("d_initial", "must be finite"));
        }
        Ok(())
    }
}

impl MethodConfig for VeraConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn validate(&self) -> Result<()> {
        VeraConfig::validate(self)
    }

    fn fields(&self) -> Value {
        serde_json::to_value(self).expect("VeraConfig serialises")
    }

    fn selection(&self) -> Selection<'_> {
        VeraConfig::selection(self)
    }

    fn bias_mode(&self) -> BiasMode {
        self.bias.into()
    }

    fn param_names(&self) -> &'static [&'static str] {
        PARAM_NAMES
    }

    fn rank_for(&self, _module: &str) -> Result<Option<usize>> {
        Ok(Some(self.r as usize))
    }

    fn build(
        &self,
        module: &str,
        base: &BaseLayer,
        source: ParamSource,
        shared: &BTreeMap<String, Tensor>,
    ) -> Result<Box<dyn LayerAdapter>> {
        Ok(Box::new(VeraAdapter::new(
            module,
            base,
            self.clone(),
            source,
            shared,
        )?))
    }

    fn for_targets(&self, kinds: &[ModuleKind]) -> Result<Option<Arc<dyn MethodConfig>>> {
        let mut config = self.clone();
        crate::methods::adapt_fan_in_fan_out(&mut config.fan_in_fan_out, kinds)?;
        Ok(Some(Arc::new(config)))
    }

    fn shared_names(&self) -> &'static [&'static str] {
        SHARED_NAMES
    }

    fn saves_shared(&self) -> bool {
        self.save_projection
    }

    fn generate_shared(&self, out_max: usize, in_max: usize) -> Result<BTreeMap<String, Tensor>> {
        self.generate_projections(out_max, in_max)
    }

    /// Outputs from `vera_lambda_b`; inputs from the shared `vera_A`'s columns (the widest
    /// targeted input, which every module's slice fits), or 1 when the file leaves the
    /// projections out.
    fn infer_base(
        &self,
        module: &str,
        tensors: &[(String, Tensor)],
        shared: &BTreeMap<String, Tensor>,
    ) -> Result<Option<InferredBase>> {
        let out = dims_with_rank(module, tensors, VERA_LAMBDA_B, &[1])?[0];
        let inp = match shared.get(VERA_A).map(Tensor::dims) {
            Some([_, inp]) => *inp,
            _ => 1,
        };
        Ok(Some(InferredBase::linear(out, inp, self.fan_in_fan_out)))
    }
}

/// `torch.nn.init.kaiming_uniform_(t, a=0)` on a `(rows, cols)` f32 tensor with a CPU generator:
/// `uniform_(-b, b)` with `b = sqrt(3) · sqrt(2) / sqrt(cols)`, 24 random bits per element.
fn kaiming_uniform(mt: &mut TorchGenerator, rows: usize, cols: usize) -> Result<Tensor> {
    let bound = 3f64.sqrt() * (2f64.sqrt() / (cols as f64).sqrt());
    let (lo, hi) = (-bound as f32, bound as f32);
    let range = f64::from(hi - lo);
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let x = f64::from(mt.next_u32() & 0x00ff_ffff) * (1.0 / 16_777_216.0);
            (x * range + f64::from(lo)) as f32
        })
        .collect();
    Ok(Tensor::from_vec(values, (rows, cols), &Device::Cpu)?)
}

/// A VeRA adapter on one Linear / Conv1D module.
#[derive(Debug)]
pub struct VeraAdapter {
    config: Arc<VeraConfig>,
    params: Params,
    kind: ModuleKind,
    /// `vera_A[:, :in]` and `vera_B[:out, :]` (frozen).
    a: Tensor,
    b: Tensor,
}

impl VeraAdapter {
    /// The adapter for `module` on `base`, slicing the shared projections (`vera_A`, `vera_B`
    /// in `shared`). Given `λ_b`, `λ_d`, or fresh ones: `λ_b = 0`, `λ_d = d_initial` (the
    /// identity), or with `init_weights=false` `λ_b = 1`, `λ_d ~ N(0, 1)`.
    pub fn new(
        module: &str,
        base: &BaseLayer,
        config: VeraConfig,
        source: ParamSource,
        shared: &BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        if !matches!(base.kind(), ModuleKind::Linear | ModuleKind::Conv1D) {
            return Err(PeftError::InvalidOperation(format!(
                "VeRA supports Linear and Conv1D layers only (as PEFT), not {:?}",
                base.kind()
            )));
        }
        let dtype = adapter_dtype(base.dtype());
        let dev = base.device();
        let (inp, out, r) = (base.in_features(), base.out_features(), config.r as usize);
        let given = match source {
            ParamSource::Given(tensors) => tensors,
            ParamSource::Init { seed } => {
                let (lambda_b, lambda_d) = if config.init_weights {
                    (
                        Tensor::zeros(out, dtype, dev)?,
                        Tensor::full(config.d_initial, r, dev)?.to_dtype(dtype)?,
                    )
                } else {
                    (
                        Tensor::ones(out, dtype, dev)?,
                        Initializer::new(seed).normal(&[r], 1.0, dtype)?,
                    )
                };
                vec![
                    (VERA_LAMBDA_B.to_string(), lambda_b),
                    (VERA_LAMBDA_D.to_string(), lambda_d),
                ]
            }
        };
        let what = format!("VeRA {:?} r={r}", base.kind());
        let expected = [(VERA_LAMBDA_B, vec![out]), (VERA_LAMBDA_D, vec![r])];
        let params = take_params(module, &what, given, &expected, dtype, dev)?;
        let projection = |name: &str| {
            shared.get(name).ok_or_else(|| PeftError::MissingKey {
                key: format!("base_model.{name}"),
                context: "VeRA's shared projection (save_projection=false files need the base model's shapes)".into(),
            })
        };
        let (a, b) = (projection(VERA_A)?, projection(VERA_B)?);
        if a.rank() != 2 || a.dim(0)? != r || a.dim(1)? < inp {
            return Err(PeftError::shape(
                format!("base_model.{VERA_A} (at least)"),
                &[r, inp],
                a.dims(),
            ));
        }
        if b.rank() != 2 || b.dim(1)? != r || b.dim(0)? < out {
            return Err(PeftError::shape(
                format!("base_model.{VERA_B} (at least)"),
                &[out, r],
                b.dims(),
            ));
        }
        Ok(Self {
            a: a.narrow(1, 0, inp)?.to_dtype(dtype)?.to_device(dev)?,
            b: b.narrow(0, 0, out)?.to_dtype(dtype)?.to_device(dev)?,
            config: Arc::new(config),
            params,
            kind: base.kind(),
        })
    }

    /// `(λ_b ⊙ B_s) (λ_d ⊙ A_s)`, transposed for Conv1D.
    /// `ΔW = (λ_b ⊙ B_s)(λ_d ⊙ A_s)` as its two factors, each scaled as PEFT scales it.
    fn delta_factors(&self) -> Result<(Tensor, Tensor)> {
        let lambda_b = self.params.get(VERA_LAMBDA_B)?.unsqueeze(1)?;
        let lambda_d = self.params.get(VERA_LAMBDA_D)?.unsqueeze(1)?;
        Ok((
            self.b.broadcast_mul(&lambda_b)?,
            self.a.broadcast_mul(&lambda_d)?,
        ))
    }

    fn delta_weight(&self) -> Result<Tensor> {
        let (left, right) = self.delta_factors()?;
        let delta = matmul_scaled(&left, &right, 1.0)?;
        Ok(match self.kind {
            ModuleKind::Conv1D => delta.t()?.contiguous()?,
            _ => delta,
        })
    }
}

impl LayerAdapter for VeraAdapter {
    fn config(&self) -> &dyn MethodConfig {
        &*self.config
    }

    fn params(&self) -> &Params {
        &self.params
    }

    fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }

    /// PEFT's forward: `λ_b ⊙ B_s (λ_d ⊙ A_s dropout(x))` in the adapter dtype, added to the
    /// output below and cast back to that output's dtype.
    fn forward(&self, x: &Tensor, below: &Below<'_>) -> Result<Tensor> {
        // As one low-rank term with λ_d on x·A_sᵀ and λ_b on the output, as PEFT applies them.
        let fused = below.fused(x, self.config.vera_dropout, || {
            Ok(Extras::low_rank(LowRank {
                rank_scale: Some(self.params.get(VERA_LAMBDA_D)?),
                out_scale: Some(self.params.get(VERA_LAMBDA_B)?),
                ..LowRank::new(self.a.clone(), self.b.clone(), None, 1.0)
            }))
        })?;
        if let Some(y) = fused {
            return Ok(y);
        }
        let result = below.forward(x)?;
        let dtype = self.a.dtype();
        let x = below.dropout(&x.to_dtype(dtype)?, self.config.vera_dropout)?;
        let h = linear_rows(&x, &self.a.t()?, None, self.a.dim(1)?)?;
        let h = h.broadcast_mul(&self.params.get(VERA_LAMBDA_D)?)?;
        let y = linear_rows(&h, &self.b.t()?, None, self.config.r as usize)?;
        let y = y.broadcast_mul(&self.params.get(VERA_LAMBDA_B)?)?;
        Ok(result.to_dtype(dtype)?.add(&y)?.to_dtype(result.dtype())?)
    }

    fn merge_rule(&self, _base: &BaseLayer) -> Result<MergeRule> {
        if self.kind == ModuleKind::Linear {
            let (left, right) = self.delta_factors()?;
            return Ok(MergeRule::AddProduct {
                left,
                right,
                scale: 1.0,
                bias: None,
            });
        }
        Ok(MergeRule::Add {
            delta: self.delta_weight()?,
            bias: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test vectors from the reference notes (torch 2.13 CPU, seed 0), as torch prints them.
    #[test]
    #[allow(clippy::excessive_precision)]
    fn projections_match_torch_generator() {
        let config = VeraConfig {
            r: 4,
            ..Default::default()
        };
        let p = config.generate_projections(20, 20).unwrap();
        let a: Vec<f32> = p[VERA_A].get(0).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = p[VERA_B].get(0).unwrap().to_vec1().unwrap();
        assert_eq!(
            &a[..5],
            &[
                -0.0041007004,
                0.29382226,
                -0.45080039,
                -0.40309042,
                -0.21095774
            ]
        );
        assert_eq!(&b[..4], &[-1.1414061, 1.0881766, 0.93124676, -1.2217172]);
    }
}
