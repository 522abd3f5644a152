//! A CPU kernel for the case candle's matmul handles slowly: few rows (decoding one token, a
//! short batch) times a large weight, `y = x · wᵀ` with `w` stored `(out, in)` as PyTorch does.
//! Each output is a dot product of two contiguous rows, so the weight is streamed once, in
//! parallel over output features; this is memory-bound and runs at memory speed.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Evaluates `$body` (whose arguments are the listed parameters) through a copy compiled for
/// AVX-512 or for AVX2 + FMA where the CPU has them (`Simd::detect`), else as compiled: the
/// portable build's loops are SSE2. `$body` must call only `#[inline(always)]` code, so that each
/// copy is vectorised for its features (a closure passed to a generic dispatcher was not
/// inlined into them: checked by disassembly).
macro_rules! with_simd {
    (($($arg:ident: $ty:ty),* $(,)?) => $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            fn avx512($($arg: $ty),*) {
                $body
            }
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) {
                $body
            }
            match $crate::kernels::bf16::Simd::detect() {
                // SAFETY: the CPU has the features (detected).
                $crate::kernels::bf16::Simd::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                $crate::kernels::bf16::Simd::Avx2 => unsafe { avx2($($arg),*) },
                $crate::kernels::bf16::Simd::Baseline => $body,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        $body
    }};
}

mod bf16;
pub(crate) mod elementwise;
pub use bf16::use_amx;
mod fp16;
pub(crate) mod linear;
mod pool;

/// A CPU tensor's elements in f32, bf16 or f16, widened to f32 as they are read.
#[derive(Clone, Copy)]
pub(crate) enum Elements<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl Elements<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::Bf16(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    /// Elements `range`, widened into `wide` (as long as the range).
    pub(crate) fn widen_range(&self, range: std::ops::Range<usize>, wide: &mut [f32]) {
        match self {
            Self::F32(v) => wide.copy_from_slice(&v[range]),
            Self::Bf16(v) => bf16::widen_into(&v[range], wide),
            Self::F16(v) => fp16::widen_into(&v[range], wide),
        }
    }
}

/// Row counts up to which the kernel beats the general matmul.
pub(crate) const MAX_ROWS: usize = 16;
/// Output features per parallel task.
const BLOCK: usize = 64;

/// `x (n, k) @ w_t (k, m)` where `w_t` may be the transposed view of a contiguous `(m, k)`
/// weight; uses the row-dot kernel for small f32 `n` on the CPU, candle's matmul otherwise.
/// A weight that carries no gradient (a frozen base weight) while `x` does goes through
/// [`FrozenRhs`], whose backward skips the weight's gradient: candle's own matmul backward
/// computes it anyway, a whole extra GEMM per layer in training.
pub(crate) fn matmul(x: &Tensor, w_t: &Tensor) -> Result<Tensor> {
    if x.track_op() && !w_t.track_op() {
        return Ok(x.contiguous()?.apply_op2(w_t, FrozenRhs)?);
    }
    let w = w_t.t()?;
    let fits = x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.dim(0)? <= MAX_ROWS
        && x.is_contiguous()
        && w.is_contiguous();
    Ok(if fits {
        x.apply_op2(&w, RowsDotRows)?
    } else {
        x.matmul(w_t)?
    })
}

/// A weight element [`rows_dot_rows`] reads: f32, or f16 widened as it is loaded.
pub(crate) trait WeightElement: Copy + Sync {
    fn widen(self) -> f32;

    /// Four dot products `x · w[j]` at once (each row at least as long as `x`): four weight
    /// rows streamed side by side keep more memory requests in flight than one. Uses the widest
    /// vector unit the CPU has (checked at run time, cached by std); the compiler does not
    /// vectorise the portable loop by itself.
    fn dot4(x: &[f32], w: [&[Self]; 4]) -> [f32; 4];
}

/// [`WeightElement`] for `$t`: `dot4` dispatching to the `simd` functions `$avx512` and `$avx2`
/// (the latter needing the features listed), with a portable fallback.
macro_rules! weight_element {
    ($t:ty, $widen:expr, $avx512:ident, $avx2:ident, [$($avx2_feature:tt),+]) => {
        impl WeightElement for $t {
            fn widen(self) -> f32 {
                $widen(self)
            }

            fn dot4(x: &[f32], w: [&[$t]; 4]) -> [f32; 4] {
                let w = w.map(|row| &row[..x.len()]);
                #[cfg(target_arch = "x86_64")]
                {
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the CPU has AVX-512F, and every row is as long as `x`.
                        return unsafe { simd::$avx512(x, w) };
                    }
                    if $(std::arch::is_x86_feature_detected!($avx2_feature))&&+ {
                        // SAFETY: the CPU has the features, and every row is as long as `x`.
                        return unsafe { simd::$avx2(x, w) };
                    }
                }
                w.map(|row| x.iter().zip(row).map(|(a, b)| a * b.widen()).sum())
            }
        }
    };
}

