//! DoRA (PEFT `tuners/lora/dora.py`): LoRA whose merged weight `W + ΔW` is renormalised per
//! output feature to a learned magnitude `m`: `W' = (m / ‖W + ΔW‖) (W + ΔW)`. The norm is taken
//! with gradients detached, as in the paper (§4.3) and PEFT.
//!
//! These helpers work in each base layer's own weight layout, so the LoRA layer stays generic.

use candle_core::Tensor;

use crate::base::{BaseLayer, ModuleKind};
use crate::error::Result;

/// File name of the magnitude (PEFT strips the module's `.weight`).
pub const LORA_MAGNITUDE: &str = "lora_magnitude_vector";

/// Shape of the magnitude in PEFT's files: `(out,)` for Linear/Conv1D, `(embedding_dim,)` for
/// Embedding, `(1, out, 1, 1)` for Conv2d.
pub fn magnitude_shape(base: &BaseLayer) -> Vec<usize> {
    match base.kind() {
        ModuleKind::Conv2d(_) => vec![1, base.out_features(), 1, 1],
        _ => vec![base.out_features()],
    }
}

/// `‖W + delta‖` per output feature (rows of the `(out, in)` view), as a flat vector, computed
/// in `delta`'s dtype and detached.
pub fn weight_norm(base: &BaseLayer, delta: &Tensor) -> Result<Tensor> {
    let w = base
        .weight()
        .to_dtype(delta.dtype())?
        .add(&delta.detach())?;
    let squares = w.sqr()?;
    let sum = match base.kind() {
        ModuleKind::Linear => squares.sum(1)?,
        // Stored (in, out) / (num_embeddings, dim): output features are columns.
        ModuleKind::Conv1D | ModuleKind::Embedding => squares.sum(0)?,
        ModuleKind::Conv2d(_) => squares.flatten_from(1)?.sum(1)?,
    };
    Ok(sum.sqrt()?.detach())
}

/// A per-output-feature vector shaped to scale the base weight in its own layout.
pub fn per_output_for_weight(base: &BaseLayer, v: &Tensor) -> Result<Tensor> {
    let n = v.elem_count();
    Ok(match base.kind() {
        ModuleKind::Linear => v.reshape((n, 1))?,
        ModuleKind::Conv1D | ModuleKind::Embedding => v.reshape((1, n))?,
        ModuleKind::Conv2d(_) => v.reshape((n, 1, 1, 1))?,
    })
}

/// A per-output-feature vector shaped to scale a layer output of rank `rank`.
pub fn per_output_for_activations(base: &BaseLayer, v: &Tensor, rank: usize) -> Result<Tensor> {
    let n = v.elem_count();
    Ok(match base.kind() {
        // Channels-first: (N, C, H, W) or (C, H, W).
        ModuleKind::Conv2d(_) if rank == 4 => v.reshape((1, n, 1, 1))?,
        ModuleKind::Conv2d(_) => v.reshape((n, 1, 1))?,
        _ => v.reshape(n)?,
    })
}
