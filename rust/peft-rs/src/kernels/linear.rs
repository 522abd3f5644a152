//! A linear layer with its adapters computed into one output buffer on the CPU:
//! `y = ((x ⊙ in_scale)·Wᵀ + bias + Σ sᵢ·x·Aᵢᵀ·Bᵢᵀ) ⊙ out_scale` (or with the bias added after
//! `out_scale`).
//!
//! PEFT computes the base output, each low-rank output and their sum as separate tensors; here
//! the low-rank terms accumulate into the base output with two thin GEMMs and no full-size
//! temporaries, so an unmerged LoRA layer costs about what the merged one does. bf16 layers run
//! the base product in bf16 (see [`super::bf16`]) and everything else in f32, rounding as PEFT
//! does; f16 layers the same, their base product as f32 sums of the exact f16 products
//! ([`f16_product`], or on AMX tiles through the bf16 kernel with split operands).

use std::mem::MaybeUninit;

use candle_core::{DType, Device, Layout, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::bf16 as bf16_kernel;
use super::{Elements, MAX_ROWS, fp16, rows_dot_rows};
use crate::error::Result;

/// A term `((scale · x·Aᵀ) ⊙ rank_scale)·Bᵀ ⊙ out_scale (+ scale · bias)` (LoRA and its
/// relatives); `a` is `(r, in)`, `b` is `(out, r)`, the scales `(r)` and `(out)`, all f32.
pub(crate) struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub bias: Option<Tensor>,
    pub scale: f64,
    /// Per rank, on `x·Aᵀ` (VeRA's `λ_d`).
    pub rank_scale: Option<Tensor>,
    /// Per output feature, on the term (VeRA's `λ_b`).
    pub out_scale: Option<Tensor>,
}

impl LowRank {
    /// A term without per-rank or per-output scales.
    pub(crate) fn new(a: Tensor, b: Tensor, bias: Option<Tensor>, scale: f64) -> Self {
        Self {
            a,
            b,
            bias,
            scale,
            rank_scale: None,
            out_scale: None,
        }
    }

    /// `s · (B ⊙ out_scale) · (rank_scale ⊙ A)`, `(out, in)`.
    fn delta_weight(&self) -> Result<Tensor> {
        let a = match &self.rank_scale {
            Some(s) => self.a.broadcast_mul(&s.reshape((s.elem_count(), 1))?)?,
            None => self.a.clone(),
        };
        matmul_scaled(&self.scaled_b()?, &a, self.scale)
    }

    fn rank(&self) -> usize {
        self.a.dims().first().copied().unwrap_or(0)
    }

    /// `(s·x·Aᵀ) ⊙ rank_scale` for `x (n, in)`, row-major `(n, r)`, and `r`.
    fn project(&self, x: Strided, par: faer::Par) -> Result<(Vec<f32>, usize)> {
        let r = self.a.dim(0)?;
        let mut h = vec![0f32; x.rows * r];
        let (a_s, a_l) = self.a.storage_and_layout();
        let a_t = Strided::new(cpu_slice::<f32>(&a_s, a_l)?, a_l).t();
        sgemm(&mut h, r, x, a_t, false, self.scale as f32, par);
        self.scale_ranks(&mut h, r)?;
        Ok((h, r))
    }

    fn scale_ranks(&self, h: &mut [f32], r: usize) -> Result<()> {
        if let Some(s) = &self.rank_scale {
            let s = s.to_vec1::<f32>()?;
            h.chunks_mut(r.max(1))
                .for_each(|row| row.iter_mut().zip(&s).for_each(|(v, s)| *v *= s));
        }
        Ok(())
    }

    /// `B` with its rows scaled by `out_scale` (as one `(out, r)` factor of the term).
    fn scaled_b(&self) -> Result<Tensor> {
        let Some(s) = &self.out_scale else {
            return Ok(self.b.clone());
        };
        let column = s.reshape((s.elem_count(), 1))?;
        Ok(
            match super::elementwise::scale_2d(&self.b, &column, false, 0.0)? {
                Some(scaled) => scaled,
                None => self.b.broadcast_mul(&column)?,
            },
        )
    }

    /// [`Self::project`] on the calling thread, for a block of rows `x` (row-major, `data` its
    /// elements): a thin product whose every output is a dot product of two contiguous rows
    /// when `A` is contiguous (faer's packing costs more than the product then).
    fn project_rows(&self, x: Strided, data: &[f32]) -> Result<(Vec<f32>, usize)> {
        let (a_s, a_l) = self.a.storage_and_layout();
        let Some((start, end)) = a_l.contiguous_offsets() else {
            drop(a_s);
            return self.project(x, faer::Par::Seq);
        };
        let r = self.a.dim(0)?;
        let a = &cpu_slice::<f32>(&a_s, a_l)?[..end - start];
        let mut h = rows_dot_rows(data, a, x.rows, x.cols, r);
        let scale = self.scale as f32;
        if scale != 1.0 {
            h.iter_mut().for_each(|v| *v *= scale);
        }
        self.scale_ranks(&mut h, r)?;
        Ok((h, r))
    }

    /// `out (n, m) += h·Bᵀ` for a row-major `h (n, r)` from [`Self::project`].
    fn add_expanded(&self, out: &mut [f32], m: usize, h: &[f32], r: usize) -> Result<()> {
        let rows = h.len() / r.max(1);
        if rows <= MAX_ROWS && self.b.is_contiguous() {
            // A few rows: dot products of h's rows with B's, B streamed once in parallel, and
            // the output scale on the (small) term rather than on B.
            let (b_s, b_l) = self.b.storage_and_layout();
            let b = &cpu_slice::<f32>(&b_s, b_l)?[..m * r];
            let mut term = rows_dot_rows(h, b, rows, r, m);
            if let Some(s) = &self.out_scale {
                let s = s.to_vec1::<f32>()?;
                term.chunks_mut(m.max(1))
                    .for_each(|row| row.iter_mut().zip(&s).for_each(|(v, s)| *v *= s));
            }
            out.iter_mut().zip(&term).for_each(|(o, t)| *o += t);
            return Ok(());
        }
        let h = Strided::row_major(h, rows, r);
        if let Some(s) = self.out_scale.as_ref().filter(|_| rows < r) {
            // Fewer rows than the rank: the term scaled per output (as PEFT scales it), not a
            // scaled copy of `B` (VeRA r256 at 64 rows, width 4096: 1M elements against 256K).
            let (b_s, b_l) = self.b.storage_and_layout();
            let b_t = Strided::new(cpu_slice::<f32>(&b_s, b_l)?, b_l).t();
            let mut term = vec![0f32; rows * m];
            sgemm(&mut term, m, h, b_t, false, 1.0, all_threads());
            let s = s.to_vec1::<f32>()?;
            out.par_chunks_mut(m.max(1))
                .zip(term.par_chunks(m.max(1)))
                .with_min_len(ELEMENTS_PER_TASK.div_ceil(m.max(1)))
                .for_each(|(o, t)| {
                    for ((o, t), s) in o.iter_mut().zip(t).zip(&s) {
                        *o += t * s;
                    }
                });
            return Ok(());
        }
        let b = self.scaled_b()?;
        let (b_s, b_l) = b.storage_and_layout();
        let b_t = Strided::new(cpu_slice::<f32>(&b_s, b_l)?, b_l).t();
        sgemm(out, m, h, b_t, true, 1.0, all_threads());
        Ok(())
    }
}