weight_element!(f32, |v| v, dot4_avx512, dot4_avx2, ["avx2", "fma"]);
weight_element!(
    half::f16,
    half::f16::to_f32,
    dot4_f16_avx512,
    dot4_f16_avx2,
    ["avx2", "fma", "f16c"]
);

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::WeightElement;

    /// The AVX-512 and AVX2 + FMA `dot4` for rows of `$t`, whose 16 or 8 elements at `$p` load
    /// as f32 lanes by `$load16` / `$load8`.
    macro_rules! dot4_simd {
        ($t:ty, $avx512:ident, |$p:ident| $load16:expr, $avx2:ident, $avx2_features:literal, |$q:ident| $load8:expr) => {
            /// # Safety
            /// The CPU must support AVX-512F and each row of `w` must have `x.len()` elements.
            #[target_feature(enable = "avx512f")]
            pub unsafe fn $avx512(x: &[f32], w: [&[$t]; 4]) -> [f32; 4] {
                let k = x.len();
                let body = k - k % 16;
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut i = 0;
                while i < body {
                    // SAFETY: i + 16 <= body <= k, the length of x and of each row.
                    unsafe {
                        let xv = _mm512_loadu_ps(x.as_ptr().add(i));
                        for (a, row) in acc.iter_mut().zip(&w) {
                            let $p = row.as_ptr().add(i);
                            *a = _mm512_fmadd_ps(xv, $load16, *a);
                        }
                    }
                    i += 16;
                }
                let mut out = [0f32; 4];
                for ((o, a), row) in out.iter_mut().zip(acc).zip(&w) {
                    let tail: f32 = x[body..]
                        .iter()
                        .zip(&row[body..])
                        .map(|(p, q)| p * q.widen())
                        .sum();
                    *o = _mm512_reduce_add_ps(a) + tail;
                }
                out
            }

            /// # Safety
            /// The CPU must support the features enabled here, and each row of `w` must have
            /// `x.len()` elements.
            #[target_feature(enable = $avx2_features)]
            pub unsafe fn $avx2(x: &[f32], w: [&[$t]; 4]) -> [f32; 4] {
                let k = x.len();
                let body = k - k % 8;
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i < body {
                    // SAFETY: i + 8 <= body <= k, the length of x and of each row.
                    unsafe {
                        let xv = _mm256_loadu_ps(x.as_ptr().add(i));
                        for (a, row) in acc.iter_mut().zip(&w) {
                            let $q = row.as_ptr().add(i);
                            *a = _mm256_fmadd_ps(xv, $load8, *a);
                        }
                    }
                    i += 8;
                }
                let mut out = [0f32; 4];
                for ((o, a), row) in out.iter_mut().zip(acc).zip(&w) {
                    let mut lanes = [0f32; 8];
                    // SAFETY: `lanes` holds 8 f32.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), a) };
                    let tail: f32 = x[body..]
                        .iter()
                        .zip(&row[body..])
                        .map(|(p, q)| p * q.widen())
                        .sum();
                    *o = lanes.iter().sum::<f32>() + tail;
                }
                out
            }
        };
    }

    dot4_simd!(
        f32,
        dot4_avx512,
        |p| _mm512_loadu_ps(p),
        dot4_avx2,
        "avx2,fma",
        |p| _mm256_loadu_ps(p)
    );
    dot4_simd!(
        half::f16,
        dot4_f16_avx512,
        |p| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
        dot4_f16_avx2,
        "avx2,fma,f16c",
        |p| _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    );
}

/// `x (n, k) · w (m, k)ᵀ` as `(n, m)` row-major, both contiguous, `w` in f32 or f16 (widened
/// as it is read: an f16 weight streams half the bytes): each output a dot product of two rows,
/// the weight streamed once in parallel over output features.
pub(crate) fn rows_dot_rows<W: WeightElement>(
    x: &[f32],
    w: &[W],
    n: usize,
    k: usize,
    m: usize,
) -> Vec<f32> {
    // Computed as (m, n) so each task writes one contiguous block, then laid out (n, m).
    let mut out_t = vec![0f32; m * n];
    out_t
        .par_chunks_mut(BLOCK * n.max(1))
        .enumerate()
        .for_each(|(block, chunk)| {
            let first = block * BLOCK;
            let count = chunk.len() / n.max(1);
            let row = |j: usize| &w[(first + j) * k..][..k];
            for j in (0..count).step_by(4) {
                // Pad the last group with row j (its results are not stored).
                let group = [
                    row(j),
                    row((j + 1).min(count - 1)),
                    row((j + 2).min(count - 1)),
                    row((j + 3).min(count - 1)),
                ];
                for r in 0..n {
                    let dots = W::dot4(&x[r * k..][..k], group);
                    for (jj, d) in dots.iter().enumerate().take(count - j) {
                        chunk[(j + jj) * n + r] = *d;
                    }
                }
            }
        });
    if n == 1 {
        out_t
    } else {
        (0..n * m).map(|i| out_t[(i % m) * n + i / m]).collect()
    }
}

/// `y = x · wᵀ` for contiguous `x (n, k)` and `w (m, k)`.
struct RowsDotRows;

