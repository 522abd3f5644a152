//! Multi-threaded bf16 matrix multiply `y = x · wᵀ` with f32 accumulation.
//!
//! `w` is in `PyTorch`'s `Linear` layout (`out_features × in_features`), so both
//! operands are contiguous along the reduction dimension. On CPUs with
//! AVX-512 BF16 the work runs on `vdpbf16ps` kernels; elsewhere a portable
//! f32 path gives the same result up to summation order.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use half::bf16;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;
#[cfg(test)]
mod tests;

/// Destination of `x · wᵀ`: an `m × n` row-major contiguous buffer. The bf16
/// modes may be handed uninitialized memory: every element is written.
#[derive(Debug)]
pub enum Out<'a> {
    /// `y = bf16(x · wᵀ + bias)`, rounded once from the f32 accumulator; the bias has one
    /// entry per output column.
    Bf16 {
        y: &'a mut [MaybeUninit<bf16>],
        bias: Option<&'a [bf16]>,
    },
    /// `y = x · wᵀ`, or `y += x · wᵀ` when `accumulate` is set (to fuse
    /// several products, e.g. base + `LoRA`, before one final rounding).
    F32 { y: &'a mut [f32], accumulate: bool },
    /// A bf16 (or f16) layer's output with f32 adapter terms added, as PEFT adds its
    /// adapters' f32 outputs to the base layer's bf16 output and rounds the
    /// sum once: `y = bf16((bf16(x · wᵀ + bias) + addend) ⊙ scale)`.
    Adapted {
        y: HalfOut<'a>,
        /// One f32 entry per output column.
        bias: Option<&'a [f32]>,
        addend: Addend<'a>,
        /// One entry per output column.
        scale: Option<&'a [f32]>,
    },
}

/// The output of [`Out::Adapted`], in the layer's dtype (f16 from [`matmul_f16_nt_amx`]).
#[derive(Debug)]
pub enum HalfOut<'a> {
    Bf16(&'a mut [MaybeUninit<bf16>]),
    F16(&'a mut [MaybeUninit<half::f16>]),
}

/// What [`Out::Adapted`] adds to the rounded base output.
#[derive(Debug, Clone, Copy)]
pub enum Addend<'a> {
    None,
    /// `Σₜ hₜ · btₜ`, formed tile by tile as the base output is finished: for
    /// small ranks, whose `btₜ` rows stay in cache.
    LowRank(&'a [LowRank<'a>]),
    /// A finished `m × n` row-major term.
    Dense(&'a [f32]),
}

/// One low-rank term `h · bt`: `h` is `m × rank`, `bt` is `rank × n`, both
/// row-major, `bt`'s rows `ldbt ≥ n` floats apart. A tile's columns read
/// all `rank` rows of `bt` at once, so a stride of a multiple of 4 KiB puts
/// them in one L1 set (16 rows > 12 ways: every read misses); see
/// [`LowRank::padded_stride`].
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    pub h: &'a [f32],
    pub bt: &'a [f32],
    pub rank: usize,
    pub ldbt: usize,
}

impl LowRank<'_> {
    /// A row stride for `bt` of `n` columns whose rows fall in different L1
    /// sets: `n` rounded up to a cache line, plus one line.
    #[must_use]
    pub fn padded_stride(n: usize) -> usize {
        n.next_multiple_of(16) + 16
    }
}

/// Whether this CPU has the AVX-512 BF16 dot-product instructions used by
/// the fast path.
#[must_use]
pub fn has_bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Set by [`use_amx`]`(false)`: the kernels leave the tiles alone.
static AMX_OFF: AtomicBool = AtomicBool::new(false);

/// Lets the kernels use the AMX tiles where the CPU has them (the default) or not (they then
/// take the AVX-512 BF16 kernels, MKL's f16 GEMM or f32 copies: for comparisons and tests);
/// returns whether they are in use now.
pub fn use_amx(enabled: bool) -> bool {
    AMX_OFF.store(!enabled, Ordering::Relaxed);
    has_amx()
}

