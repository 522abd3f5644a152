//! Parallel element-wise passes over whole weights (merging and unmerging): candle's CPU
//! element-wise ops run on one thread, which leaves a merge memory-bound on one core.
//! Each returns `None` where it does not apply (not CPU, gradients recorded, other layouts or
//! dtypes) and the caller uses candle's ops, which compute the same values.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, DType, Device, Layout, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::bf16::{round_into, round_into_uninit, widen, widen_into};
use super::{Elements, fp16};
use crate::error::Result;

/// Elements per parallel task: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 15;

/// The elements of a contiguous CPU tensor (f32, bf16 or f16) that records no gradient.
fn with_values<T>(t: &Tensor, f: impl FnOnce(Elements) -> T) -> Option<T> {
    if !t.device().is_cpu() || t.track_op() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    match cpu {
        candle_core::CpuStorage::F32(v) => Some(f(Elements::F32(&v[start..end]))),
        candle_core::CpuStorage::BF16(v) => Some(f(Elements::Bf16(&v[start..end]))),
        candle_core::CpuStorage::F16(v) => Some(f(Elements::F16(&v[start..end]))),
        _ => None,
    }
}

/// `target` widened to f32, then `op(first, chunk)` on it in place, in parallel over chunks of
/// whole rows of `cols` elements (`first`: the chunk's first row), stored as a tensor of `dims`
/// in `dtype` (f32, or bf16 or f16 rounded once chunk by chunk: no f32 copy of the whole). Ops
/// are written per slice so that the compiler vectorises them.
fn map_rows(
    target: Elements,
    cols: usize,
    dtype: DType,
    dims: &[usize],
    op: impl Fn(usize, &mut [f32]) + Sync,
) -> Result<Tensor> {
    let n = target.len();
    let rows_per_chunk = (CHUNK / cols.max(1)).max(1);
    let chunk_len = rows_per_chunk * cols.max(1);
    let fill = |c: usize, wide: &mut [f32]| {
        target.widen_range(c * chunk_len..c * chunk_len + wide.len(), wide);
        op(c * rows_per_chunk, wide);
    };
    // Not zeroed first: every element is written once.
    fn rounded<T: Send>(
        n: usize,
        chunk_len: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
        round: fn(&[f32], &mut [MaybeUninit<T>]),
    ) -> Vec<T> {
        let mut out = Vec::with_capacity(n);
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut wide = vec![0f32; chunk.len()];
                fill(c, &mut wide);
                round(&wide, chunk);
            });
        // SAFETY: the chunks cover all n elements, each written above.
        unsafe { out.set_len(n) };
        out
    }
    Ok(match dtype {
        DType::BF16 => {
            let out = rounded(n, chunk_len, fill, round_into_uninit);
            Tensor::from_vec(out, dims, &Device::Cpu)?
        }
        DType::F16 => {
            let out = rounded(n, chunk_len, fill, fp16::round_into_uninit);
            Tensor::from_vec(out, dims, &Device::Cpu)?
        }
        _ => {
            let mut out = vec![0f32; n];
            out.par_chunks_mut(chunk_len)
                .enumerate()
                .for_each(|(c, chunk)| fill(c, chunk));
            Tensor::from_vec(out, dims, &Device::Cpu)?
        }
    })
}

/// `target + factor · delta` computed in f32 and stored in `target`'s dtype (f32, bf16 or f16);
/// `delta` f32 of the same shape.
pub(crate) fn add_scaled(target: &Tensor, delta: &Tensor, factor: f64) -> Result<Option<Tensor>> {
    add_scaled_as(target, delta, factor, target.dtype())
}

/// [`add_scaled`] stored in `dtype` (f32, bf16 or f16).
pub(crate) fn add_scaled_as(
    target: &Tensor,
    delta: &Tensor,
    factor: f64,
    dtype: DType,
) -> Result<Option<Tensor>> {
    if target.dims() != delta.dims() || delta.dtype() != DType::F32 {
        return Ok(None);
    }
    let factor = factor as f32;
    with_values(delta, |d| {
        let Elements::F32(d) = d else { return None };
        with_values(target, |t| {
            map_rows(t, 1, dtype, target.dims(), |first, out| {
                let d = &d[first..first + out.len()];
                out.iter_mut().zip(d).for_each(|(o, d)| *o += factor * d);
            })
        })
    })
    .flatten()
    .transpose()
}

