//! Merge and unmerge of every [`MergeRule`], written once, with PEFT's dtype rules: the update
//! is computed in the adapter's dtype (f32, or f64) and stored in the base weight's dtype.

use candle_core::{DType, Tensor};

use crate::base::{BaseLayer, ModuleKind};
use crate::error::{PeftError, Result};
use crate::kernels::linear::{add_product_in_place, matmul_scaled};
use crate::linalg::BlockFactors;
use crate::method::{MergeRule, Side};

/// The dtype PEFT keeps adapter weights in (`autocast_adapter_dtype=True`): f32 for f32, f16 and
/// bf16 bases, f64 for an f64 base.
pub fn adapter_dtype(base: DType) -> DType {
    if base == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// PEFT's guard against division by zero when unmerging a scaling (IA³).
const UNSCALE_EPS: f64 = 1e-8;

/// `weight`/`bias` with `rule` applied; also what unmerging needs to keep (DoRA's norm).
pub(crate) fn apply_rule(
    base: &BaseLayer,
    rule: &MergeRule,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>, Vec<Tensor>)> {
    match rule {
        MergeRule::Add { delta, bias: db } => Ok((
            add_to(weight, delta, 1.0)?,
            add_bias(base, bias, db.as_ref(), 1.0)?,
            Vec::new(),
        )),
        MergeRule::AddProduct { .. } => apply_rule(base, &dense(rule)?, weight, bias),
        MergeRule::Scale {
            weight: s,
            bias: sb,
        } => Ok((
            scale(weight, s, false)?,
            scale_bias(bias, sb.as_ref(), false)?,
            Vec::new(),
        )),
        MergeRule::Replace { weight: w, bias: b } => {
            if w.dims() != weight.dims() || b.is_some() != bias.is_some() {
                return Err(PeftError::shape("module copy", weight.dims(), w.dims()));
            }
            let replaced = std::iter::once(weight.clone())
                .chain(bias.cloned())
                .collect();
            // Copies: the module may merge further adapters into its weight in place, which
            // must not write into this adapter's own tensors.
            let w = w.to_dtype(weight.dtype())?.copy()?;
            let b = b.as_ref().map(|b| b.to_dtype(w.dtype())).transpose()?;
            Ok((w, b, replaced))
        }
        MergeRule::Transform {
            matrix,
            side,
            out_scale,
            ..
        } => Ok((
            transform(base, weight, matrix, *side, out_scale.as_ref(), false)?,
            bias.cloned(),
            Vec::new(),
        )),
        MergeRule::Magnitude {
            delta,
            magnitude,
            bias: db,
        } => {
            let norm = row_norms(base, weight, delta)?;
            let factor = magnitude.flatten_all()?.div(&norm)?;
            if let Some(merged) = dora_by_rows(base, weight, delta, &factor, false)? {
                let bias = add_bias(base, bias, db.as_ref(), 1.0)?;
                return Ok((merged, bias, vec![norm]));
            }
            let w = base.to_out_in(&weight.to_dtype(delta.dtype())?.add(delta)?)?;
            let merged = base.from_out_in(&w.broadcast_mul(&factor.unsqueeze(1)?)?)?;
            Ok((
                merged.to_dtype(weight.dtype())?,
                add_bias(base, bias, db.as_ref(), 1.0)?,
                vec![norm],
            ))
        }
    }
}

/// [`apply_rule`] (or with `undo`, [`undo_rule`]) writing an additive or scaling rule into
/// `weight`'s own storage, as PEFT's in-place merge does: the caller must own the tensor (a
/// module's base weight). Returns the new bias, or `None` where the rule or layout needs the
/// out-of-place path (nothing is written then).
pub(crate) fn apply_rule_in_place(
    base: &BaseLayer,
    rule: &MergeRule,
    weight: &Tensor,
    bias: Option<&Tensor>,
    undo: bool,
) -> Result<Option<Option<Tensor>>> {
    use crate::kernels::elementwise::InPlace;
    let sign = if undo { -1.0 } else { 1.0 };
    match rule {
        MergeRule::AddProduct {
            left,
            right,
            scale,
            bias: db,
        } => {
            let fits = matches!(base.kind(), ModuleKind::Linear);
            if fits && add_product_in_place(weight, left, right, sign * scale)? {
                return Ok(Some(add_bias(base, bias, db.as_ref(), sign)?));
            }
            return apply_rule_in_place(base, &dense(rule)?, weight, bias, undo);
        }
        MergeRule::Add { delta, bias: db } => {
            let op = InPlace::AddScaled {
                factor: sign as f32,
            };
            if op.apply(weight, delta)? {
                return Ok(Some(add_bias(base, bias, db.as_ref(), sign)?));
            }
        }
        MergeRule::Scale {
            weight: s,
            bias: sb,
        } => {
            let op = InPlace::Scale {
                per_row: s.dims().first() != Some(&1),
                undo,
                eps: UNSCALE_EPS as f32,
            };
            if op.apply(weight, s)? {
                return Ok(Some(scale_bias(bias, sb.as_ref(), undo)?));
            }
        }
        _ => {}
    }
    Ok(None)
}

/// The inverse of [`apply_rule`]; `cache` is what `apply_rule` returned.
pub(crate) fn undo_rule(
    base: &BaseLayer,
    rule: &MergeRule,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cache: &[Tensor],
) -> Result<(Tensor, Option<Tensor>)> {
    match rule {
        MergeRule::Add { delta, bias: db } => Ok((
            add_to(weight, delta, -1.0)?,
            add_bias(base, bias, db.as_ref(), -1.0)?,
        )),
        MergeRule::AddProduct { .. } => undo_rule(base, &dense(rule)?, weight, bias, cache),
        MergeRule::Scale {
            weight: s,
            bias: sb,
        } => Ok((
            scale(weight, s, true)?,
            scale_bias(bias, sb.as_ref(), true)?,
        )),
        MergeRule::Transform {
            inverse,
            side,
            out_scale,
            ..
        } => Ok((
            transform(base, weight, inverse, *side, out_scale.as_ref(), true)?,
            bias.cloned(),
        )),
        MergeRule::Replace { .. } => match cache {
            [w] => Ok((w.clone(), None)),
            [w, b] => Ok((w.clone(), Some(b.clone()))),
            _ => Err(PeftError::InvalidOperation(
                "a replaced module's unmerge needs the weights kept at merge".into(),
            )),
        },
        MergeRule::Magnitude {
            delta,
            magnitude,
            bias: db,
        } => {
            let norm = cache.first().ok_or_else(|| {
                PeftError::InvalidOperation("DoRA unmerge needs the norm kept at merge".into())
            })?;
            let factor = magnitude.flatten_all()?.div(norm)?;
            if let Some(unmerged) = dora_by_rows(base, weight, delta, &factor, true)? {
                return Ok((unmerged, add_bias(base, bias, db.as_ref(), -1.0)?));
            }
            let w = base.to_out_in(&weight.to_dtype(delta.dtype())?)?;
            let unscaled = base.from_out_in(&w.broadcast_div(&factor.unsqueeze(1)?)?)?;
            Ok((
                unscaled.sub(delta)?.to_dtype(weight.dtype())?,
                add_bias(base, bias, db.as_ref(), -1.0)?,
            ))
        }
    }
}

/// [`MergeRule::AddProduct`] as [`MergeRule::Add`] with `ΔW` formed (other rules as they are).
pub fn dense(rule: &MergeRule) -> Result<MergeRule> {
    Ok(match rule {
        MergeRule::AddProduct {
            left,
            right,
            scale,
            bias,
        } => MergeRule::Add {
            delta: matmul_scaled(left, right, *scale)?,
            bias: bias.clone(),
        },
        other => other.clone(),
    })
}

/// DoRA's merge (or with `undo` its inverse) in one parallel pass where the weight's rows are its
/// output features (Linear, Conv2d); `None` elsewhere.
fn dora_by_rows(
    base: &BaseLayer,
    weight: &Tensor,
    delta: &Tensor,
    factor: &Tensor,
    undo: bool,
) -> Result<Option<Tensor>> {
    if matches!(base.kind(), ModuleKind::Conv1D | ModuleKind::Embedding) {
        return Ok(None);
    }
    let (w, d) = (weight.flatten_from(1)?, delta.flatten_from(1)?);
    let done = crate::kernels::elementwise::dora_rows(&w, &d, factor, undo)?;
    done.map(|t| Ok(t.reshape(weight.dims())?)).transpose()
}

/// `‖W + delta‖` per output feature (rows of the `(out, in)` view), flat, in `delta`'s dtype and
/// detached (DoRA's norm).
pub fn row_norms(base: &BaseLayer, weight: &Tensor, delta: &Tensor) -> Result<Tensor> {
    let by_rows = !matches!(base.kind(), ModuleKind::Conv1D | ModuleKind::Embedding);
    if by_rows && delta.dtype() == DType::F32 {
        let (w, d) = (weight.flatten_from(1)?, delta.detach().flatten_from(1)?);
        if let Some(norms) = crate::kernels::elementwise::row_norms_of_sum(&w, &d)? {
            return Ok(norms);
        }
    }
    let w = weight.to_dtype(delta.dtype())?.add(&delta.detach())?;
    let squares = base.to_out_in(&w)?.sqr()?;
    Ok(squares.sum(1)?.sqrt()?.detach())
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
    if let Some(sum) = crate::kernels::elementwise::add_scaled(target, delta, factor)? {
        return Ok(sum);
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

fn add_bias(
    base: &BaseLayer,
    bias: Option<&Tensor>,
    delta: Option<&Tensor>,
    factor: f64,
) -> Result<Option<Tensor>> {
    match (bias, delta) {
        (b, None) => Ok(b.cloned()),
        (Some(b), Some(d)) => Ok(Some(add_to(b, d, factor)?)),
        (None, Some(_)) => Err(PeftError::InvalidOperation(format!(
            "an adapter bias cannot be merged into a {:?} layer without a bias",
            base.kind()
        ))),
    }
}

fn scale(t: &Tensor, s: &Tensor, undo: bool) -> Result<Tensor> {
    if let Some(scaled) = crate::kernels::elementwise::scale_2d(t, s, undo, UNSCALE_EPS)? {
        return Ok(scaled);
    }
    let t32 = t.to_dtype(s.dtype())?;
    let out = if undo {
        t32.broadcast_div(&(s + UNSCALE_EPS)?)?
    } else {
        t32.broadcast_mul(s)?
    };
    Ok(out.to_dtype(t.dtype())?)
}

fn scale_bias(bias: Option<&Tensor>, s: Option<&Tensor>, undo: bool) -> Result<Option<Tensor>> {
    match (bias, s) {
        (Some(b), Some(s)) => Ok(Some(scale(b, &s.reshape(b.dims())?, undo)?)),
        (b, _) => Ok(b.cloned()),
    }
}

fn transform(
    base: &BaseLayer,
    weight: &Tensor,
    matrix: &BlockFactors,
    side: Side,
    out_scale: Option<&Tensor>,
    undo: bool,
) -> Result<Tensor> {
    let dtype = matrix.dtype();
    let mut w = base.to_out_in(weight)?;
    let s = out_scale
        .map(|s| s.flatten_all()?.unsqueeze(1))
        .transpose()?;
    if undo && let Some(s) = &s {
        w = w.to_dtype(dtype)?.broadcast_div(s)?;
    }
    // Input: W·Rᵀ, rows times Rᵀ; output: Rᵀ·W = (Wᵀ·R)ᵀ.
    w = match side {
        Side::Input => matrix.transpose()?.rows_times(&w.contiguous()?, dtype)?,
        Side::Output => matrix.rows_times(&w.t()?.contiguous()?, dtype)?.t()?,
    };
    if !undo && let Some(s) = &s {
        w = w.broadcast_mul(s)?;
    }
    Ok(base.from_out_in(&w)?.to_dtype(weight.dtype())?)
}

/// Errors if `t` holds NaN or infinity (`safe_merge`). `t - t` is 0 for finite values and NaN
/// otherwise, so one reduction on `t`'s device tells.
pub(crate) fn check_finite(module: &str, t: &Tensor) -> Result<()> {
    let probe = t
        .sub(t)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    if probe == 0.0 {
        Ok(())
    } else {
        Err(PeftError::NonFiniteMerge {
            module: module.to_string(),
        })
    }
}