/// Whether this CPU has the AMX BF16 tile instructions, the OS lets this
/// process use them and [`use_amx`] has not turned them off; the kernel then
/// runs on them where shapes allow.
#[must_use]
pub fn has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !AMX_OFF.load(Ordering::Relaxed) && amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Computes `y = x · wᵀ` into `out`, accumulating in f32, on the calling
/// thread helped by rayon's global pool (small products stay serial).
///
/// `x` is `m × k` with row stride `lda`, `w` is `n × k` with row stride
/// `ldw` (`PyTorch` `Linear` weight layout); the output is `m × n` contiguous.
///
/// # Panics
/// If a stride is smaller than `k`, a slice is too short, the output is not
/// exactly `m × n`, or the bias length is not `n`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16_nt(
    m: usize,
    n: usize,
    k: usize,
    x: &[bf16],
    lda: usize,
    w: &[bf16],
    ldw: usize,
    out: Out<'_>,
) {
    let backend = if has_amx() {
        Backend::Amx
    } else if has_bf16_dot() {
        Backend::Bf16Dot
    } else {
        Backend::Portable
    };
    run(backend, Problem::new(m, n, k, x, lda, w, ldw), out);
}

/// [`matmul_bf16_nt`] for f16 operands on AMX tiles: each f16 is split exactly into two bf16, so
/// the product is four bf16 products with exact multiplies and f32 sums (torch's f16 matmul, in
/// another summation order). Returns `false`, nothing written, where AMX is absent, the shape
/// does not fill a tile (fewer than 16 rows), or an operand holds an infinity (split, `∞ · 0`
/// would make it NaN where torch's product keeps it).
///
/// # Panics
/// As [`matmul_bf16_nt`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_f16_nt_amx(
    m: usize,
    n: usize,
    k: usize,
    x: &[half::f16],
    lda: usize,
    w: &[half::f16],
    ldw: usize,
    out: Out<'_>,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Both are 16-bit patterns; only the split packing reads them, as f16.
        let bits = |v: &[half::f16]| -> &[bf16] {
            // SAFETY: f16 and bf16 are both `u16`-sized plain bit patterns.
            unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) }
        };
        let p = Problem {
            f16: true,
            ..Problem::new(m, n, k, bits(x), lda, bits(w), ldw)
        };
        if !(has_amx() && amx::fits(&p) && n > 0 && k > 0) {
            return false;
        }
        let sink = Sink::new(out, p.m, p.n);
        // SAFETY: AMX was just detected and the shape fits its tiles.
        unsafe { amx::matmul(&p, &sink) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, x, lda, w, ldw, out);
        false
    }
}

/// Which implementation computes the product; tests force each one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// AMX tiles where the shape fits them, the AVX-512 BF16 kernels elsewhere.
    Amx,
    Bf16Dot,
    Portable,
}

/// Validated operand shapes.
#[derive(Clone, Copy)]
struct Problem<'a> {
    m: usize,
    n: usize,
    k: usize,
    x: &'a [bf16],
    lda: usize,
    w: &'a [bf16],
    ldw: usize,
    /// `x` and `w` hold f16 bits (only the AMX kernel takes them: [`matmul_f16_nt_amx`]).
    f16: bool,
}

impl<'a> Problem<'a> {
    fn new(
        m: usize,
        n: usize,
        k: usize,
        x: &'a [bf16],
        lda: usize,
        w: &'a [bf16],
        ldw: usize,
    ) -> Self {
        assert!(lda >= k && ldw >= k, "row strides must be at least k");
        if m > 0 && k > 0 {
            assert!(x.len() >= (m - 1) * lda + k, "x is too short");
        }
        if n > 0 && k > 0 {
            assert!(w.len() >= (n - 1) * ldw + k, "w is too short");
        }
        Self {
            m,
            n,
            k,
            x,
            lda,
            w,
            ldw,
            f16: false,
        }
    }
}

fn run(backend: Backend, p: Problem<'_>, out: Out<'_>) {
    let sink = Sink::new(out, p.m, p.n);
    if p.m == 0 || p.n == 0 {
        return;
    }
    if p.k == 0 {
        let zeros = vec![0.0; p.n];
        for i in 0..p.m {
            // SAFETY: row `i < m` and columns `0..n` are in bounds; nothing
            // else writes the output here.
            unsafe { sink.put_row(i, 0, &zeros) };
        }
        return;
    }
    match backend {
        #[cfg(target_arch = "x86_64")]
        Backend::Amx if amx::available() && amx::fits(&p) => {
            // SAFETY: AMX was just detected and the shape fits its tiles; bf16 operands are
            // never refused.
            unsafe { amx::matmul(&p, &sink) };
        }
        #[cfg(target_arch = "x86_64")]
        Backend::Amx | Backend::Bf16Dot if has_bf16_dot() => {
            // SAFETY: the required CPU features were just detected.
            unsafe { avx512::matmul(&p, &sink) }
        }
        _ => portable::matmul(&p, &sink),
    }
}