/// `t ⊙ s` (or `t ⊘ (s + eps)` with `undo`) for a 2-D `t` and an f32 `s` that is a column
/// `(rows, 1)` or a row `(1, cols)`; in f32, stored in `t`'s dtype (f32, bf16 or f16).
pub(crate) fn scale_2d(t: &Tensor, s: &Tensor, undo: bool, eps: f64) -> Result<Option<Tensor>> {
    let (Ok((rows, cols)), Ok((sr, sc))) = (t.dims2(), s.dims2()) else {
        return Ok(None);
    };
    let per_row = (sr, sc) == (rows, 1);
    // A recorded `s` (a trained scale) keeps candle's ops, which carry its gradient.
    if !(per_row || (sr, sc) == (1, cols)) || s.dtype() != DType::F32 || s.track_op() {
        return Ok(None);
    }
    let factors = s.flatten_all()?.to_vec1::<f32>()?;
    let eps = eps as f32;
    // Per row: one factor for the whole row; per column: the factors zipped with each row.
    let scale_row = |row: usize, values: &mut [f32]| match (per_row, undo) {
        (true, false) => values.iter_mut().for_each(|v| *v *= factors[row]),
        (true, true) => {
            let f = factors[row] + eps;
            values.iter_mut().for_each(|v| *v /= f)
        }
        (false, false) => values.iter_mut().zip(&factors).for_each(|(v, f)| *v *= f),
        (false, true) => values
            .iter_mut()
            .zip(&factors)
            .for_each(|(v, f)| *v /= f + eps),
    };
    with_values(t, |v| {
        map_rows(v, cols, t.dtype(), t.dims(), |first, out| {
            for (r, row) in out.chunks_mut(cols.max(1)).enumerate() {
                scale_row(first + r, row);
            }
        })
    })
    .transpose()
}

/// DoRA's merge of 2-D tensors, row by row in f32 and stored in `weight`'s dtype (f32, bf16 or f16):
/// `(weight_i + delta_i) · factor_i`, or with `undo` its inverse `weight_i / factor_i - delta_i`;
/// `delta` f32 of `weight`'s shape, one factor per row. One pass where candle's ops take four.
pub(crate) fn dora_rows(
    weight: &Tensor,
    delta: &Tensor,
    factors: &Tensor,
    undo: bool,
) -> Result<Option<Tensor>> {
    let Ok((rows, cols)) = weight.dims2() else {
        return Ok(None);
    };
    if weight.dims() != delta.dims()
        || delta.dtype() != DType::F32
        || factors.dtype() != DType::F32
        || factors.elem_count() != rows
        || factors.track_op()
    {
        return Ok(None);
    }
    let factors = factors.flatten_all()?.to_vec1::<f32>()?;
    with_values(delta, |d| {
        let Elements::F32(d) = d else { return None };
        with_values(weight, |w| {
            map_rows(w, cols, weight.dtype(), weight.dims(), |first, out| {
                let d = &d[first * cols..first * cols + out.len()];
                let rows = out.chunks_mut(cols.max(1)).zip(d.chunks(cols.max(1)));
                for (r, (row, d)) in rows.enumerate() {
                    let f = factors[first + r];
                    if undo {
                        row.iter_mut().zip(d).for_each(|(v, d)| *v = *v / f - d);
                    } else {
                        row.iter_mut().zip(d).for_each(|(v, d)| *v = (*v + d) * f);
                    }
                }
            })
        })
    })
    .flatten()
    .transpose()
}

/// `(a ⊙ b) · scale` for f32 tensors of one shape (LoHa's ΔW), in parallel.
pub(crate) fn mul_scaled(a: &Tensor, b: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if a.dims() != b.dims() || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return Ok(None);
    }
    let (scale, dims) = (scale as f32, a.dims());
    with_values(b, |b| {
        let Elements::F32(b) = b else { return None };
        with_values(a, |a| {
            map_rows(a, 1, DType::F32, dims, |first, out| {
                let b = &b[first..first + out.len()];
                out.iter_mut()
                    .zip(b)
                    .for_each(|(o, b)| *o = (*o * b) * scale);
            })
        })
    })
    .flatten()
    .transpose()
}