/// What a layer adds to the plain `x·Wᵀ + bias`.
#[derive(Default)]
pub(crate) struct Extras {
    /// Per input feature, applied to `x` first (IA³ on feed-forward layers).
    pub in_scale: Option<Tensor>,
    pub low_rank: Vec<LowRank>,
    /// Per output feature, applied to the whole output, bias included (IA³).
    pub out_scale: Option<Tensor>,
    /// The biases are added after `out_scale` (DoRA rescales the weight's output only).
    pub unscaled_bias: bool,
    /// A full-rank `ΔW` (f32, in the base weight's layout) added to the weight before the
    /// product: `x·(W + ΔW)ᵀ` is one GEMM where PEFT's LoHa and LoKr take two. Everything is then
    /// computed in f32 and rounded once.
    pub weight_delta: Option<Tensor>,
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
        .flat_map(|t| {
            [&t.bias, &t.rank_scale, &t.out_scale]
                .map(Option::as_ref)
                .into_iter()
                .chain([Some(&t.a), Some(&t.b)])
        })
        .chain([extras.in_scale.as_ref(), extras.out_scale.as_ref()])
        .flatten();
    let mut all = [x, w_t].into_iter().chain(bias).chain(f32_tensors.clone());
    if all.any(|t| !t.device().is_cpu() || t.track_op())
        || x.dtype() != w_t.dtype()
        || bias.is_some_and(|b| b.dtype() != x.dtype())
        || !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        || f32_tensors.clone().any(|t| t.dtype() != DType::F32)
        || x.rank() != 2
    {
        return Ok(None);
    }
    let (n, k) = (x.dim(0)?, x.dim(1)?);
    let m = w_t.dim(1)?;
    let x = match &extras.in_scale {
        // In f32 and rounded once, as PEFT scales in the adapter's dtype.
        Some(s) => {
            let row = s.reshape((1, k))?;
            match super::elementwise::scale_2d(x, &row, false, 0.0)? {
                Some(scaled) => scaled,
                None => x
                    .to_dtype(DType::F32)?
                    .broadcast_mul(s)?
                    .to_dtype(x.dtype())?,
            }
        }
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
    let bias_first = has_bias && !extras.unscaled_bias;
    // The base product. bf16 and f16 go through their kernels where the rows of x and W are
    // contiguous along k (Linear weights), through f32 copies otherwise (what candle's matmul
    // does).
    let rows_along_k = |t: &Tensor, along: usize| {
        let (stride, rows) = (t.stride()[1 - along], t.dim(1 - along).unwrap_or(0));
        t.stride()[along] == 1 && (rows <= 1 || stride >= k)
    };
    let half_kernel_fits = rows_along_k(&x, 1) && rows_along_k(w_t, 0);
    let bf16_kernel_fits = x.dtype() == DType::BF16 && half_kernel_fits;
    let f16_tiles_fit = x.dtype() == DType::F16 && half_kernel_fits && f16_tiles_pay(n);
    if (bf16_kernel_fits || f16_tiles_fit) && bias_first == has_bias {
        let y = half_layer(&x, w_t, bias, has_bias.then_some(&row[..]), extras)?;
        super::pool::after_parallel_work(n * m * k);
        // f16 operands holding an infinity are refused by the tiles: the path below takes them.
        if y.is_some() {
            return Ok(y);
        }
    }
    let folded = fold_low_rank(&x, w_t, &extras.low_rank)?;
    let (w_t, low_rank) = match &folded {
        Some(w_t) => (w_t, &[][..]),
        None => (w_t, &extras.low_rank[..]),
    };
    // Whole rows per task in the passes over the output, enough that a small output is one
    // task: waking rayon's workers costs more than such a pass, and they then spin for a while
    // competing with the caller.
    let rows_per_task = ELEMENTS_PER_TASK.div_ceil(m.max(1));
    let mut out = if bias_first {
        repeated_row(&row, n, rows_per_task)
    } else {
        vec![0f32; n * m]
    };
    // In f32 the low-rank terms go into the output first and the base GEMM accumulates onto
    // them, in the pass that writes the output anyway (after it, adding them would read and
    // write the whole output once more). bf16 rounds the base output first, as PEFT does.
    let low_rank_first = x.dtype() == DType::F32;
    if low_rank_first {
        add_low_rank(&x, low_rank, &mut out, m)?;
    }
    let accumulate = bias_first || (low_rank_first && !low_rank.is_empty());
    if bf16_kernel_fits {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w_t.storage_and_layout();
        let (xv, wv) = (cpu_slice::<bf16>(&xs, xl)?, cpu_slice::<bf16>(&ws, wl)?);
        let (lda, ldw) = (xl.stride()[0].max(k), wl.stride()[1].max(k));
        let out = bf16_kernel::Out::F32 {
            y: &mut out,
            accumulate,
        };
        bf16_kernel::matmul_bf16_nt(n, m, k, xv, lda, wv, ldw, out);
    } else if x.dtype() == DType::F32
        && n <= MAX_ROWS
        && x.is_contiguous()
        && w_t.t()?.is_contiguous()
    {
        // A few rows (decoding): memory-bound, one pass over the weight rows.
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w_t.storage_and_layout();
        let (xv, wv) = (cpu_slice::<f32>(&xs, xl)?, cpu_slice::<f32>(&ws, wl)?);
        let y = rows_dot_rows(xv, wv, n, k, m);
        if accumulate {
            out.iter_mut().zip(&y).for_each(|(o, y)| *o += y);
        } else {
            out = y;
        }
    } else if x.dtype() == DType::F16 && half_kernel_fits {
        f16_product(&x, w_t, &mut out, accumulate)?;
    } else {
        let x32 = x.to_dtype(DType::F32)?;
        let w32 = w_t.to_dtype(DType::F32)?;
        let (xs, xl) = x32.storage_and_layout();
        let (ws, wl) = w32.storage_and_layout();
        let lhs = Strided::new(cpu_slice::<f32>(&xs, xl)?, xl);
        let rhs = Strided::new(cpu_slice::<f32>(&ws, wl)?, wl);
        sgemm(&mut out, m, lhs, rhs, accumulate, 1.0, all_threads());
    }
    let adapted = !low_rank.is_empty() || extras.out_scale.is_some();
    if adapted {
        // PEFT adds the adapter's f32 terms to the base layer's bf16 or f16 output: round it
        // first.
        match x.dtype() {
            DType::BF16 => out
                .par_chunks_mut(ELEMENTS_PER_TASK)
                .for_each(|o| o.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32())),
            DType::F16 => out
                .par_chunks_mut(ELEMENTS_PER_TASK)
                .for_each(fp16::round_in_place),
            _ => {}
        }
    }