/// Shared handle to the output through which parallel tasks write disjoint
/// tiles; it applies the bias, rounding or accumulation of the chosen mode.
#[derive(Clone, Copy)]
struct Sink<'a> {
    dst: Dst<'a>,
    n: usize,
}

#[derive(Clone, Copy)]
enum Dst<'a> {
    Bf16 {
        y: *mut MaybeUninit<bf16>,
        bias: Option<&'a [bf16]>,
    },
    F32 {
        y: *mut f32,
        accumulate: bool,
    },
    Adapted {
        /// bf16 bits, or f16 bits where `f16`.
        y: *mut u16,
        f16: bool,
        epilogue: Epilogue<'a>,
    },
}

/// What [`Out::Adapted`] does to the f32 sums before storing them.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    bias: Option<&'a [f32]>,
    addend: Addend<'a>,
    scale: Option<&'a [f32]>,
}

// SAFETY: `Sink` only hands out writes through `put_row`/`f32_out`, whose
// callers guarantee that concurrent tasks touch disjoint output elements;
// the buffers it points to outlive the parallel region (borrowed by `Out`).
unsafe impl Send for Sink<'_> {}
// SAFETY: as above.
unsafe impl Sync for Sink<'_> {}

impl<'a> Sink<'a> {
    fn new(out: Out<'a>, m: usize, n: usize) -> Self {
        let dst = match out {
            Out::Bf16 { y, bias } => {
                assert_eq!(y.len(), m * n, "output must be m × n");
                if let Some(b) = bias {
                    assert_eq!(b.len(), n, "bias must have n entries");
                }
                Dst::Bf16 {
                    y: y.as_mut_ptr(),
                    bias,
                }
            }
            Out::F32 { y, accumulate } => {
                assert_eq!(y.len(), m * n, "output must be m × n");
                Dst::F32 {
                    y: y.as_mut_ptr(),
                    accumulate,
                }
            }
            Out::Adapted {
                y,
                bias,
                addend,
                scale,
            } => {
                let (y, len, f16) = match y {
                    HalfOut::Bf16(y) => (y.as_mut_ptr().cast::<u16>(), y.len(), false),
                    HalfOut::F16(y) => (y.as_mut_ptr().cast::<u16>(), y.len(), true),
                };
                assert_eq!(len, m * n, "output must be m × n");
                for per_column in [bias, scale].into_iter().flatten() {
                    assert_eq!(per_column.len(), n, "bias and scale need n entries");
                }
                match addend {
                    Addend::None => {}
                    Addend::Dense(a) => assert_eq!(a.len(), m * n, "addend must be m × n"),
                    Addend::LowRank(terms) => {
                        for t in terms {
                            assert!(t.h.len() == m * t.rank, "h must be m × rank");
                            assert!(t.ldbt >= n, "bt's row stride must be at least n");
                            assert!(
                                t.rank == 0 || t.bt.len() >= (t.rank - 1) * t.ldbt + n,
                                "bt must be rank × n"
                            );
                        }
                    }
                }
                Dst::Adapted {
                    y,
                    f16,
                    epilogue: Epilogue {
                        bias,
                        addend,
                        scale,
                    },
                }
            }
        };
        Self { dst, n }
    }