/// `((a1·b1) ⊙ (a2·b2)) · scale` for f32 `a (m, r)` and `b (r, n)` (LoHa's ΔW) row by row in
/// parallel: each output row is formed from the factors' rows in cache and written once, where
/// the two products and their Hadamard product took three full-size passes and two temporaries.
pub(crate) fn hadamard_of_products(
    (a1, b1): (&Tensor, &Tensor),
    (a2, b2): (&Tensor, &Tensor),
    scale: f64,
) -> Result<Option<Tensor>> {
    let all = [a1, b1, a2, b2];
    if all
        .iter()
        .any(|t| t.rank() != 2 || t.dtype() != DType::F32 || !t.device().is_cpu() || t.track_op())
    {
        return Ok(None);
    }
    let ((m, r1), (_, n), (_, r2)) = (a1.dims2()?, b1.dims2()?, a2.dims2()?);
    if b1.dim(0)? != r1 || a2.dim(0)? != m || b2.dims2()? != (r2, n) {
        return Ok(None);
    }
    let [a1, b1, a2, b2] = all.map(|t| t.flatten_all().and_then(|t| t.to_vec1::<f32>()));
    let (a1, b1, a2, b2) = (a1?, b1?, a2?, b2?);
    let scale = scale as f32;
    let mut out = vec![0f32; m * n];
    let rows_per_task = (CHUNK / n.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * n.max(1))
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut second = vec![0f32; n];
            for (k, row) in chunk.chunks_mut(n.max(1)).enumerate() {
                let i = c * rows_per_task + k;
                let first = (&a1[i * r1..(i + 1) * r1], &b1[..]);
                let other = (&a2[i * r2..(i + 1) * r2], &b2[..]);
                hadamard_row(row, &mut second, first, other, scale);
            }
        });
    Ok(Some(Tensor::from_vec(out, (m, n), &Device::Cpu)?))
}

/// `row = ((a1·b1) ⊙ (a2·b2)) · scale` for one row of the `a`s, `second` a scratch row;
/// compiled for AVX-512 or AVX2 + FMA where the CPU has them.
fn hadamard_row(
    row: &mut [f32],
    second: &mut [f32],
    first: (&[f32], &[f32]),
    other: (&[f32], &[f32]),
    scale: f32,
) {
    #[inline(always)]
    fn inline(
        row: &mut [f32],
        second: &mut [f32],
        first: (&[f32], &[f32]),
        other: (&[f32], &[f32]),
        scale: f32,
    ) {
        let n = row.len();
        for (target, (a, b)) in [(&mut *row, first), (&mut *second, other)] {
            target.fill(0.0);
            for (p, &ap) in a.iter().enumerate() {
                let b_row = &b[p * n..(p + 1) * n];
                target.iter_mut().zip(b_row).for_each(|(t, b)| *t += ap * b);
            }
        }
        row.iter_mut()
            .zip(&*second)
            .for_each(|(o, v)| *o = (*o * v) * scale);
    }
    with_simd!((
        row: &mut [f32],
        second: &mut [f32],
        first: (&[f32], &[f32]),
        other: (&[f32], &[f32]),
        scale: f32,
    ) => inline(row, second, first, other, scale))
}

/// `kron(a, b) · scale` for 2-D f32 `a (p, q)` and `b (r, t)`: `(p·r, q·t)` (LoKr's ΔW), in
/// parallel.
pub(crate) fn kron_scaled(a: &Tensor, b: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let (Ok((_, q)), Ok((r, t))) = (a.dims2(), b.dims2()) else {
        return Ok(None);
    };
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return Ok(None);
    }
    let (p, scale) = (a.dim(0)?, scale as f32);
    let cols = q * t;
    let product = with_values(b, |b_vals| {
        let Elements::F32(b_vals) = b_vals else {
            return None;
        };
        with_values(a, |a_vals| {
            let Elements::F32(a_vals) = a_vals else {
                return None;
            };
            let mut out = vec![0f32; p * r * cols];
            // One task per output row: row i·r + k is a's row i times b's row k, blockwise.
            out.par_chunks_mut(cols.max(1))
                .enumerate()
                .for_each(|(row, o)| {
                    let (i, k) = (row / r, row % r);
                    let b_row = &b_vals[k * t..(k + 1) * t];
                    for (j, block) in o.chunks_mut(t.max(1)).enumerate() {
                        let a_ij = a_vals[i * q + j];
                        for (o, b) in block.iter_mut().zip(b_row) {
                            *o = (a_ij * b) * scale;
                        }
                    }
                });
            Some(out)
        })
        .flatten()
    })
    .flatten();
    product
        .map(|v| Ok(Tensor::from_vec(v, (p * r, cols), &Device::Cpu)?))
        .transpose()
}