    if !low_rank_first {
        add_low_rank(&x, low_rank, &mut out, m)?;
    }

    if let Some(s) = &extras.out_scale {
        let s = s.to_vec1::<f32>()?;
        out.par_chunks_mut(m.max(1))
            .with_min_len(rows_per_task)
            .for_each(|o| o.iter_mut().zip(&s).for_each(|(v, s)| *v *= s));
    }
    if has_bias && !bias_first {
        out.par_chunks_mut(m.max(1))
            .with_min_len(rows_per_task)
            .for_each(|o| o.iter_mut().zip(&row).for_each(|(v, b)| *v += b));
    }
    let y = match x.dtype() {
        DType::BF16 => Tensor::from_vec(
            rounded(&out, bf16_kernel::round_into_uninit),
            (n, m),
            &Device::Cpu,
        )?,
        DType::F16 => {
            Tensor::from_vec(rounded(&out, fp16::round_into_uninit), (n, m), &Device::Cpu)?
        }
        _ => Tensor::from_vec(out, (n, m), &Device::Cpu)?,
    };
    super::pool::after_parallel_work(n * m * k);
    Ok(Some(y))
}

/// `out` rounded to a half-precision type by `round`, in parallel, written once into new memory
/// (not zeroed first).
fn rounded<T: Send>(out: &[f32], round: fn(&[f32], &mut [MaybeUninit<T>])) -> Vec<T> {
    let mut y = Vec::with_capacity(out.len());
    y.spare_capacity_mut()[..out.len()]
        .par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(out.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|(y, o)| round(o, y));
    // SAFETY: the chunks cover every element, each written above.
    unsafe { y.set_len(out.len()) };
    y
}

/// `w_t + Σ ΔWᵀ` for f32 rows `x (n, k)` when that costs less than the terms per row
/// (`n · R · (k + m)` multiply-adds against `R · k · m` and the passes over the weight, for a
/// total rank `R`): many rows then take one GEMM with the folded weight (VeRA r256 at width 1024
/// from ~900 rows; LoRA r16 not below ~6900). bf16 keeps the terms apart (PEFT rounds the base
/// output before adding them); `None` also where the weight is not a contiguous `(m, k)`.
fn fold_low_rank(x: &Tensor, w_t: &Tensor, terms: &[LowRank]) -> Result<Option<Tensor>> {
    if terms.is_empty() || x.dtype() != DType::F32 || w_t.dtype() != DType::F32 {
        return Ok(None);
    }
    let (n, k, m) = (x.dim(0)?, x.dim(1)?, w_t.dim(1)?);
    let rank: usize = terms.iter().map(LowRank::rank).sum();
    if n * rank * (k + m) <= (rank + FOLD_PASSES_COST) * k * m {
        return Ok(None);
    }
    let mut weight = w_t.t()?;
    if !weight.is_contiguous() {
        return Ok(None);
    }
    for term in terms {
        let delta = term.delta_weight()?;
        match super::elementwise::add_scaled(&weight, &delta, 1.0)? {
            Some(sum) => weight = sum,
            None => return Ok(None),
        }
    }
    Ok(Some(weight.t()?))
}

/// The passes that fold `ΔW` into a weight (write `ΔW`, read it and the weight, write the sum),
/// in multiply-adds per weight element: memory-bound, measured on the 2-core Xeon as ~200 of a
/// GEMM's (with 3, LoRA r16 folded from 580 rows and a 4096-wide layer ran 4–7% slower).
const FOLD_PASSES_COST: usize = 200;

/// `n` copies of `row`, written once (not zeroed first: reused memory would be, a whole pass).
fn repeated_row(row: &[f32], n: usize, rows_per_task: usize) -> Vec<f32> {
    let m = row.len();
    let mut out = Vec::with_capacity(n * m);
    out.spare_capacity_mut()[..n * m]
        .par_chunks_mut(m.max(1))
        .with_min_len(rows_per_task)
        .for_each(|o| {
            for (o, v) in o.iter_mut().zip(row) {
                o.write(*v);
            }
        });
    // SAFETY: all `n · m` elements were written above.
    unsafe { out.set_len(n * m) };
    out
}

/// `out (n, m) += Σ term(x)` for the low-rank terms, `x (n, k)` in f32 or bf16 (widened).
fn add_low_rank(x: &Tensor, terms: &[LowRank], out: &mut [f32], m: usize) -> Result<()> {
    if terms.is_empty() {
        return Ok(());
    }
    for (term, (h, r)) in terms.iter().zip(&project_terms(x, terms)?) {
        term.add_expanded(out, m, h, *r)?;
    }
    Ok(())
}

/// Each term's `s·x·Aᵀ` (row-major `(n, r)`, and `r`) for `x (n, k)` in f32 or bf16: by row dot
/// products ([`project_rows`]) where `x`'s rows are contiguous and every rank is small, by a
/// GEMM on `x` in f32 otherwise.
fn project_terms(x: &Tensor, terms: &[LowRank]) -> Result<Vec<(Vec<f32>, usize)>> {
    let (n, k) = x.dims2()?;
    if x.stride()[1] == 1 && terms.iter().all(|t| t.rank() <= ROW_DOTS_MAX_RANK) {
        let lda = x.stride()[0].max(k);
        let (xs, xl) = x.storage_and_layout();
        let amx_pays = n >= AMX_MIN_ROWS && n * k >= AMX_MIN_ELEMENTS;
        if x.dtype() == DType::BF16 && amx_pays && bf16_kernel::has_amx() {
            return project_split(terms, cpu_slice::<bf16>(&xs, xl)?, n, k, lda);
        }
        let rows = match x.dtype() {
            DType::BF16 => Elements::Bf16(cpu_slice::<bf16>(&xs, xl)?),
            DType::F16 => Elements::F16(cpu_slice::<f16>(&xs, xl)?),
            _ => Elements::F32(cpu_slice::<f32>(&xs, xl)?),
        };
        return project_rows(terms, rows, n, k, lda);
    }
    let x32 = x.to_dtype(DType::F32)?;
    let (xs, xl) = x32.storage_and_layout();
    let lhs = Strided::new(cpu_slice::<f32>(&xs, xl)?, xl);
    terms
        .iter()
        .map(|term| term.project(lhs, all_threads()))
        .collect()
}

/// Rows of bf16 `x` from which [`project_split`] forms the low-rank projections on AMX tiles
/// (a tile holds 16 rows).
const AMX_MIN_ROWS: usize = 16;

/// Elements of bf16 `x` from which [`project_split`] is used: below, splitting `A` and packing
/// `x` a second time cost more than the row dot products they replace. Measured per unmerged
/// LoRA r16 forward (2 threads), split vs row dots: width 1024, 64 rows 0.45 vs 0.37–0.38 ms, 128
/// rows 0.59–0.60 vs 0.54–0.57, 256 rows 0.74–0.82 vs 0.82–0.91; width 4096, 64 rows 4.6 vs 5.0.
const AMX_MIN_ELEMENTS: usize = 1 << 18;

