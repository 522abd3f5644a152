//! Softmax, layer norm and rotary embedding that keep gradients. candle's fused kernels
//! (`candle_nn::ops::softmax_last_dim`, `layer_norm`, `rotary_emb::rope`) have no backward and silently cut the
//! autograd graph, so when the input carries gradients (training) these use composite ops;
//! inference keeps the fused kernels.

use candle_core::{D, DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::Result;

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    Ok(if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(x)?
    })
}

/// `nn.LayerNorm` with weight and bias: computed in f32 and rounded once, as PyTorch does in
/// f16/bf16.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    fused: candle_nn::LayerNorm,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(size, "weight")?;
        let bias = vb.get(size, "bias")?;
        Ok(Self {
            fused: candle_nn::LayerNorm::new(weight.clone(), bias.clone(), eps),
            weight,
            bias,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.track_op() {
            return Ok(self.fused.forward(x)?);
        }
        let x32 = x.to_dtype(DType::F32)?;
        let centered = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
        let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        let out = normed
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?)?
            .broadcast_add(&self.bias.to_dtype(DType::F32)?)?;
        Ok(out.to_dtype(x.dtype())?)
    }
}

/// Rotary embedding of `x` `(batch, heads, seq, head_dim)` with `cos`/`sin` `(seq, head_dim/2)`
/// or `(batch, seq, head_dim/2)`, halves rotated (Llama's `rotate_half`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(candle_nn::rotary_emb::rope(x, cos, sin)?);
    }
    // (.., seq, d/2) -> (batch or 1, 1, seq, d), broadcast over heads.
    let full = |t: &Tensor| -> Result<Tensor> {
        let t = Tensor::cat(&[t, t], D::Minus1)?;
        Ok(match t.rank() {
            2 => t.unsqueeze(0)?.unsqueeze(0)?,
            _ => t.unsqueeze(1)?,
        })
    };
    let half = x.dim(D::Minus1)? / 2;
    let rotated = Tensor::cat(
        &[
            &x.narrow(D::Minus1, half, half)?.neg()?,
            &x.narrow(D::Minus1, 0, half)?,
        ],
        D::Minus1,
    )?;
    Ok((x.broadcast_mul(&full(cos)?)? + rotated.broadcast_mul(&full(sin)?)?)?)
}