/// `‖weight_i + delta_i‖` for each row `i` of 2-D tensors (DoRA's norm), accumulated in f64;
/// `weight` f32, bf16 or f16, `delta` f32, both contiguous.
pub(crate) fn row_norms_of_sum(weight: &Tensor, delta: &Tensor) -> Result<Option<Tensor>> {
    let (Ok((rows, cols)), true) = (weight.dims2(), delta.dtype() == DType::F32) else {
        return Ok(None);
    };
    if weight.dims() != delta.dims() {
        return Ok(None);
    }
    let norms = with_values(delta, |d| {
        let Elements::F32(d) = d else { return None };
        with_values(weight, |w| {
            let mut norms = vec![0f32; rows];
            norms.par_iter_mut().enumerate().for_each(|(i, norm)| {
                let d = &d[i * cols..(i + 1) * cols];
                let sum: f64 = match &w {
                    Elements::F32(w) => w[i * cols..(i + 1) * cols]
                        .iter()
                        .zip(d)
                        .map(|(w, d)| f64::from(w + d).powi(2))
                        .sum(),
                    Elements::Bf16(w) => w[i * cols..(i + 1) * cols]
                        .iter()
                        .zip(d)
                        .map(|(w, d)| f64::from(widen(*w) + d).powi(2))
                        .sum(),
                    Elements::F16(w) => w[i * cols..(i + 1) * cols]
                        .iter()
                        .zip(d)
                        .map(|(w, d)| f64::from(w.to_f32() + d).powi(2))
                        .sum(),
                };
                *norm = sum.sqrt() as f32;
            });
            norms
        })
    })
    .flatten();
    norms
        .map(|v| Ok(Tensor::from_vec(v, rows, &Device::Cpu)?))
        .transpose()
}

/// `x (…, r·b)` with each of its `r` feature blocks of `b` multiplied by its `b × b` block of
/// `blocks` (`(r, b, b)`, or `(1, b, b)` shared by all), `y_blk = x_blk · R_blk` (OFT's input
/// rotation): in f32 from `x` widened, stored in `dtype` (f32, or bf16 or f16 rounded once), in
/// parallel over rows. One pass where candle takes a cast, a transposing copy, a batched
/// matmul and another cast.
pub(crate) fn rotate_blocks(x: &Tensor, blocks: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
    let Ok((count, b, b2)) = blocks.dims3() else {
        return Ok(None);
    };
    let k = x.dims().last().copied().unwrap_or(0);
    let shared = count == 1;
    if b != b2 || b == 0 || blocks.dtype() != DType::F32 || blocks.track_op() || k % b != 0 {
        return Ok(None);
    }
    let r = k / b;
    if !shared && count != r {
        return Ok(None);
    }
    let rotation = blocks.flatten_all()?.to_vec1::<f32>()?;
    with_values(x, |v| {
        map_rows(v, k, dtype, x.dims(), |_, rows| {
            if b <= SMALL_BLOCK {
                small_block_products(rows, b, &rotation, shared);
                return;
            }
            let mut out = vec![0f32; rows.len()];
            // Per block, a (rows × b)·(b × b) product over strided views of the chunk.
            let n = rows.len() / k;
            for blk in 0..r {
                let rot = &rotation[if shared { 0 } else { blk * b * b }..][..b * b];
                // SAFETY: rows 0..n with stride k and columns blk·b..(blk + 1)·b lie inside
                // `rows` and `out` (n·k elements each); the views do not outlive them.
                unsafe {
                    let lhs = faer::MatRef::from_raw_parts(
                        rows.as_ptr().add(blk * b),
                        n,
                        b,
                        k as isize,
                        1,
                    );
                    let dst = faer::MatMut::from_raw_parts_mut(
                        out.as_mut_ptr().add(blk * b),
                        n,
                        b,
                        k as isize,
                        1,
                    );
                    let rhs = faer::MatRef::from_row_major_slice(rot, b, b);
                    faer::linalg::matmul::matmul(
                        dst,
                        faer::Accum::Replace,
                        lhs,
                        rhs,
                        1.0,
                        faer::Par::Seq,
                    );
                }
            }
            rows.copy_from_slice(&out);
        })
    })
    .transpose()
}

