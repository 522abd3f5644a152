//! Activation functions of the reference models, by transformers' `hidden_act` names.

use candle_core::{DType, Tensor};
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
            Self::Gelu => x32.gelu_erf()?,
            Self::GeluTanh => x32.gelu()?,
            Self::Relu => x32.relu()?,
        };
        Ok(y.to_dtype(x.dtype())?)
    }
}
