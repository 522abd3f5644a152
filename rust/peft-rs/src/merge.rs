//! Arithmetic shared by every method's merge and unmerge, with PEFT's dtype rules.

use candle_core::{DType, Tensor};

use crate::base::BaseLayer;
use crate::error::{PeftError, Result};

/// The dtype PEFT keeps adapter weights in (`autocast_adapter_dtype=True`): f32 for f32, f16 and
/// bf16 bases, f64 for an f64 base.
pub fn adapter_dtype(base: DType) -> DType {
    if base == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `target + factor · delta`, computed in the delta's dtype and stored in the target's, as
/// PyTorch's in-place `+=` with type promotion does.
pub(crate) fn add_to(target: &Tensor, delta: &Tensor, factor: f64) -> Result<Tensor> {
    if target.dims() != delta.dims() {
        return Err(PeftError::shape(
            "delta weight",
            target.dims(),
            delta.dims(),
        ));
    }
    let scaled = if factor == 1.0 {
        delta.clone()
    } else {
        delta.affine(factor, 0.0)?
    };
    Ok(target
        .to_dtype(delta.dtype())?
        .add(&scaled)?
        .to_dtype(target.dtype())?)
}

/// Errors if `t` holds NaN or infinity (`safe_merge`).
pub(crate) fn check_finite(module: &str, t: &Tensor) -> Result<()> {
    let values = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if values.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(PeftError::NonFiniteMerge {
            module: module.to_string(),
        })
    }
}

/// Errors unless the layer is unmerged (for `merge`) or merged (for `unmerge`).
pub(crate) fn check_merge_state(module: &str, merged: bool, merging: bool) -> Result<()> {
    match (merged, merging) {
        (true, true) => Err(PeftError::InvalidOperation(format!(
            "`{module}` is already merged"
        ))),
        (false, false) => Err(PeftError::InvalidOperation(format!(
            "`{module}` is not merged"
        ))),
        _ => Ok(()),
    }
}

/// PEFT's additive merge `W += ΔW` (`sign = -1`: unmerge); the bias is unchanged. With `safe` the
/// result is checked for NaN/inf before anything is written.
pub(crate) fn apply_delta(
    base: &mut BaseLayer,
    module: &str,
    delta: &Tensor,
    sign: f64,
    safe: bool,
) -> Result<()> {
    let weight = add_to(base.weight(), delta, sign)?;
    if safe {
        check_finite(module, &weight)?;
    }
    let bias = base.bias().cloned();
    base.set_weights(weight, bias);
    Ok(())
}