/// Block sizes up to which [`rotate_blocks`] multiplies with plain loops: faer's per-call cost
/// dominated products of 8 × 8 blocks (width 1024, 4096 rows: 128 calls per chunk of 32 rows).
const SMALL_BLOCK: usize = 16;

/// `x_blk ← x_blk · R_blk` for every block of `b` columns of the rows in `x` (blocks of
/// `rotation` in turn, or its one block when `shared`), compiled for AVX-512 or AVX2 + FMA
/// where the CPU has them: a block row is one vector.
fn small_block_products(x: &mut [f32], b: usize, rotation: &[f32], shared: bool) {
    /// Blocks of a size known here, so that a block row is a fixed number of lanes.
    #[inline(always)]
    fn fixed<const B: usize>(x: &mut [f32], rotation: &[f32], shared: bool) {
        let per_row = if shared { 1 } else { rotation.len() / (B * B) };
        let (rot, _) = rotation.as_chunks::<B>();
        let (blocks, _) = x.as_chunks_mut::<B>();
        for (i, block) in blocks.iter_mut().enumerate() {
            let rot = &rot[(i % per_row) * B..][..B];
            let mut acc = [0f32; B];
            for (xv, rot_row) in block.iter().zip(rot) {
                for c in 0..B {
                    acc[c] += xv * rot_row[c];
                }
            }
            *block = acc;
        }
    }
    #[inline(always)]
    fn products(x: &mut [f32], b: usize, rotation: &[f32], shared: bool) {
        match b {
            2 => fixed::<2>(x, rotation, shared),
            4 => fixed::<4>(x, rotation, shared),
            8 => fixed::<8>(x, rotation, shared),
            16 => fixed::<16>(x, rotation, shared),
            _ => {
                let per_row = if shared { 1 } else { rotation.len() / (b * b) };
                let mut acc = vec![0f32; b];
                for (i, block) in x.chunks_exact_mut(b).enumerate() {
                    let rot = &rotation[(i % per_row) * b * b..][..b * b];
                    acc.fill(0.0);
                    for (xv, rot_row) in block.iter().zip(rot.chunks_exact(b)) {
                        acc.iter_mut().zip(rot_row).for_each(|(o, r)| *o += xv * r);
                    }
                    block.copy_from_slice(&acc);
                }
            }
        }
    }
    with_simd!((x: &mut [f32], b: usize, rotation: &[f32], shared: bool) => products(x, b, rotation, shared))
}

/// In-place forms of [`add_scaled`] and [`scale_2d`] (merging into a weight the module owns,
/// as PEFT's in-place `+=` and `*=`): same values, no new buffer.
pub(crate) enum InPlace {
    AddScaled { factor: f32 },
    Scale { per_row: bool, undo: bool, eps: f32 },
}

impl InPlace {
    /// Applies the op to `target` with `operand` (the delta or the factors); false where it does
    /// not apply (layouts, dtypes, devices): nothing is written then.
    pub(crate) fn apply(&self, target: &Tensor, operand: &Tensor) -> Result<bool> {
        let fits = |t: &Tensor| t.device().is_cpu() && !t.track_op() && t.is_contiguous();
        let shapes_fit = match self {
            Self::AddScaled { .. } => target.dims() == operand.dims(),
            Self::Scale { per_row, .. } => match (target.dims2(), operand.dims2()) {
                (Ok((rows, cols)), Ok(dims)) => {
                    dims == if *per_row { (rows, 1) } else { (1, cols) }
                }
                _ => false,
            },
        };
        if !fits(target)
            || !fits(operand)
            || !shapes_fit
            || operand.dtype() != DType::F32
            || !matches!(target.dtype(), DType::F32 | DType::BF16 | DType::F16)
        {
            return Ok(false);
        }
        target.inplace_op2(operand, self)?;
        Ok(true)
    }

    /// `op(first_row, values)` over chunks of whole rows of `cols`, in f32.
    fn run(&self, target: &mut [f32], operand: &[f32], cols: usize) {
        let rows_per_chunk = (CHUNK / cols.max(1)).max(1);
        target
            .par_chunks_mut(rows_per_chunk * cols.max(1))
            .enumerate()
            .for_each(|(c, chunk)| self.rows(c * rows_per_chunk, chunk, operand, cols));
    }

