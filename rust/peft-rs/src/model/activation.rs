//! Activation functions of the reference models, by transformers' `hidden_act` names.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use serde::Deserialize;

use crate::error::Result;

/// `hidden_act`, as transformers' `ACT2FN` maps these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum HiddenAct {
    #[serde(rename = "silu", alias = "swish")]
    Silu,
    /// Exact GELU, `0.5·x·(1 + erf(x/√2))`.
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(
        rename = "gelu_pytorch_tanh",
        alias = "gelu_new",
        alias = "gelu_python_tanh"
    )]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

impl HiddenAct {
    /// Computed in f32 and rounded once, as PyTorch's f16/bf16 kernels do.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let y = match self {
            Self::Silu => x32.silu()?,
            // The CPU kernel here; candle's elsewhere.
            Self::Gelu if x32.device().is_cpu() => x32.contiguous()?.apply_op1(GeluErf)?,
            Self::Gelu => x32.gelu_erf()?,
            Self::GeluTanh => x32.gelu()?,
            Self::Relu => x32.relu()?,
        };
        Ok(y.to_dtype(x.dtype())?)
    }
}

/// Exact GELU on f32 CPU tensors, in parallel, with its backward: candle's `gelu_erf` runs
/// libm's scalar `erf` on one thread, which makes it a sizeable part of a BERT training step.
struct GeluErf;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `erfc(x)` for `x >= 0` (Numerical Recipes' Chebyshev fit, relative error below 1.2e-7).
// The coefficients as published.
#[allow(clippy::excessive_precision)]
fn erfc_nonneg(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * x);
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * (-x * x + poly).exp()
}

/// `Φ(x) = ½(1 + erf(x/√2))`, the standard normal CDF.
fn normal_cdf(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let tail = 0.5 * erfc_nonneg(z.abs());
    if z >= 0.0 { 1.0 - tail } else { tail }
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::kernels::contiguous_f32(storage, layout)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x * normal_cdf(x);
                }
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    /// `d/dx x·Φ(x) = Φ(x) + x·φ(x)`.
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let x: Vec<f32> = arg.flatten_all()?.to_vec1()?;
        let mut d = vec![0f32; x.len()];
        d.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(d, x)| {
                for (d, &x) in d.iter_mut().zip(x) {
                    let density = (-0.5 * x * x).exp() * 0.398_942_3;
                    *d = normal_cdf(x) + x * density;
                }
            });
        let d = Tensor::from_vec(d, arg.shape(), arg.device())?;
        Ok(Some(grad.mul(&d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The parallel kernel against candle's scalar `gelu_erf` (libm's `erf`), values and
    /// gradients, across the range where GELU bends and far into both tails.
    #[test]
    fn gelu_matches_candle_and_its_gradient() {
        let values: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.006).collect();
        let x = Var::from_vec(values, (4001,), &Device::Cpu).unwrap();
        let ours = x.as_tensor().apply_op1(GeluErf).unwrap();
        let theirs = x.as_tensor().gelu_erf().unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(max_diff(&ours, &theirs) < 2e-6);
        let g_ours = ours.sum_all().unwrap().backward().unwrap();
        let g_theirs = theirs.sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g_ours.get(&x).unwrap(), g_theirs.get(&x).unwrap()) < 2e-6);
    }
}