    /// The f32 output and whether it must be added to, for kernels that
    /// accumulate straight into it; `None` in bf16 mode.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn f32_out(&self) -> Option<(*mut f32, bool)> {
        match self.dst {
            Dst::F32 { y, accumulate } => Some((y, accumulate)),
            Dst::Bf16 { .. } | Dst::Adapted { .. } => None,
        }
    }

    /// Stores finished dot products `vals` at row `i`, columns `j0..`.
    ///
    /// # Safety
    /// `i < m`, `j0 + vals.len() <= n`, and no other thread accesses these
    /// output elements during the call.
    #[inline(always)]
    unsafe fn put_row(&self, i: usize, j0: usize, vals: &[f32]) {
        let at = i * self.n + j0;
        let cols = j0..j0 + vals.len();
        match self.dst {
            Dst::Bf16 { y, bias } => {
                // SAFETY: in bounds and exclusive per the caller's contract.
                let row = unsafe { std::slice::from_raw_parts_mut(y.add(at), vals.len()) };
                match bias {
                    None => {
                        for (o, &v) in row.iter_mut().zip(vals) {
                            o.write(round_bf16(v));
                        }
                    }
                    Some(b) => {
                        for ((o, &v), &b) in row.iter_mut().zip(vals).zip(&b[cols]) {
                            o.write(round_bf16(v + b.to_f32()));
                        }
                    }
                }
            }
            Dst::F32 { y, accumulate } => {
                // SAFETY: in bounds and exclusive per the caller's contract.
                let row = unsafe { std::slice::from_raw_parts_mut(y.add(at), vals.len()) };
                if accumulate {
                    for (o, &v) in row.iter_mut().zip(vals) {
                        *o += v;
                    }
                } else {
                    row.copy_from_slice(vals);
                }
            }
            Dst::Adapted { y, f16, epilogue } => {
                // In pieces of 64 columns, a fixed-size f32 buffer the compiler keeps in
                // vector registers while the terms are added.
                let (full, _) = vals.as_chunks::<64>();
                for (c, chunk) in full.iter().enumerate() {
                    // SAFETY: in bounds and exclusive per the caller's contract.
                    unsafe {
                        epilogue.store(f16, self.n, i, j0 + 64 * c, chunk, y.add(at + 64 * c))
                    };
                }
                let done = 64 * full.len();
                for (c, &v) in vals[done..].iter().enumerate() {
                    let (j, dst) = (j0 + done + c, y.wrapping_add(at + done + c));
                    // SAFETY: as above.
                    unsafe { epilogue.store(f16, self.n, i, j, &[v], dst) };
                }
            }
        }
    }
}

impl Epilogue<'_> {
    /// Columns `j..j + L` of row `i` of an output `n` wide, stored at `dst` as bf16 or (`f16`)
    /// f16.
    ///
    /// # Safety
    /// `dst` holds `L` elements no other thread accesses during the call.
    #[inline(always)]
    unsafe fn store<const L: usize>(
        &self,
        f16: bool,
        n: usize,
        i: usize,
        j: usize,
        vals: &[f32; L],
        dst: *mut u16,
    ) {
        if f16 {
            let v = self.finish::<L, true>(n, i, j, vals);
            // SAFETY: the caller's contract.
            let out =
                unsafe { std::slice::from_raw_parts_mut(dst.cast::<MaybeUninit<half::f16>>(), L) };
            super::fp16::round_into_uninit(&v, out);
        } else {
            let v = self.finish::<L, false>(n, i, j, vals);
            // SAFETY: the caller's contract.
            let out = unsafe { std::slice::from_raw_parts_mut(dst.cast::<MaybeUninit<bf16>>(), L) };
            for c in 0..L {
                out[c].write(round_bf16(v[c]));
            }
        }
    }

    /// Columns `j..j + L` of row `i` of an output `n` wide, in f32 before the final rounding:
    /// the base output rounded to bf16 (or `F16`), the terms added, the scale applied.
    #[inline(always)]
    fn finish<const L: usize, const F16: bool>(
        &self,
        n: usize,
        i: usize,
        j: usize,
        vals: &[f32; L],
    ) -> [f32; L] {
        let Self {
            bias,
            addend,
            scale,
        } = *self;
        let mut v = *vals;
        if let Some(b) = bias {
            let b = &b[j..][..L];
            for c in 0..L {
                v[c] += b[c];
            }
        }
        if F16 {
            super::fp16::round_in_place(&mut v);
        } else {
            v.iter_mut().for_each(|v| *v = widen(round_bf16(*v)));
        }
        match addend {
            Addend::None => {}
            Addend::Dense(a) => {
                let a = &a[i * n + j..][..L];
                for c in 0..L {
                    v[c] += a[c];
                }
            }
            Addend::LowRank(terms) => {
                for t in terms {
                    for (q, &hq) in t.h[i * t.rank..(i + 1) * t.rank].iter().enumerate() {
                        let bt = &t.bt[q * t.ldbt + j..][..L];
                        for c in 0..L {
                            v[c] += hq * bt[c];
                        }
                    }
                }
            }
        }
        if let Some(s) = scale {
            for c in 0..L {
                v[c] *= s[j + c];
            }
        }
        v
    }
}