    /// [`Self::run`] on a half-precision `target`, widened a chunk at a time and rounded back.
    fn run_widened<T: Send>(
        &self,
        target: &mut [T],
        operand: &[f32],
        cols: usize,
        widen: fn(&[T], &mut [f32]),
        round: fn(&[f32], &mut [T]),
    ) {
        let rows_per_chunk = (CHUNK / cols.max(1)).max(1);
        target
            .par_chunks_mut(rows_per_chunk * cols.max(1))
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut wide = vec![0f32; chunk.len()];
                widen(chunk, &mut wide);
                self.rows(c * rows_per_chunk, &mut wide, operand, cols);
                round(&wide, chunk);
            });
    }

    /// [`Self::rows_inline`] compiled for AVX-512 or AVX2 + FMA where the CPU has them (the
    /// portable build's loops are SSE2).
    fn rows(&self, first: usize, values: &mut [f32], operand: &[f32], cols: usize) {
        let op = self;
        with_simd!((op: &InPlace, first: usize, values: &mut [f32], operand: &[f32], cols: usize)
            => op.rows_inline(first, values, operand, cols))
    }

    #[inline(always)]
    fn rows_inline(&self, first: usize, values: &mut [f32], operand: &[f32], cols: usize) {
        match *self {
            Self::AddScaled { factor } => {
                let start = first * cols;
                let d = &operand[start..start + values.len()];
                values.iter_mut().zip(d).for_each(|(v, d)| *v += factor * d);
            }
            Self::Scale { per_row, undo, eps } => {
                for (r, row) in values.chunks_mut(cols.max(1)).enumerate() {
                    match (per_row, undo) {
                        (true, false) => row.iter_mut().for_each(|v| *v *= operand[first + r]),
                        (true, true) => {
                            let f = operand[first + r] + eps;
                            row.iter_mut().for_each(|v| *v /= f)
                        }
                        (false, false) => row.iter_mut().zip(operand).for_each(|(v, f)| *v *= f),
                        (false, true) => {
                            row.iter_mut().zip(operand).for_each(|(v, f)| *v /= f + eps)
                        }
                    }
                }
            }
        }
    }

    /// Columns per row the op works on: the whole tensor is one "row" for element-wise adds.
    fn cols(&self, l: &Layout) -> usize {
        match self {
            Self::AddScaled { .. } => 1,
            Self::Scale { .. } => l.dims().last().copied().unwrap_or(1),
        }
    }
}

