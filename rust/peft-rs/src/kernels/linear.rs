//! A linear layer with its adapters computed into one output buffer on the CPU:
//! `y = ((x ⊙ in_scale)·Wᵀ + bias + Σ sᵢ·x·Aᵢᵀ·Bᵢᵀ) ⊙ out_scale`.
//!
//! PEFT computes the base output, each low-rank output and their sum as separate tensors; here
//! the low-rank terms accumulate into the base output with two thin GEMMs and no full-size
//! temporaries, so an unmerged LoRA layer costs about what the merged one does. bf16 layers run
//! the base product in bf16 (see [`super::bf16`]) and everything else in f32, rounding once.

use candle_core::{DType, Device, Layout, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::Result;

/// A term `scale · x·Aᵀ·Bᵀ (+ scale · bias)` (LoRA and its relatives); `a` is `(r, in)`, `b` is
/// `(out, r)`, both f32.
pub(crate) struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub bias: Option<Tensor>,
    pub scale: f64,
}

/// What a layer adds to the plain `x·Wᵀ + bias`.
#[derive(Default)]
pub(crate) struct Extras {
    /// Per input feature, applied to `x` first (IA³ on feed-forward layers).
    pub in_scale: Option<Tensor>,
    pub low_rank: Vec<LowRank>,
    /// Per output feature, applied to the whole output, bias included (IA³).
    pub out_scale: Option<Tensor>,
}

impl Extras {
    pub(crate) fn low_rank(term: LowRank) -> Self {
        Self {
            low_rank: vec![term],
            ..Self::default()
        }
    }
}

/// `x (n, in)` through the layer whose weight, transposed, is `w_t (in, out)` (any strides).
/// `None` when this path does not apply (another device, gradients being recorded, a dtype
/// other than f32 or bf16 throughout): the caller then computes the same thing the plain way.
pub(crate) fn linear(
    x: &Tensor,
    w_t: &Tensor,
    bias: Option<&Tensor>,
    extras: &Extras,
) -> Result<Option<Tensor>> {
    let f32_tensors = extras
        .low_rank
        .iter()
        .flat_map(|t| [Some(&t.a), Some(&t.b), t.bias.as_ref()])
        .chain([extras.in_scale.as_ref(), extras.out_scale.as_ref()])
        .flatten();
    let mut all = [x, w_t].into_iter().chain(bias).chain(f32_tensors.clone());
    if all.any(|t| !t.device().is_cpu() || t.track_op())
        || x.dtype() != w_t.dtype()
        || bias.is_some_and(|b| b.dtype() != x.dtype())
        || !matches!(x.dtype(), DType::F32 | DType::BF16)
        || f32_tensors.clone().any(|t| t.dtype() != DType::F32)
        || x.rank() != 2
    {
        return Ok(None);
    }
    let n = x.dim(0)?;
    let m = w_t.dim(1)?;
    let x = match &extras.in_scale {
        // In f32 and rounded once, as PEFT scales in the adapter's dtype.
        Some(s) => x
            .to_dtype(DType::F32)?
            .broadcast_mul(s)?
            .to_dtype(x.dtype())?,
        None => x.clone(),
    };

    // The output starts as the bias row plus the low-rank terms' biases, repeated.
    let mut row = vec![0f32; m];
    if let Some(b) = bias {
        row.copy_from_slice(&b.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    for term in &extras.low_rank {
        if let Some(b) = &term.bias {
            for (r, v) in row.iter_mut().zip(b.to_vec1::<f32>()?) {
                *r += (term.scale as f32) * v;
            }
        }
    }
    let has_bias = row.iter().any(|v| *v != 0.0);
    let mut out = vec![0f32; n * m];
    if has_bias {
        out.par_chunks_mut(m.max(1))
            .for_each(|o| o.copy_from_slice(&row));
    }

    // The base product; f32 copies of bf16 operands for now (what candle's matmul does).
    let x32 = x.to_dtype(DType::F32)?;
    {
        let w32 = w_t.to_dtype(DType::F32)?;
        let (xs, xl) = x32.storage_and_layout();
        let (ws, wl) = w32.storage_and_layout();
        let lhs = Strided::new(cpu_slice::<f32>(&xs, xl)?, xl);
        let rhs = Strided::new(cpu_slice::<f32>(&ws, wl)?, wl);
        sgemm(&mut out, m, lhs, rhs, has_bias, 1.0);
    }

    {
        let (xs, xl) = x32.storage_and_layout();
        let lhs = Strided::new(cpu_slice::<f32>(&xs, xl)?, xl);
        for term in &extras.low_rank {
            let r = term.a.dim(0)?;
            let mut h = vec![0f32; n * r];
            let (a_s, a_l) = term.a.storage_and_layout();
            let a_t = Strided::new(cpu_slice::<f32>(&a_s, a_l)?, a_l).t();
            sgemm(&mut h, r, lhs, a_t, false, term.scale as f32);
            let (b_s, b_l) = term.b.storage_and_layout();
            let b_t = Strided::new(cpu_slice::<f32>(&b_s, b_l)?, b_l).t();
            let h = Strided {
                data: &h,
                rows: n,
                cols: r,
                row_stride: r,
                col_stride: 1,
            };
            sgemm(&mut out, m, h, b_t, true, 1.0);
        }
    }

    if let Some(s) = &extras.out_scale {
        let s = s.to_vec1::<f32>()?;
        out.par_chunks_mut(m.max(1))
            .for_each(|o| o.iter_mut().zip(&s).for_each(|(v, s)| *v *= s));
    }
    let y = match x.dtype() {
        DType::BF16 => {
            let mut y = vec![bf16::ZERO; n * m];
            y.par_chunks_mut(4096)
                .zip(out.par_chunks(4096))
                .for_each(|(y, o)| {
                    y.iter_mut()
                        .zip(o)
                        .for_each(|(y, o)| *y = bf16::from_f32(*o))
                });
            Tensor::from_vec(y, (n, m), &Device::Cpu)?
        }
        _ => Tensor::from_vec(out, (n, m), &Device::Cpu)?,
    };
    Ok(Some(y))
}

/// The elements of a CPU tensor from its storage's start offset on.
fn cpu_slice<'a, T: candle_core::WithDType>(s: &'a Storage, l: &Layout) -> Result<&'a [T]> {
    match s {
        Storage::Cpu(cpu) => Ok(&T::cpu_storage_as_slice(cpu)?[l.start_offset()..]),
        _ => Err(candle_core::Error::Msg("the fused linear kernel runs on the CPU".into()).into()),
    }
}

/// A matrix view: element `(i, j)` is `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Strided<'a> {
    fn new(data: &'a [f32], l: &Layout) -> Self {
        let (d, s) = (l.dims(), l.stride());
        Self {
            data,
            rows: d[0],
            cols: d[1],
            row_stride: s[0],
            col_stride: s[1],
        }
    }

    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// `out (n, m) = [out +] scale · lhs·rhs`, row-major `out`.
fn sgemm(out: &mut [f32], m: usize, lhs: Strided, rhs: Strided, accumulate: bool, scale: f32) {
    let (n, k) = (lhs.rows, lhs.cols);
    assert!(rhs.rows == k && rhs.cols == m && out.len() >= n * m);
    let last = |v: Strided| (v.rows.max(1) - 1) * v.row_stride + (v.cols.max(1) - 1) * v.col_stride;
    assert!(n * k == 0 || (last(lhs) < lhs.data.len() && last(rhs) < rhs.data.len()));
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index the views and `out` describe in bounds.
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            out.as_mut_ptr(),
            1,
            m as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}