/// bf16 → f32, exact (bf16 is the top half of an f32), without a NaN branch.
#[inline(always)]
pub(crate) fn widen(v: bf16) -> f32 {
    f32::from_bits(u32::from(v.to_bits()) << 16)
}

/// Round-to-nearest-even f32 → bf16, bit-identical to `bf16::from_f32` but
/// branch-free so that row loops vectorize.
#[inline(always)]
pub(crate) fn round_bf16(v: f32) -> bf16 {
    let x = v.to_bits();
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let quiet_nan = (x >> 16) | 0x40;
    let is_nan = x & 0x7fff_ffff > 0x7f80_0000;
    bf16::from_bits(if is_nan { quiet_nan } else { rounded } as u16)
}

/// `dst[i] = widen(src[i])` over the shorter of the two, vectorised for the widest unit the CPU
/// has (checked at run time): the portable build's SSE2 loop runs several times slower.
pub(crate) fn widen_into(src: &[bf16], dst: &mut [f32]) {
    #[inline(always)]
    fn run(src: &[bf16], dst: &mut [f32]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = widen(*s));
    }
    with_simd!((src: &[bf16], dst: &mut [f32]) => run(src, dst))
}

/// `dst[i] = round_bf16(src[i])` over the shorter of the two, vectorised as [`widen_into`].
pub(crate) fn round_into(src: &[f32], dst: &mut [bf16]) {
    // SAFETY: `MaybeUninit<bf16>` has bf16's layout, and only initialized
    // values are written through the view.
    let dst = unsafe { &mut *(std::ptr::from_mut(dst) as *mut [MaybeUninit<bf16>]) };
    round_into_uninit(src, dst);
}

/// [`round_into`] into memory not yet initialized (a new output need not be
/// zeroed first).
pub(crate) fn round_into_uninit(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    #[inline(always)]
    fn run(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| {
            d.write(round_bf16(*s));
        });
    }
    with_simd!((src: &[f32], dst: &mut [MaybeUninit<bf16>]) => run(src, dst))
}

/// The widest vector unit the element loops may use (`Avx2` includes FMA, which the AVX2
/// copies of some loops enable).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) enum Simd {
    Avx512,
    Avx2,
    Baseline,
}

#[cfg(target_arch = "x86_64")]
impl Simd {
    pub(crate) fn detect() -> Self {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            Self::Avx512
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Self::Avx2
        } else {
            Self::Baseline
        }
    }
}

/// Below this many multiply-adds a product runs on the calling thread alone:
/// waking pool threads costs more than they would save.
const SERIAL_MACS: usize = 1 << 21;

/// Threads worth using for problem `p`.
fn threads_for(p: &Problem<'_>) -> usize {
    if p.m * p.n * p.k < SERIAL_MACS {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// Runs `task(0..tasks)` on the calling thread plus up to `threads - 1`
/// helpers from rayon's pool, each taking the next index until none are left.
///
/// The caller starts on the work at once instead of waiting for pool threads
/// to wake up, and dynamic claiming bounds the imbalance to one task, which
/// keeps short products fast on a busy machine.
fn parallel_for(tasks: usize, threads: usize, task: impl Fn(usize) + Sync) {
    let next = AtomicUsize::new(0);
    let work = || {
        loop {
            let t = next.fetch_add(1, Ordering::Relaxed);
            if t >= tasks {
                break;
            }
            task(t);
        }
    };
    let helpers = threads.min(tasks).saturating_sub(1);
    if helpers == 0 {
        return work();
    }
    rayon::in_place_scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| work());
        }
        work();
    });
}

/// Splits `0..len` into `parts` nearly equal ranges whose lengths are
/// multiples of `unit` (except the last), returning the range length.
fn chunk_len(len: usize, parts: usize, unit: usize) -> usize {
    len.div_ceil(parts.max(1)).next_multiple_of(unit).max(unit)
}