impl candle_core::InplaceOp2 for InPlace {
    fn name(&self) -> &'static str {
        "merge-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((start, end)), Some((o_start, o_end))) =
            (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("merging in place needs contiguous tensors");
        };
        let CpuStorage::F32(operand) = s2 else {
            candle_core::bail!("merging in place needs an f32 operand");
        };
        let (operand, cols) = (&operand[o_start..o_end], self.cols(l1));
        match s1 {
            CpuStorage::F32(t) => self.run(&mut t[start..end], operand, cols),
            // Widened chunk by chunk: the same f32 arithmetic, one rounding back.
            CpuStorage::BF16(t) => {
                self.run_widened(&mut t[start..end], operand, cols, widen_into, round_into)
            }
            CpuStorage::F16(t) => self.run_widened(
                &mut t[start..end],
                operand,
                cols,
                fp16::widen_into,
                fp16::round_into,
            ),
            _ => candle_core::bail!("merging in place needs an f32, bf16 or f16 weight"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::Initializer;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
        d.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    fn uniform(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
        Initializer::new(seed).uniform(dims, 1.0, dtype).unwrap()
    }

    /// Each pass equals candle's ops (the path it replaces) exactly: same operations in the
    /// same order, one rounding to the output dtype.
    #[test]
    fn every_pass_equals_candles_ops_exactly() {
        for dims in [[1, 1], [3, 5], [257, 130]] {
            let delta = uniform(&dims, 2, DType::F32);
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let target = uniform(&dims, 1, dtype);
                for factor in [1.0, -0.37] {
                    let fast = add_scaled(&target, &delta, factor).unwrap().unwrap();
                    let plain = target
                        .to_dtype(DType::F32)
                        .unwrap()
                        .add(&delta.affine(factor, 0.0).unwrap())
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    assert_eq!(fast.dtype(), dtype);
                    assert_eq!(max_diff(&fast, &plain), 0.0, "add {dims:?} {dtype:?}");
                }
                let factors = uniform(&[dims[0]], 7, DType::F32);
                for undo in [false, true] {
                    let fast = dora_rows(&target, &delta, &factors, undo).unwrap().unwrap();
                    let (t32, f) = (
                        target.to_dtype(DType::F32).unwrap(),
                        factors.unsqueeze(1).unwrap(),
                    );
                    let plain = if undo {
                        t32.broadcast_div(&f).unwrap().sub(&delta)
                    } else {
                        t32.add(&delta).unwrap().broadcast_mul(&f)
                    };
                    let plain = plain.unwrap().to_dtype(dtype).unwrap();
                    assert_eq!(max_diff(&fast, &plain), 0.0, "dora {dims:?} {undo}");
                }
                for s_dims in [[dims[0], 1], [1, dims[1]]] {
                    let s = uniform(&s_dims, 3, DType::F32);
                    for undo in [false, true] {
                        let fast = scale_2d(&target, &s, undo, 1e-8).unwrap().unwrap();
                        let t32 = target.to_dtype(DType::F32).unwrap();
                        let plain = if undo {
                            t32.broadcast_div(&(&s + 1e-8).unwrap())
                        } else {
                            t32.broadcast_mul(&s)
                        };
                        let plain = plain.unwrap().to_dtype(dtype).unwrap();
                        assert_eq!(max_diff(&fast, &plain), 0.0, "scale {s_dims:?} {undo}");
                    }
                }
            }
            let (a, b) = (uniform(&dims, 4, DType::F32), uniform(&dims, 5, DType::F32));
            let plain = a.mul(&b).unwrap().affine(0.3, 0.0).unwrap();
            let fast = mul_scaled(&a, &b, 0.3).unwrap().unwrap();
            assert_eq!(max_diff(&fast, &plain), 0.0, "mul {dims:?}");
            let small = uniform(&[2, 3], 6, DType::F32);
            let plain = crate::methods::lokr::kron(&a, &small)
                .unwrap()
                .affine(1.7, 0.0)
                .unwrap();
            let fast = kron_scaled(&a, &small, 1.7).unwrap().unwrap();
            assert_eq!(max_diff(&fast, &plain), 0.0, "kron {dims:?}");
        }
    }

    #[test]
    fn row_norms_equal_candles_within_f32_rounding() {
        for (dims, dtype) in [
            ([1, 1], DType::F32),
            ([7, 300], DType::BF16),
            ([9, 70], DType::F16),
            ([65, 9], DType::F32),
        ] {
            let (w, d) = (uniform(&dims, 1, dtype), uniform(&dims, 2, DType::F32));
            let fast = row_norms_of_sum(&w, &d).unwrap().unwrap();
            let sum = w.to_dtype(DType::F32).unwrap().add(&d).unwrap();
            let plain = sum.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
            assert!(max_diff(&fast, &plain) < 1e-5, "{dims:?} {dtype:?}");
        }
    }

    #[test]
    fn in_place_passes_write_what_the_copying_ones_return() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let dims = [67, 130];
            let delta = uniform(&dims, 2, DType::F32);
            let target = uniform(&dims, 1, dtype);
            let want = add_scaled(&target, &delta, -1.0).unwrap().unwrap();
            let op = InPlace::AddScaled { factor: -1.0 };
            assert!(op.apply(&target, &delta).unwrap());
            assert_eq!(max_diff(&target, &want), 0.0, "add {dtype:?}");
            for (s_dims, per_row) in [([67, 1], true), ([1, 130], false)] {
                let s = uniform(&s_dims, 3, DType::F32);
                for undo in [false, true] {
                    let want = scale_2d(&target, &s, undo, 1e-8).unwrap().unwrap();
                    let op = InPlace::Scale {
                        per_row,
                        undo,
                        eps: 1e-8,
                    };
                    let t = target.copy().unwrap();
                    assert!(op.apply(&t, &s).unwrap());
                    assert_eq!(max_diff(&t, &want), 0.0, "scale {s_dims:?} {undo}");
                }
            }
            let wrong = uniform(&[1, 67], 3, DType::F32);
            let op = InPlace::Scale {
                per_row: false,
                undo: false,
                eps: 0.0,
            };
            let before = target.copy().unwrap();
            assert!(!op.apply(&target, &wrong).unwrap());
            assert_eq!(max_diff(&target, &before), 0.0, "untouched");
        }
    }

    /// The block rotation equals candle's batched matmul on the blocks (f32 sums in another
    /// order: 1e-5), per-block and shared, f32 and bf16 inputs (one rounding apart at most).
    #[test]
    fn block_rotation_equals_candles_batched_matmul() {
        for (dims, count, b) in [
            (vec![3, 64], 2, 32),
            (vec![2, 5, 12], 1, 4),
            (vec![1, 6], 3, 2),
            (vec![600, 64], 8, 8),
            (vec![40, 48], 1, 16),
        ] {
            let blocks = uniform(&[count, b, b], 11, DType::F32);
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let x = uniform(&dims, 12, dtype);
                let fast = rotate_blocks(&x, &blocks, dtype).unwrap().unwrap();
                let k = *dims.last().unwrap();
                let rows = x.elem_count() / k;
                let per_block = x
                    .to_dtype(DType::F32)
                    .unwrap()
                    .reshape((rows, k / b, b))
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                let rot = blocks
                    .broadcast_as((k / b, b, b))
                    .unwrap()
                    .contiguous()
                    .unwrap();
                let plain = per_block
                    .matmul(&rot)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .reshape(dims.as_slice())
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                assert_eq!(fast.dims(), x.dims());
                assert_eq!(fast.dtype(), dtype);
                let tol = match dtype {
                    DType::BF16 => 2e-2,
                    DType::F16 => 3e-3,
                    _ => 1e-5,
                };
                let diff = max_diff(&fast, &plain);
                assert!(
                    diff < tol,
                    "{dims:?} {count} blocks of {b}, {dtype:?}: {diff}"
                );
            }
        }
        // A block count that fits neither the features nor sharing is left to candle.
        let x = uniform(&[2, 8], 1, DType::F32);
        assert!(
            rotate_blocks(&x, &uniform(&[3, 4, 4], 2, DType::F32), DType::F32)
                .unwrap()
                .is_none()
        );
    }

    /// LoHa's ΔW row by row equals the two products and their Hadamard product (f32 sums in
    /// another order: 1e-5 relative), over several parallel chunks of rows.
    #[test]
    fn hadamard_of_products_equals_the_products_multiplied() {
        for (m, n, r1, r2) in [(1, 1, 1, 1), (37, 53, 3, 5), (1500, 40, 8, 2)] {
            let (a1, b1) = (
                uniform(&[m, r1], 1, DType::F32),
                uniform(&[r1, n], 2, DType::F32),
            );
            let (a2, b2) = (
                uniform(&[m, r2], 3, DType::F32),
                uniform(&[r2, n], 4, DType::F32),
            );
            let fast = hadamard_of_products((&a1, &b1), (&a2, &b2), 0.75)
                .unwrap()
                .unwrap();
            let product = (a1.matmul(&b1).unwrap() * a2.matmul(&b2).unwrap()).unwrap();
            let plain = (product * 0.75).unwrap();
            let scale = max_diff(&plain, &plain.zeros_like().unwrap()).max(1.0);
            let diff = max_diff(&fast, &plain);
            assert!(diff <= 1e-5 * scale, "{m}x{n} r{r1},{r2}: {diff}");
        }
        let (a, b) = (
            uniform(&[4, 2], 1, DType::F32),
            uniform(&[3, 5], 2, DType::F32),
        );
        assert!(
            hadamard_of_products((&a, &b), (&a, &b), 1.0)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn other_layouts_and_dtypes_are_left_to_candle() {
        let t = uniform(&[4, 6], 1, DType::F32);
        let strided = t.t().unwrap();
        let delta = uniform(&[6, 4], 2, DType::F32);
        assert!(add_scaled(&strided, &delta, 1.0).unwrap().is_none());
        let f64 = uniform(&[4, 6], 1, DType::F64);
        assert!(add_scaled(&f64, &t, 1.0).unwrap().is_none());
        let not_broadcast = uniform(&[4, 6], 3, DType::F32);
        assert!(scale_2d(&t, &not_broadcast, false, 0.0).unwrap().is_none());
    }
}