/// Each term's `s·x·Aᵀ` (as [`project_terms`]) for bf16 `x`, on the bf16 kernel: each f32 `A`
/// is split into three bf16 parts that sum to it exactly ([`split3`]), so `x·Aᵀ` is three bf16
/// products whose multiplies are
/// exact and whose sums are f32, as in PEFT's f32 product on `x` cast to f32; all terms' parts
/// go through one product, so `x` is read once. On AMX this takes half the time of the row dot
/// products on `x` widened to f32 (width 1024, rank 16, 2 threads: 4096 rows 2.2–2.5 → 0.9–1.1
/// ms; a whole unmerged LoRA forward 10.8–11.1 → 8.3–8.5 ms).
fn project_split(
    terms: &[LowRank],
    x: &[bf16],
    n: usize,
    k: usize,
    lda: usize,
) -> Result<Vec<(Vec<f32>, usize)>> {
    let ranks: Vec<usize> = terms.iter().map(LowRank::rank).collect();
    let parts_rows = 3 * ranks.iter().sum::<usize>();
    let mut parts = Vec::with_capacity(parts_rows * k);
    for term in terms {
        let a = term.a.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        for part in 0..3 {
            parts.extend(a.iter().map(|&v| split3(v)[part]));
        }
    }
    let mut sums = vec![0f32; n * parts_rows];
    let out = bf16_kernel::Out::F32 {
        y: &mut sums,
        accumulate: false,
    };
    bf16_kernel::matmul_bf16_nt(n, parts_rows, k, x, lda, &parts, k, out);
    let mut first = 0;
    terms
        .iter()
        .zip(ranks)
        .map(|(term, r)| {
            let scale = term.scale as f32;
            let mut h = Vec::with_capacity(n * r);
            for row in sums.chunks_exact(parts_rows) {
                let [hi, mid, lo] = [0, 1, 2].map(|p| &row[first + p * r..][..r]);
                // The small parts first, as the exact sum's rounding is then closest.
                h.extend((0..r).map(|q| (lo[q] + mid[q] + hi[q]) * scale));
            }
            first += 3 * r;
            term.scale_ranks(&mut h, r)?;
            Ok((h, r))
        })
        .collect()
}

/// `[hi, mid, lo]` with `hi + mid + lo == v` exactly, for finite `|v| ≥ 2⁻¹⁰⁰` (all three
/// parts then normal, as the tile instructions, which treat subnormals as zero, need): `hi` and
/// `mid` are the top eight significant bits of what the parts before them left (cut, not
/// rounded, so nothing overflows), which leaves eight bits for `lo`. Smaller values lose at most
/// their last bits.
fn split3(v: f32) -> [bf16; 3] {
    let top = |v: f32| bf16::from_bits((v.to_bits() >> 16) as u16);
    let hi = top(v);
    let rest = v - hi.to_f32();
    let mid = top(rest);
    [hi, mid, bf16::from_f32(rest - mid.to_f32())]
}

/// Rank up to which `s·x·Aᵀ` is formed by row dot products ([`project_rows`]); a GEMM is
/// faster for larger ones (VeRA's shared rank 256, width 1024, 512 rows, f32: a forward 6.2 →
/// 5.2 ms).
const ROW_DOTS_MAX_RANK: usize = 64;

/// Total rank up to which low-rank terms are formed in the bf16 kernel's epilogue, tile by
/// tile (their `Bᵀ` rows then stay in L1); above it, or for at most `MAX_ROWS` rows, the whole
/// term is formed first.
const EPILOGUE_MAX_RANK: usize = 64;

/// A bf16 layer, or an f16 one on the AMX tiles (`x (n, k)`, `w_t (k, m)` with contiguous rows
/// along k), whose adapters' f32 terms are added as the kernel finishes each tile: the output is
/// written once, in the layer's dtype, rounded as PEFT rounds (`bias_row`: the f32 biases, all
/// added before `out_scale`). `None` where the tiles refuse f16 operands (an infinity).
fn half_layer(
    x: &Tensor,
    w_t: &Tensor,
    bias: Option<&Tensor>,
    bias_row: Option<&[f32]>,
    extras: &Extras,
) -> Result<Option<Tensor>> {
    let (n, k, m) = (x.dim(0)?, x.dim(1)?, w_t.dim(1)?);
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w_t.storage_and_layout();
    let (lda, ldw) = (xl.stride()[0].max(k), wl.stride()[1].max(k));
    let plain = extras.low_rank.is_empty() && extras.out_scale.is_none();
    if x.dtype() == DType::F16 {
        let (xv, wv) = (cpu_slice::<f16>(&xs, xl)?, cpu_slice::<f16>(&ws, wl)?);
        let hs = if plain {
            Vec::new()
        } else {
            project_terms(x, &extras.low_rank)?
        };
        return with_addend(extras, &hs, n, m, |addend, scale| {
            // Not zeroed first: the kernel writes every element (or none, when it refuses).
            let mut y = Vec::with_capacity(n * m);
            let out = bf16_kernel::Out::Adapted {
                y: bf16_kernel::HalfOut::F16(&mut y.spare_capacity_mut()[..n * m]),
                bias: bias_row,
                addend,
                scale,
            };
            if !bf16_kernel::matmul_f16_nt_amx(n, m, k, xv, lda, wv, ldw, out) {
                return Ok(None);
            }
            // SAFETY: the kernel wrote all n × m elements.
            unsafe { y.set_len(n * m) };
            Ok(Some(Tensor::from_vec(y, (n, m), &Device::Cpu)?))
        });
    }
    let (xv, wv) = (cpu_slice::<bf16>(&xs, xl)?, cpu_slice::<bf16>(&ws, wl)?);
    // Not zeroed first: the kernel writes every element of a bf16 output.
    let mut y = Vec::with_capacity(n * m);
    if plain {
        // A plain bf16 linear: torch's rounding (bias added to the f32 sum, rounded once).
        let bias = bias.map(|b| b.to_vec1::<bf16>()).transpose()?;
        let out = bf16_kernel::Out::Bf16 {
            y: &mut y.spare_capacity_mut()[..n * m],
            bias: bias.as_deref(),
        };
        bf16_kernel::matmul_bf16_nt(n, m, k, xv, lda, wv, ldw, out);
        // SAFETY: the kernel wrote all n × m elements.
        unsafe { y.set_len(n * m) };
        return Ok(Some(Tensor::from_vec(y, (n, m), &Device::Cpu)?));
    }
    let hs = project_terms(x, &extras.low_rank)?;
    with_addend(extras, &hs, n, m, |addend, scale| {
        let out = bf16_kernel::Out::Adapted {
            y: bf16_kernel::HalfOut::Bf16(&mut y.spare_capacity_mut()[..n * m]),
            bias: bias_row,
            addend,
            scale,
        };
        bf16_kernel::matmul_bf16_nt(n, m, k, xv, lda, wv, ldw, out);
        // SAFETY: the kernel wrote all n × m elements.
        unsafe { y.set_len(n * m) };
        Ok(Some(Tensor::from_vec(y, (n, m), &Device::Cpu)?))
    })
}