/// The data of a contiguous f32 CPU tensor (what the CPU kernels here take).
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("this CPU kernel needs a contiguous f32 tensor"),
    }
}

impl CustomOp2 for RowsDotRows {
    fn name(&self) -> &'static str {
        "rows-dot-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = l1.shape().dims2()?;
        let (m, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("row-dot matmul: inner dimensions {k} and {k2} differ");
        }
        let (x, w) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let y = rows_dot_rows(x, w, n, k, m);
        Ok((CpuStorage::F32(y), Shape::from((n, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), Some(grad.t()?.matmul(x)?)))
    }
}

/// `x @ w` with `w` constant: candle's matmul forward on each backend, backward only for `x`.
struct FrozenRhs;

impl FrozenRhs {
    fn bmnk(l1: &Layout, l2: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (m, k) = l1.shape().dims2()?;
        let (k2, n) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("matmul: inner dimensions {k} and {k2} differ");
        }
        Ok((1, m, n, k))
    }
}

impl CustomOp2 for FrozenRhs {
    fn name(&self) -> &'static str {
        "matmul-frozen-rhs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (b, m, n, k) = Self::bmnk(l1, l2)?;
        Ok((s1.matmul(s2, (b, m, n, k), l1, l2)?, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (b, m, n, k) = Self::bmnk(l1, l2)?;
        Ok((s1.matmul(s2, (b, m, n, k), l1, l2)?, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&w.t()?)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_matmul_and_its_gradients() {
        for (n, k, m) in [
            (1, 4096, 300),
            (3, 37, 129),
            (8, 16, 1),
            (1, 5, 64),
            (16, 70, 7),
        ] {
            let x = candle_core::Var::randn(0f32, 1., (n, k), &Device::Cpu).unwrap();
            let w = candle_core::Var::randn(0f32, 1., (m, k), &Device::Cpu).unwrap();
            let fast = matmul(&x, &w.t().unwrap()).unwrap();
            let slow = x.matmul(&w.t().unwrap()).unwrap();
            let diff = (&fast - &slow)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-3, "{n}x{k}x{m}: {diff}");
            let g_fast = fast.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g_slow = slow.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let (a, b) = (g_fast.get(v).unwrap(), g_slow.get(v).unwrap());
                let diff = (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff < 1e-2, "{n}x{k}x{m} grad: {diff}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_simd_path_agrees_with_the_scalar_sum() {
        let x: Vec<f32> = (0..77).map(|i| (i as f32 * 0.37).sin()).collect();
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|j| {
                (0..77)
                    .map(|i| ((i * (j + 2)) as f32 * 0.11).cos())
                    .collect()
            })
            .collect();
        let w = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
        let want = w.map(|r| {
            x.iter()
                .zip(r)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum::<f64>()
        });
        let check = |got: [f32; 4], path: &str| {
            for (g, e) in got.iter().zip(want) {
                assert!((f64::from(*g) - e).abs() < 1e-4, "{path}: {g} vs {e}");
            }
        };
        check(f32::dot4(&x, w), "dispatch");
        if std::arch::is_x86_feature_detected!("avx512f") {
            check(unsafe { simd::dot4_avx512(&x, w) }, "avx512");
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            check(unsafe { simd::dot4_avx2(&x, w) }, "avx2");
        }
        // f16 rows: the same sums over the rows rounded to f16.
        let halves: Vec<Vec<half::f16>> = rows
            .iter()
            .map(|r| r.iter().map(|v| half::f16::from_f32(*v)).collect())
            .collect();
        let h = [
            &halves[0][..],
            &halves[1][..],
            &halves[2][..],
            &halves[3][..],
        ];
        let want = h.map(|r| {
            x.iter()
                .zip(r)
                .map(|(a, b)| f64::from(*a) * b.to_f64())
                .sum::<f64>()
        });
        let check = |got: [f32; 4], path: &str| {
            for (g, e) in got.iter().zip(want) {
                assert!((f64::from(*g) - e).abs() < 1e-4, "{path}: {g} vs {e}");
            }
        };
        check(half::f16::dot4(&x, h), "f16 dispatch");
        if std::arch::is_x86_feature_detected!("avx512f") {
            check(unsafe { simd::dot4_f16_avx512(&x, h) }, "f16 avx512");
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            check(unsafe { simd::dot4_f16_avx2(&x, h) }, "f16 avx2");
        }
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient_and_the_input_the_right_one() {
        let x = candle_core::Var::randn(0f32, 1., (37, 20), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1., (9, 20), &Device::Cpu).unwrap();
        let w_t = w.t().unwrap();
        let frozen = matmul(x.as_tensor(), &w_t).unwrap();
        let plain = x.as_tensor().matmul(&w_t).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(diff(&frozen, &plain) < 1e-5);
        let g_frozen = frozen.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_plain = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(diff(g_frozen.get(&x).unwrap(), g_plain.get(&x).unwrap()) < 1e-3);
        assert!(g_frozen.get(&w_t).is_none() && g_frozen.get(&w).is_none());
    }
}