/// The adapters' terms as the kernel's epilogue takes them (`hs`: each low-rank term's
/// `s·x·Aᵀ`), and the output scale, handed to `kernel`.
fn with_addend<T>(
    extras: &Extras,
    hs: &[(Vec<f32>, usize)],
    n: usize,
    m: usize,
    kernel: impl FnOnce(bf16_kernel::Addend<'_>, Option<&[f32]>) -> Result<T>,
) -> Result<T> {
    let total_rank: usize = hs.iter().map(|(_, r)| r).sum();
    // Few rows take a dense term (`B` is not transposed for them).
    let ldbt = bf16_kernel::LowRank::padded_stride(m);
    let bts = if total_rank <= EPILOGUE_MAX_RANK && n > MAX_ROWS {
        let bt = |t: &LowRank| -> Result<Vec<f32>> {
            let bt = t.scaled_b()?.t()?.pad_with_zeros(1, 0, ldbt - m)?;
            Ok(bt.flatten_all()?.to_vec1()?)
        };
        extras.low_rank.iter().map(bt).collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    let mut dense = Vec::new();
    if bts.is_empty() && !hs.is_empty() {
        dense = vec![0f32; n * m];
        for ((h, r), term) in hs.iter().zip(&extras.low_rank) {
            term.add_expanded(&mut dense, m, h, *r)?;
        }
    }
    let terms: Vec<_> = hs
        .iter()
        .zip(&bts)
        .map(|((h, rank), bt)| bf16_kernel::LowRank {
            h,
            bt,
            rank: *rank,
            ldbt,
        })
        .collect();
    let addend = if !terms.is_empty() {
        bf16_kernel::Addend::LowRank(&terms)
    } else if !dense.is_empty() {
        bf16_kernel::Addend::Dense(&dense)
    } else {
        bf16_kernel::Addend::None
    };
    let scale = extras
        .out_scale
        .as_ref()
        .map(|s| s.to_vec1::<f32>())
        .transpose()?;
    kernel(addend, scale.as_deref())
}

/// Elements per parallel task in the passes over the output.
const ELEMENTS_PER_TASK: usize = 1 << 15;

/// Rows of `x` per task in [`project_rows`]: their f32 copy (`ROWS_PER_TASK · k`) stays in L2.
const ROWS_PER_TASK: usize = 64;

/// Each term's `s·x·Aᵀ` (row-major `(n, r)`, and `r`) for `x (n, k)` with row stride `lda`, a
/// block of rows per task: bf16 and f16 rows are widened to f32 (as PEFT casts `x` to the adapter's
/// dtype) into a per-thread buffer, so no f32 copy of the whole of `x` is made.
fn project_rows(
    terms: &[LowRank],
    x: Elements,
    n: usize,
    k: usize,
    lda: usize,
) -> Result<Vec<(Vec<f32>, usize)>> {
    thread_local! {
        static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    if terms.is_empty() {
        return Ok(Vec::new());
    }
    let project = |data: &[f32], rows: usize| -> Result<Vec<(Vec<f32>, usize)>> {
        let lhs = Strided::row_major(data, rows, k);
        terms.iter().map(|t| t.project_rows(lhs, data)).collect()
    };
    let blocks = n.div_ceil(ROWS_PER_TASK);
    let rank: usize = terms.iter().map(|t| t.a.dims()[0]).sum();
    let small = n * k * rank < super::pool::PARALLEL_MIN_WORK;
    let blocks: Vec<Vec<(Vec<f32>, usize)>> = (0..blocks)
        .into_par_iter()
        .with_min_len(if small { blocks } else { 1 })
        .map(|b| {
            let rows = b * ROWS_PER_TASK..n.min((b + 1) * ROWS_PER_TASK);
            match x {
                Elements::F32(x) if lda == k => {
                    project(&x[rows.start * k..rows.end * k], rows.len())
                }
                _ => WIDENED.with_borrow_mut(|buf| {
                    buf.resize(rows.len() * k, 0.0);
                    for (i, wide) in rows.clone().zip(buf.chunks_mut(k.max(1))) {
                        x.widen_range(i * lda..i * lda + k, wide);
                    }
                    project(buf, rows.len())
                }),
            }
        })
        .collect::<Result<_>>()?;
    Ok(terms
        .iter()
        .enumerate()
        .map(|(t, term)| {
            let h = blocks.iter().flat_map(|b| &b[t].0).copied().collect();
            (h, term.a.dims()[0])
        })
        .collect())
}

/// `out (n, m) [+]= x·Wᵀ` for f16 `x (n, k)` and the f16 weight `w_t (k, m)`, both with rows
/// contiguous along k: f32 sums of exact products, as torch's f16 matmul. Few rows take row dot
/// products on the weight widened as it is read (read once, as f16); more take the AMX tiles
/// (each f16 split exactly into two bf16: [`bf16_kernel::matmul_f16_nt_amx`]) where the CPU has
/// them, else the loaded BLAS's f16 GEMM (MKL's), else f32 copies of both through [`sgemm`].
fn f16_product(x: &Tensor, w_t: &Tensor, out: &mut [f32], accumulate: bool) -> Result<()> {
    let (n, k, m) = (x.dim(0)?, x.dim(1)?, w_t.dim(1)?);
    if n == 0 || m == 0 {
        return Ok(());
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w_t.storage_and_layout();
    let (xv, wv) = (cpu_slice::<f16>(&xs, xl)?, cpu_slice::<f16>(&ws, wl)?);
    let (lda, ldw) = (xl.stride()[0].max(k), wl.stride()[1].max(k));
    let widened = |v: &[f16], rows: usize, ld: usize| {
        let mut wide = vec![0f32; rows * k];
        wide.par_chunks_mut(k.max(1))
            .enumerate()
            .with_min_len(ELEMENTS_PER_TASK.div_ceil(k.max(1)))
            .for_each(|(i, row)| fp16::widen_into(&v[i * ld..][..k], row));
        wide
    };
    let out = &mut out[..n * m];
    if n <= MAX_ROWS && ldw == k {
        let y = rows_dot_rows(&widened(xv, n, lda), &wv[..m * k], n, k, m);
        if accumulate {
            out.iter_mut().zip(&y).for_each(|(o, y)| *o += y);
        } else {
            out.copy_from_slice(&y);
        }
        return Ok(());
    }
    let tiles = bf16_kernel::Out::F32 {
        y: &mut *out,
        accumulate,
    };
    if f16_tiles_pay(n) && bf16_kernel::matmul_f16_nt_amx(n, m, k, xv, lda, wv, ldw, tiles) {
        return Ok(());
    }
    let blas = crate::blas::library().filter(|b| b.f16_gemm_fits([n, m, k, lda, ldw]));
    let Some(blas) = blas else {
        let (x32, w32) = (widened(xv, n, lda), widened(wv, m, ldw));
        let (lhs, rhs) = (
            Strided::row_major(&x32, n, k),
            Strided::row_major(&w32, m, k).t(),
        );
        sgemm(out, m, lhs, rhs, accumulate, 1.0, all_threads());
        return Ok(());
    };
    let parts = if n * m * k < super::pool::PARALLEL_MIN_WORK {
        1
    } else {
        rayon::current_num_threads()
    };
    let out = faer::MatMut::from_row_major_slice_mut(out, n, m);
    output_blocks(out, parts)
        .into_par_iter()
        .for_each(|(i, j, dst)| {
            let (x, w) = (xv[i * lda..].as_ptr(), wv[j * ldw..].as_ptr());
            // SAFETY: `x`'s rows from i and `w`'s rows (output columns) from j exist, and `dst` is
            // this block of the output (row stride m), written by this block alone.
            unsafe {
                let (rows, cols, c) = (dst.nrows(), dst.ncols(), dst.as_ptr_mut());
                blas.gemm_f16_nt(rows, cols, k, (x, lda), (w, ldw), accumulate, c, m)
            };
        });
    Ok(())
}

/// Whether an f16 product of `n` rows takes the AMX tiles: past the row dot products' rows,
/// where the CPU has them. Measured on the 2-core Xeon, tiles vs MKL's f16 GEMM: 4096², 17 rows
/// 4.4 vs 8.1 ms, 64 rows 7.1 vs 12.8 (torch 7.4); 1024², 17 rows 0.29 vs 0.42.
fn f16_tiles_pay(n: usize) -> bool {
    n > MAX_ROWS && bf16_kernel::has_amx()
}

/// `scale · lhs·rhs` for 2-D tensors (any strides): one parallel f32 GEMM on the CPU with the
/// scale applied in it, candle's matmul and a scaling pass elsewhere.
pub(crate) fn matmul_scaled(lhs: &Tensor, rhs: &Tensor, scale: f64) -> Result<Tensor> {
    let fits = [lhs, rhs]
        .iter()
        .all(|t| t.device().is_cpu() && !t.track_op() && t.dtype() == DType::F32 && t.rank() == 2);
    if !fits || lhs.dim(1)? != rhs.dim(0)? {
        let product = lhs.matmul(rhs)?;
        return Ok(if scale == 1.0 {
            product
        } else {
            product.affine(scale, 0.0)?
        });
    }
    let (n, m) = (lhs.dim(0)?, rhs.dim(1)?);
    let mut out = vec![0f32; n * m];
    {
        let (ls, ll) = lhs.storage_and_layout();
        let (rs, rl) = rhs.storage_and_layout();
        let a = Strided::new(cpu_slice::<f32>(&ls, ll)?, ll);
        let b = Strided::new(cpu_slice::<f32>(&rs, rl)?, rl);
        sgemm(&mut out, m, a, b, false, scale as f32, all_threads());
    }
    super::pool::after_parallel_work(n * m * lhs.dim(1)?);
    Ok(Tensor::from_vec(out, (n, m), &Device::Cpu)?)
}

/// `target (n, m) += scale · lhs·rhs` in the target's own storage, for f32 CPU tensors without
/// gradients (`lhs (n, r)` and `rhs (r, m)` of any strides, `target` contiguous): the parallel
/// GEMM accumulates into it (a merge then needs no `ΔW` buffer and no pass adding it). `false`,
/// nothing done, where that does not apply. The caller must own `target` (a module's weight).
pub(crate) fn add_product_in_place(
    target: &Tensor,
    lhs: &Tensor,
    rhs: &Tensor,
    scale: f64,
) -> Result<bool> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && !t.track_op() && t.dtype() == DType::F32;
    let (Ok((n, m)), Ok((ln, r)), Ok((rr, rm))) = (target.dims2(), lhs.dims2(), rhs.dims2()) else {
        return Ok(false);
    };
    let shapes = ln == n && rr == r && rm == m;
    if !(shapes && target.is_contiguous() && [target, lhs, rhs].into_iter().all(f32_cpu)) {
        return Ok(false);
    }
    target.inplace_op3(lhs, rhs, &AddProduct(scale as f32))?;
    super::pool::after_parallel_work(n * m * r);
    Ok(true)
}

/// [`add_product_in_place`]'s in-place op: the scale.
struct AddProduct(f32);

impl candle_core::InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "add-product-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &Layout,
        s2: &candle_core::CpuStorage,
        l2: &Layout,
        s3: &candle_core::CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage::F32;
        let (F32(target), F32(lhs), F32(rhs)) = (s1, s2, s3) else {
            candle_core::bail!("adding a product in place needs f32 tensors");
        };
        let Some((start, end)) = l1.contiguous_offsets() else {
            candle_core::bail!("adding a product in place needs a contiguous target");
        };
        let m = l1.dims()[1];
        let (lhs, rhs) = (&lhs[l2.start_offset()..], &rhs[l3.start_offset()..]);
        let (lhs, rhs) = (Strided::new(lhs, l2), Strided::new(rhs, l3));
        sgemm(
            &mut target[start..end],
            m,
            lhs,
            rhs,
            true,
            self.0,
            all_threads(),
        );
        Ok(())
    }
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

    fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    fn as_faer(&self) -> faer::MatRef<'a, f32> {
        let last = |len: usize, stride: usize| len.saturating_sub(1) * stride;
        let end = last(self.rows, self.row_stride) + last(self.cols, self.col_stride);
        assert!(self.rows * self.cols == 0 || end < self.data.len());
        // SAFETY: every element the view describes lies in `data` (checked above), which
        // outlives the returned view.
        unsafe {
            faer::MatRef::from_raw_parts(
                self.data.as_ptr(),
                self.rows,
                self.cols,
                self.row_stride as isize,
                self.col_stride as isize,
            )
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
///
/// In parallel, the output is cut into blocks along its longer side, each one sequential
/// product on its thread: the loaded BLAS's ([`crate::blas`]) or faer's. Measured on a 2-core
/// Xeon (AVX-512), faer's products this way ran 1.2–1.3× faster than faer's own parallel split
/// (512 × 1024 × 1024: 238 → 294 GFLOP/s; torch's MKL 318).
fn sgemm(
    out: &mut [f32],
    m: usize,
    lhs: Strided,
    rhs: Strided,
    accumulate: bool,
    scale: f32,
    par: faer::Par,
) {
    let (n, k) = (lhs.rows, lhs.cols);
    assert!(rhs.rows == k && rhs.cols == m);
    let accum = if accumulate {
        faer::Accum::Add
    } else {
        faer::Accum::Replace
    };
    let (lhs, rhs) = (lhs.as_faer(), rhs.as_faer());
    let blas = crate::blas::library();
    let product = |mut dst: faer::MatMut<'_, f32>, lhs: faer::MatRef<'_, f32>, rhs| {
        if blas.is_some_and(|b| b.sgemm(dst.as_mut(), accumulate, lhs, rhs, scale)) {
            return;
        }
        faer::linalg::matmul::matmul(dst, accum, lhs, rhs, scale, faer::Par::Seq);
    };
    let out = &mut out[..n * m];
    let threads = par.degree();
    if threads <= 1 || n * m * k < super::pool::PARALLEL_MIN_WORK {
        return product(faer::MatMut::from_row_major_slice_mut(out, n, m), lhs, rhs);
    }
    // A BLAS packs the whole of `rhs` per call, so it gets one block per thread (1024 x 4096 x
    // 1024, MKL: 26.2 ms vs 27.6 with 4 per thread); faer's sequential products were fastest
    // with 4 per thread.
    let parts = threads * if blas.is_some() { 1 } else { 4 };
    let out = faer::MatMut::from_row_major_slice_mut(out, n, m);
    output_blocks(out, parts)
        .into_par_iter()
        .for_each(|(i, j, dst)| {
            let (rows, cols) = (dst.nrows(), dst.ncols());
            product(dst, lhs.subrows(i, rows), rhs.subcols(j, cols));
        });
}

/// `out` cut into `parts` blocks along its longer side (columns in multiples of 16), each with
/// its first row and column: the parallel split of the products here, one sequential product
/// per block.
fn output_blocks(
    out: faer::MatMut<'_, f32>,
    parts: usize,
) -> Vec<(usize, usize, faer::MatMut<'_, f32>)> {
    let (n, m) = (out.nrows(), out.ncols());
    let mut blocks = Vec::with_capacity(parts);
    let (mut rest, mut at) = (out, 0);
    if n >= m {
        let rows = n.div_ceil(parts).max(1);
        while rest.nrows() > rows {
            let (block, tail) = rest.split_at_row_mut(rows);
            blocks.push((at, 0, block));
            (rest, at) = (tail, at + rows);
        }
        blocks.push((at, 0, rest));
    } else {
        let cols = m.div_ceil(parts).next_multiple_of(16);
        while rest.ncols() > cols {
            let (block, tail) = rest.split_at_col_mut(cols);
            blocks.push((0, at, block));
            (rest, at) = (tail, at + cols);
        }
        blocks.push((0, at, rest));
    }
    blocks
}

/// faer's parallelism over rayon's whole pool.
fn all_threads() -> faer::Par {
    match rayon::current_num_threads() {
        1 => faer::Par::Seq,
        threads => faer::Par::rayon(threads),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::Initializer;

    fn max_abs_diff(a: Tensor, b: Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The product added in place equals candle's `target + scale·lhs·rhs` (strided factors, a
    /// negative scale as unmerging uses); other dtypes, a non-contiguous target or mismatched
    /// shapes are refused with the target untouched.
    #[test]
    fn product_added_in_place_equals_candles_ops() {
        let mut init = Initializer::new(3);
        let mut u = |dims: &[usize]| init.uniform(dims, 1.0, DType::F32).unwrap();
        let (n, r, m) = (37, 5, 300);
        let (left, right_t) = (u(&[n, r]), u(&[m, r]));
        let right = right_t.t().unwrap();
        for scale in [0.75, -2.0] {
            let target = u(&[n, m]);
            let want = (&target + (left.matmul(&right).unwrap() * scale).unwrap()).unwrap();
            assert!(add_product_in_place(&target, &left, &right, scale).unwrap());
            assert!(max_abs_diff(target, want) < 1e-5);
        }
        let half = u(&[n, m]).to_dtype(DType::BF16).unwrap();
        let wide = u(&[m, n]);
        let refused = [
            (half.clone(), left.clone(), right.clone()),
            (wide.t().unwrap(), left.clone(), right.clone()),
            (u(&[n, m]), left.clone(), right_t.clone()),
        ];
        for (target, l, r) in refused {
            let before = target.to_dtype(DType::F32).unwrap().copy().unwrap();
            assert!(!add_product_in_place(&target, &l, &r, 1.0).unwrap());
            assert_eq!(
                max_abs_diff(target.to_dtype(DType::F32).unwrap(), before),
                0.0
            );
        }
    }

    /// Scaled low-rank terms (VeRA's per-rank and per-output scales, a term bias) with the base
    /// and bias equal candle's ops, for few rows (the terms per row), fewer rows than the rank
    /// (the term scaled per output) and more (`B` scaled), and many rows (folded into the
    /// weight: `fold_low_rank` applies, checked).
    #[test]
    fn low_rank_terms_kept_apart_or_folded_equal_candles_ops() {
        let mut init = Initializer::new(5);
        let (k, m, r) = (16, 24, 40);
        let mut u = |dims: &[usize]| init.uniform(dims, 1.0, DType::F32).unwrap();
        let (w, bias, a, b) = (u(&[m, k]), u(&[m]), u(&[r, k]), u(&[m, r]));
        let (rank_scale, out_scale, term_bias) = (u(&[r]), u(&[m]), u(&[m]));
        let term = || LowRank {
            rank_scale: Some(rank_scale.clone()),
            out_scale: Some(out_scale.clone()),
            ..LowRank::new(a.clone(), b.clone(), Some(term_bias.clone()), 0.7)
        };
        for (n, folds) in [(5, false), (24, false), (50, false), (400, true)] {
            let x = u(&[n, k]);
            let w_t = w.t().unwrap();
            let folded = fold_low_rank(&x, &w_t, &[term()]).unwrap();
            assert_eq!(folded.is_some(), folds, "{n} rows");
            let y = linear(&x, &w_t, Some(&bias), &Extras::low_rank(term()))
                .unwrap()
                .unwrap();
            let h = (x.matmul(&a.t().unwrap()).unwrap() * 0.7)
                .unwrap()
                .broadcast_mul(&rank_scale)
                .unwrap();
            let expected = (x.matmul(&w_t).unwrap().broadcast_add(&bias).unwrap()
                + h.matmul(&b.t().unwrap())
                    .unwrap()
                    .broadcast_mul(&out_scale)
                    .unwrap())
            .unwrap()
            .broadcast_add(&(&term_bias * 0.7).unwrap())
            .unwrap();
            let diff = max_abs_diff(y, expected);
            assert!(diff < 1e-4, "{n} rows: {diff}");
        }
    }

    /// An f16 layer with a low-rank term, as PEFT computes it: the base output (f32 sums of the
    /// exact f16 products, plus the bias) rounded to f16, the term added in f32, the sum rounded
    /// to f16. Against that computed in f64 every output is within one f16 step (f32 summation
    /// order can move a value across a rounding boundary) and nearly all are equal; for few rows
    /// (row dot products on the widened weight) and more (f32 copies through faer: no BLAS is
    /// loaded in these tests), `x` with rows further apart than its width, and without a term.
    #[test]
    fn f16_layer_rounds_as_peft() {
        let mut init = Initializer::new(9);
        let (k, m, r) = (72, 40, 4);
        let mut u = |dims: &[usize]| init.uniform(dims, 1.0, DType::F32).unwrap();
        let (w, bias, a, b, out_scale) = (u(&[m, k]), u(&[m]), u(&[r, k]), u(&[m, r]), u(&[m]));
        let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let (w16, bias16) = (half(&w), half(&bias));
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
        let round = |v: f64| f16::from_f64(v).to_f64();
        let cases = [
            (0, true, false),
            (1, true, false),
            (5, true, false),
            (16, false, false),
            (17, true, false),
        ];
        let more = [(40, true, false), (40, false, false), (40, true, true)];
        for (n, with_term, infinite) in cases.into_iter().chain(more) {
            let mut wide = half(&u(&[n, k + 8]));
            if infinite {
                let mut v = wide.flatten_all().unwrap().to_vec1::<f16>().unwrap();
                v[k + 8 + 3] = f16::INFINITY; // in row 1
                wide = Tensor::from_vec(v, (n, k + 8), &Device::Cpu).unwrap();
            }
            let x = wide.narrow(1, 0, k).unwrap();
            let term = LowRank {
                out_scale: Some(out_scale.clone()),
                ..LowRank::new(a.clone(), b.clone(), None, 0.5)
            };
            let extras = if with_term {
                Extras::low_rank(term)
            } else {
                Extras::default()
            };
            let y = linear(&x, &w16.t().unwrap(), Some(&bias16), &extras)
                .unwrap()
                .unwrap();
            assert_eq!(y.dtype(), DType::F16);
            let (xs, ws, bs) = (f64s(&x), f64s(&w16), bias16.to_dtype(DType::F64).unwrap());
            let bs = bs.to_vec1::<f64>().unwrap();
            let (av, bv, ss) = (f64s(&a), f64s(&b), out_scale.to_dtype(DType::F64).unwrap());
            let ss = ss.to_vec1::<f64>().unwrap();
            let dot = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(p, q)| p * q).sum::<f64>();
            let (mut equal, mut total) = (0, 0);
            for (i, got) in f64s(&y).iter().enumerate() {
                let h: Vec<f64> = av.iter().map(|a| 0.5 * dot(&xs[i], a)).collect();
                for j in 0..m {
                    let base = round(dot(&xs[i], &ws[j]) + bs[j]);
                    let want = if with_term {
                        round(base + dot(&h, &bv[j]) * ss[j])
                    } else {
                        base
                    };
                    if !want.is_finite() {
                        let same = got[j] == want || (got[j].is_nan() && want.is_nan());
                        assert!(same, "{n} rows, ({i}, {j}): {} vs {want}", got[j]);
                        continue;
                    }
                    // One step of the output, and with a term one of the base output rounded
                    // before it (a sum near a boundary rounds either way).
                    let step = |v: f64| {
                        (f16::from_f64(v.abs()).to_f64() * 2f64.powi(-10)).max(2f64.powi(-24))
                    };
                    let slack = step(want) + if with_term { step(base) } else { 0.0 };
                    let diff = (got[j] - want).abs();
                    assert!(diff <= slack, "{n} rows, ({i}, {j}): {} vs {want}", got[j]);
                    equal += usize::from(diff == 0.0);
                    total += 1;
                }
            }
            assert!(
                equal * 100 >= total * 95,
                "{n} rows: {equal} of {total} equal"
            );
        }
    }

    /// The three bf16 parts of an f32 sum to it exactly, down to 2⁻¹⁰⁰.
    #[test]
    fn split3_parts_sum_exactly() {
        let mut rng = crate::rng::TorchGenerator::new(11);
        let mut a: Vec<f32> = (0..20_000)
            .map(|_| {
                let mantissa = rng.next_u32() >> 9;
                let exponent = 27 + rng.next_u32() % 227;
                f32::from_bits((rng.next_u32() & 0x8000_0000) | (exponent << 23) | mantissa)
            })
            .collect();
        a.extend([0.0, -0.0, 1.0, f32::MAX, -f32::MAX, 2f32.powi(-100)]);
        for v in a {
            let parts = split3(v);
            let sum: f64 = parts.iter().map(|p| f64::from(p.to_f32())).sum();
            assert_eq!(sum, f64::from(v), "{v:e} = {parts:?}");
        }
    }

    /// The low-rank projections of a bf16 `x`, by row dot products and by the split product (on
    /// AMX tiles where the CPU has them, the AVX-512 BF16 or portable kernel otherwise), equal the
    /// f64 product of `x` and the f32 `A`, scaled per term and per rank, to f32 accuracy.
    #[test]
    fn bf16_projections_equal_the_f32_product() {
        let mut init = Initializer::new(9);
        let (n, k) = (40, 300);
        let x = init.uniform(&[n, k], 1.0, DType::F32).unwrap();
        let x = x.to_dtype(DType::BF16).unwrap();
        let terms: Vec<LowRank> = [(3, 0.5), (5, 2.0)]
            .into_iter()
            .map(|(r, scale)| {
                let a = init.uniform(&[r, k], 1.0, DType::F32).unwrap();
                let b = init.uniform(&[7, r], 1.0, DType::F32).unwrap();
                LowRank {
                    rank_scale: Some(init.uniform(&[r], 1.0, DType::F32).unwrap()),
                    ..LowRank::new(a, b, None, scale)
                }
            })
            .collect();
        assert!(
            n * k < AMX_MIN_ELEMENTS,
            "project_terms takes the row dot products"
        );
        let by_rows = project_terms(&x, &terms).unwrap();
        let x_bf16 = x.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
        let split = project_split(&terms, &x_bf16, n, k, k).unwrap();
        let xs = x.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        let both = by_rows.iter().zip(&terms).chain(split.iter().zip(&terms));
        for ((h, r), term) in both {
            assert_eq!(*r, term.rank());
            let a = term.a.to_vec2::<f32>().unwrap();
            let rank_scale = term.rank_scale.as_ref().unwrap().to_vec1::<f32>().unwrap();
            for i in 0..n {
                for q in 0..*r {
                    let dot: f64 = (0..k)
                        .map(|c| f64::from(xs[i][c]) * f64::from(a[q][c]))
                        .sum();
                    let size: f64 = (0..k).map(|c| f64::from((xs[i][c] * a[q][c]).abs())).sum();
                    let factor = term.scale * f64::from(rank_scale[q]);
                    let err = (f64::from(h[i * r + q]) - dot * factor).abs();
                    assert!(
                        err <= 1e-6 * size * factor.abs(),
                        "row {i} rank {q}: {err:e}"
                    );
                }
            }
        }
    }

    #[test]
    fn matmul_scaled_equals_candles_matmul_on_strided_operands() {
        let mut init = Initializer::new(7);
        // The last two are large enough to run in parallel, cut along rows and along columns
        // (blocks of uneven size).
        for (n, k, m) in [
            (1, 1, 1),
            (5, 3, 7),
            (65, 17, 130),
            (301, 64, 70),
            (70, 64, 333),
        ] {
            let a = init.uniform(&[k, n], 1.0, DType::F32).unwrap();
            let b = init.uniform(&[k, m], 1.0, DType::F32).unwrap();
            let (lhs, rhs) = (a.t().unwrap(), b);
            let fast = matmul_scaled(&lhs, &rhs, 0.5).unwrap();
            let plain = lhs.matmul(&rhs).unwrap().affine(0.5, 0.0).unwrap();
            let diff = max_abs_diff(fast, plain);
            assert!(diff < 1e-5, "{n}x{k}x{m}: {diff}");
        }
    }
}
