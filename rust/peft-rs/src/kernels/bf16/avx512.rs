//! AVX-512 BF16 kernels built on `vdpbf16ps`, which multiplies bf16 pairs
//! along k and accumulates each pair's sum into an f32 lane.
//!
//! Three schemes, chosen by the shape:
//! * few rows (decode-like, memory-bound): dot-product tiles that read `x`
//!   and `w` rows directly, streaming `w` once with no packing;
//! * more rows, but no more than `w` has (prompts, batches): `x` is packed
//!   into 64-row panels of k-pairs, and a 6 × 64 outer-product microkernel
//!   broadcasts pairs of `w`, read where they are, against them; packing the
//!   smaller operand costs a fraction of packing `w` on every call;
//! * more rows than `w` has: each task packs its column block of `w` the
//!   same way, and the microkernel broadcasts pairs of `x` against it.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::ops::Range;

use super::{Problem, Sink, chunk_len, parallel_for, threads_for};

/// Rows of `x` per outer-product microkernel tile.
const MR: usize = 6;
/// Columns per packed panel of `w` (four 16-lane vectors).
const NR: usize = 64;
/// k per cache block (even, so blocks start on a pair): a 64-column panel
/// of it is 32 KiB and stays in L1 while the rows of `x` stream past.
const KC: usize = 256;
/// Rows of `x` per cache block (its `MC × KC` slice stays in L2).
const MC: usize = 192;
/// Columns per task at most (its packed slab of `w`, `NC × k`, lives in L3).
const NC: usize = 512;
/// Bound on a task's packed slab of `w`, which narrows `NC` for large k.
const PACK_BYTES: usize = 4 << 20;
/// Below this many rows the dot-product scheme is used.
pub(super) const DOT_MAX_M: usize = 16;
/// Rows of `x` per dot-product tile.
const DMR: usize = 4;
/// Rows of `w` (output columns) per dot-product tile.
const DNR: usize = 6;
/// k per chunk of the dot-product scheme: `DNR` rows of it fill 12 KiB of L1.
const KD: usize = 1024;
/// How far ahead (in elements) rows of `w` are prefetched while streamed.
const PREFETCH: usize = 1024;

/// Computes the product of `p` into `sink`.
///
/// # Safety
/// The CPU must support avx512f, avx512bw, avx512vl and avx512bf16.
pub(crate) unsafe fn matmul(p: &Problem<'_>, sink: &Sink<'_>) {
    let threads = threads_for(p);
    if p.m < DOT_MAX_M {
        let cols = chunk_len(p.n, 4 * threads, DNR);
        parallel_for(p.n.div_ceil(cols), threads, |t| {
            let cols = t * cols..p.n.min((t + 1) * cols);
            // SAFETY: features are present (caller); tasks own disjoint columns.
            unsafe { dot_block(p, sink, cols) }
        });
    } else if p.m <= p.n && 4 * p.m >= 3 * p.m.next_multiple_of(XR) {
        // Packing x costs less than packing w, once the zero rows padding
        // its last panel waste at most a quarter of the work.
        // SAFETY: features are present (caller).
        unsafe { x_packed(p, sink, threads) };
    } else {
        // Each task packs its column block of `w` once over all of k, so
        // split rows only as far as needed to occupy every thread.
        let max_nc = (PACK_BYTES / (2 * p.k)).clamp(NR, NC);
        let nc = chunk_len(p.n, p.n.div_ceil(max_nc).max(4 * threads), NR);
        let nb = p.n.div_ceil(nc);
        let rc = chunk_len(p.m, (4 * threads).div_ceil(nb), MR);
        let rb = p.m.div_ceil(rc);
        parallel_for(rb * nb, threads, |t| {
            let (bi, bj) = (t / nb, t % nb);
            let rows = bi * rc..p.m.min((bi + 1) * rc);
            let cols = bj * nc..p.n.min((bj + 1) * nc);
            SCRATCH.with_borrow_mut(|s| {
                // SAFETY: features are present (caller); tasks own disjoint tiles.
                unsafe { packed_block(p, sink, rows, cols, s) }
            });
        });
    }
}

/// Reinterprets 32 bf16 bit patterns as the `vdpbf16ps` operand type.
#[inline(always)]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both are plain 512-bit vectors; every bit pattern is valid.
    unsafe { std::mem::transmute(v) }
}

/// Mask selecting the first `len` of 32 lanes.
#[inline(always)]
pub(super) fn mask32(len: usize) -> u32 {
    if len >= 32 { u32::MAX } else { (1 << len) - 1 }
}

/// Mask selecting the first `len` of 16 lanes.
#[inline(always)]
fn mask16(len: usize) -> u16 {
    if len >= 16 { u16::MAX } else { (1 << len) - 1 }
}

// ---------------------------------------------------------------------------
// Dot-product scheme (few rows).

/// All rows of `x` against the `w` rows (output columns) in `cols`.
///
/// For each group of `DNR` rows of `w`, k is walked in `KD` chunks so the
/// chunk of `w` stays in L1 while every group of `DMR` rows of `x` passes
/// over it; the accumulators of all rows wait in a stack array between
/// chunks.
///
/// # Safety
/// CPU features as for [`matmul`]; `p.m < DOT_MAX_M`; `cols` lies in `0..n`
/// and no other thread writes those output columns.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn dot_block(p: &Problem<'_>, sink: &Sink<'_>, cols: Range<usize>) {
    let x = p.x.as_ptr().cast::<u16>();
    let w = p.w.as_ptr().cast::<u16>();
    let mut acc = [[_mm512_setzero_ps(); DNR]; DOT_MAX_M];
    for j in cols.clone().step_by(DNR) {
        let width = DNR.min(cols.end - j);
        // Past the last column, repeat the last row; those sums are dropped.
        let mut wr = [w; DNR];
        for (c, r) in wr.iter_mut().enumerate() {
            // SAFETY: row j + min(c, width - 1) < n exists in `w`.
            *r = unsafe { w.add((j + c.min(width - 1)) * p.ldw) };
        }
        acc[..p.m].fill([_mm512_setzero_ps(); DNR]);
        for k0 in (0..p.k).step_by(KD) {
            let ks = k0..p.k.min(k0 + KD);
            for i in (0..p.m).step_by(DMR) {
                // SAFETY: rows i.. < m of `x` and the rows `wr` hold k
                // elements.
                unsafe {
                    let x = x.add(i * p.lda);
                    let (acc, ks, pf) = (&mut acc[i..], ks.clone(), i == 0);
                    match DMR.min(p.m - i) {
                        1 => dot_chunk::<1>(acc, x, p.lda, &wr, ks, pf),
                        2 => dot_chunk::<2>(acc, x, p.lda, &wr, ks, pf),
                        3 => dot_chunk::<3>(acc, x, p.lda, &wr, ks, pf),
                        _ => dot_chunk::<4>(acc, x, p.lda, &wr, ks, pf),
                    }
                }
            }
        }
        for (i, acc_i) in acc[..p.m].iter().enumerate() {
            let mut sums = [0.0; DNR];
            for (s, &a) in sums.iter_mut().zip(acc_i) {
                *s = _mm512_reduce_add_ps(a);
            }
            // SAFETY: row i < m and columns j..j + width are ours.
            unsafe { sink.put_row(i, j, &sums[..width]) };
        }
    }
}

/// Adds the products of `R` rows of `x` with the rows `w`, over the k range
/// `ks`, into `acc[..R]`, which holds a 16-lane vector of partial sums per
/// (row of `x`, row of `w`).
/// The first row group of a chunk also prefetches `w` ahead, since it is
/// the one that pulls it from memory.
///
/// # Safety
/// CPU features as for [`matmul`]; `acc` has at least `R` rows; `R` rows of
/// `x` (stride `lda`) and all rows `w` have at least `ks.end` elements.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn dot_chunk<const R: usize>(
    acc: &mut [[__m512; DNR]],
    x: *const u16,
    lda: usize,
    w: &[*const u16; DNR],
    ks: Range<usize>,
    prefetch: bool,
) {
    let mut a: [[__m512; DNR]; R] = *acc.first_chunk().expect("R accumulator rows");
    let full = ks.start + (ks.len() / 32) * 32;
    for kk in (ks.start..full).step_by(32) {
        // SAFETY: 32 elements from kk fit inside `ks.end` of every row.
        unsafe { dot_step(&mut a, x, lda, w, kk, u32::MAX, prefetch) };
    }
    if full < ks.end {
        // SAFETY: the mask stops the loads at `ks.end`.
        unsafe { dot_step(&mut a, x, lda, w, full, mask32(ks.end - full), false) };
    }
    *acc.first_chunk_mut().expect("R accumulator rows") = a;
}

/// One 32-element step of [`dot_chunk`]; lanes outside `mask` read as zero.
///
/// # Safety
/// As for [`dot_chunk`], with the elements `kk..` selected by `mask` in
/// bounds.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
#[inline]
unsafe fn dot_step<const R: usize>(
    a: &mut [[__m512; DNR]; R],
    x: *const u16,
    lda: usize,
    w: &[*const u16; DNR],
    kk: usize,
    mask: u32,
    prefetch: bool,
) {
    // SAFETY: per the contract; prefetches are hints and never fault.
    unsafe {
        let mut wv = [bh(_mm512_setzero_si512()); DNR];
        for (v, &r) in wv.iter_mut().zip(w) {
            *v = bh(_mm512_maskz_loadu_epi16(mask, r.add(kk).cast()));
            if prefetch {
                _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(kk + PREFETCH).cast());
            }
        }
        for (ri, a_r) in a.iter_mut().enumerate() {
            let xv = bh(_mm512_maskz_loadu_epi16(mask, x.add(ri * lda + kk).cast()));
            for (a, &v) in a_r.iter_mut().zip(&wv) {
                *a = _mm512_dpbf16_ps(*a, xv, v);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Packed outer-product scheme (many rows).

/// A 64-byte aligned block of 16 words, the unit of the scratch buffers.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Line([u32; 16]);

/// Per-thread buffers reused across calls: packed `w` and, in bf16 mode, the
/// f32 accumulator tile.
#[derive(Default)]
pub(super) struct Scratch {
    pub(super) b: Vec<Line>,
    pub(super) c: Vec<Line>,
}

thread_local! {
    pub(super) static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Grows `buf` to at least `words` 32-bit words and returns its start.
pub(super) fn words(buf: &mut Vec<Line>, words: usize) -> *mut u32 {
    let lines = words.div_ceil(16);
    if buf.len() < lines {
        buf.resize(lines, Line([0; 16]));
    }
    buf.as_mut_ptr().cast()
}

/// Output rows `rows` × columns `cols` over all of k: packs those rows of
/// `w` once, then runs cache blocks of `MC` rows × `KC` k over them.
///
/// # Safety
/// CPU features as for [`matmul`]; `rows` and `cols` lie inside the output
/// and no other thread writes that tile.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn packed_block(
    p: &Problem<'_>,
    sink: &Sink<'_>,
    rows: Range<usize>,
    cols: Range<usize>,
    s: &mut Scratch,
) {
    let n_len = cols.len();
    let panels = n_len.div_ceil(NR);
    let kp = p.k.div_ceil(2);
    let b = words(&mut s.b, panels * kp * NR);
    // SAFETY: rows `cols` of `w` have k elements; `b` holds
    // `panels * kp * NR` words and is 64-byte aligned.
    unsafe {
        pack_b(
            p.w.as_ptr().cast::<u16>().add(cols.start * p.ldw),
            p.ldw,
            n_len,
            p.k,
            b,
        )
    };
    let x = p.x.as_ptr().cast::<u16>();
    for ic in rows.clone().step_by(MC) {
        let m_len = MC.min(rows.end - ic);
        // In f32 mode accumulate straight into the output, else into scratch.
        let (c, ldc, add_first) = match sink.f32_out() {
            // SAFETY: the block's first element is inside the m × n output.
            Some((y, acc)) => (unsafe { y.add(ic * p.n + cols.start) }, p.n, acc),
            None => (words(&mut s.c, m_len * n_len).cast::<f32>(), n_len, false),
        };
        for pc in (0..p.k).step_by(KC) {
            let kc = KC.min(p.k - pc);
            for q in 0..panels {
                for i in (0..m_len).step_by(MR) {
                    // SAFETY: row ic + i < m of `x` has k ≥ pc + kc elements;
                    // pairs pc/2.. of panel q are inside `b`; the C tile is
                    // inside the output (or scratch) and ours.
                    unsafe {
                        let t = Tile {
                            a: x.add((ic + i) * p.lda + pc),
                            lda: p.lda,
                            b: b.add((q * kp + pc / 2) * NR),
                            kc,
                            c: c.add(i * ldc + q * NR),
                            ldc,
                            width: NR.min(n_len - q * NR),
                            add: add_first || pc > 0,
                        };
                        match MR.min(m_len - i) {
                            1 => t.run::<1>(),
                            2 => t.run::<2>(),
                            3 => t.run::<3>(),
                            4 => t.run::<4>(),
                            5 => t.run::<5>(),
                            _ => t.run::<6>(),
                        }
                    }
                }
            }
        }
        if sink.f32_out().is_none() {
            for r in 0..m_len {
                // SAFETY: scratch row r holds n_len finished sums; the output
                // tile is ours.
                unsafe {
                    let vals = std::slice::from_raw_parts(c.add(r * ldc), n_len);
                    sink.put_row(ic + r, cols.start, vals);
                }
            }
        }
    }
}

/// Rows of `x` per packed panel when `x` is the packed operand.
pub(super) const XR: usize = 64;
/// Rows of `w` (output columns) per microkernel tile when `x` is packed.
const WR: usize = 6;

/// The product with `x` packed (once, shared by every task) and `w` read in
/// place: tasks own column blocks and keep their sums transposed (a column of
/// the block per scratch row) until they hand them to the sink, 16 × 16 at a
/// time.
///
/// # Safety
/// CPU features as for [`matmul`].
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn x_packed(p: &Problem<'_>, sink: &Sink<'_>, threads: usize) {
    // SAFETY: features are present (caller).
    let mut packed = unsafe { pack_x(p, threads) };
    let xp = SharedMut(packed.as_mut_ptr().cast::<u32>());
    let nc = chunk_len(p.n, 4 * threads, 16);
    parallel_for(p.n.div_ceil(nc), threads, |t| {
        let cols = t * nc..p.n.min((t + 1) * nc);
        SCRATCH.with_borrow_mut(|s| {
            // SAFETY: features are present (caller); tasks own disjoint
            // column blocks.
            unsafe { x_packed_block(p, sink, cols, xp.at(0), s) }
        });
    });
}

/// `x` packed by [`pack_b`] into `m.div_ceil(64)` panels of 64 rows, each
/// `k.div_ceil(2)` pairs long, the panels packed in parallel.
///
/// # Safety
/// CPU features as for [`matmul`].
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub(super) unsafe fn pack_x(p: &Problem<'_>, threads: usize) -> Vec<Line> {
    let panels = p.m.div_ceil(XR);
    let kp = p.k.div_ceil(2);
    let mut packed = vec![Line([0; 16]); panels * kp * XR / 16];
    let dst = SharedMut(packed.as_mut_ptr().cast::<u32>());
    parallel_for(panels, threads, |q| {
        let rows = XR.min(p.m - q * XR);
        let x = p.x[q * XR * p.lda..].as_ptr().cast::<u16>();
        // SAFETY: features are present (caller); rows 64q.. of `x` have k
        // elements; panel q's words lie inside `packed`, written by this
        // task alone.
        unsafe { pack_b(x, p.lda, rows, p.k, dst.at(q * kp * XR)) };
    });
    packed
}

/// A raw output pointer shared by tasks that write disjoint parts.
#[derive(Clone, Copy)]
pub(super) struct SharedMut(pub(super) *mut u32);
// SAFETY: only used for writes to disjoint ranges, inside one parallel call.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// # Safety
    /// `at` is inside the buffer.
    pub(super) unsafe fn at(self, at: usize) -> *mut u32 {
        // SAFETY: per the contract.
        unsafe { self.0.add(at) }
    }
}

/// All rows of the output in columns `cols`, from packed `x` (`xp`).
///
/// # Safety
/// CPU features as for [`matmul`]; `xp` holds `x` packed by [`pack_b`] into
/// `m.div_ceil(64)` panels; `cols` lies inside the output and no other
/// thread writes those columns.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn x_packed_block(
    p: &Problem<'_>,
    sink: &Sink<'_>,
    cols: Range<usize>,
    xp: *const u32,
    s: &mut Scratch,
) {
    let panels = p.m.div_ceil(XR);
    let (kp, m_pad) = (p.k.div_ceil(2), panels * XR);
    // Sums, transposed: column c of the block at row c of `ct` (m_pad wide),
    // rounded up to whole 16 × 16 blocks.
    let n_pad = cols.len().next_multiple_of(16);
    let ct = words(&mut s.c, n_pad * m_pad).cast::<f32>();
    let w = p.w.as_ptr().cast::<u16>();
    for pc in (0..p.k).step_by(KC) {
        let kc = KC.min(p.k - pc);
        for g in (0..cols.len()).step_by(WR) {
            let width = WR.min(cols.len() - g);
            let mut wr = [w; WR];
            for (c, r) in wr.iter_mut().enumerate() {
                // Past the block's last column, repeat it; those sums are
                // not stored. SAFETY: the row exists in `w`.
                *r = unsafe { w.add((cols.start + g + c.min(width - 1)) * p.ldw + pc) };
            }
            for q in 0..panels {
                // SAFETY: pairs pc/2.. of panel q are inside `xp`; rows
                // g..g + width of `ct` are inside the scratch and ours.
                unsafe {
                    let t = WTile {
                        w: wr,
                        b: xp.add((q * kp + pc / 2) * XR),
                        kc,
                        c: ct.add(g * m_pad + q * XR),
                        ldc: m_pad,
                        width,
                        add: pc > 0,
                    };
                    t.run();
                }
            }
        }
    }
    // SAFETY: `ct` holds the block's sums for rows 0..m (m_pad wide).
    unsafe { store_transposed(sink, ct, m_pad, 0..p.m, cols, &mut s.b) };
}

/// Hands the output rows `rows` × columns `cols` to the sink from their sums
/// kept transposed in `ct`: column `c` of the block at row `c`, output row
/// `rows.start + i` at float `i`, rows `ldc` floats apart.
///
/// # Safety
/// CPU features as for [`matmul`]; `ct` is 64-byte aligned, `ldc` and
/// `rows.start` are multiples of 16, and `ct` has `cols.len()` rounded up
/// to 16 rows of `rows.len()` rounded up to 16 readable floats, outside
/// `buf`; no other thread writes these output elements.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
pub(super) unsafe fn store_transposed(
    sink: &Sink<'_>,
    ct: *const f32,
    ldc: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    buf: &mut Vec<Line>,
) {
    // 16 × 16 transposes into a buffer of 16 output rows.
    let n_pad = cols.len().next_multiple_of(16);
    let row_buf = words(buf, 16 * n_pad).cast::<f32>();
    for i0 in (0..rows.len()).step_by(16) {
        for c0 in (0..n_pad).step_by(16) {
            let mut v = [_mm512_setzero_si512(); 16];
            for (c, v) in v.iter_mut().enumerate() {
                // SAFETY: row c0 + c < n_pad of `ct` has ≥ i0 + 16 floats,
                // 64-byte aligned (ldc and i0 are multiples of 16).
                *v = unsafe { _mm512_load_si512(ct.add((c0 + c) * ldc + i0).cast()) };
            }
            transpose16(&mut v);
            for (r, v) in v.into_iter().enumerate() {
                // SAFETY: row r < 16 of the buffer has n_pad floats.
                unsafe { _mm512_storeu_si512(row_buf.add(r * n_pad + c0).cast(), v) };
            }
        }
        for r in 0..16.min(rows.len() - i0) {
            // SAFETY: the buffer row holds cols.len() finished sums; row
            // rows.start + i0 + r is inside the output and columns `cols`
            // are ours.
            unsafe {
                let vals = std::slice::from_raw_parts(row_buf.add(r * n_pad), cols.len());
                sink.put_row(rows.start + i0 + r, cols.start, vals);
            }
        }
    }
}

/// Operands of one microkernel call with `x` packed: `WR` rows of `w`
/// (broadcast pair by pair) against one 64-row panel of `x`, over one k block.
struct WTile {
    w: [*const u16; WR],
    b: *const u32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    width: usize,
    add: bool,
}

impl WTile {
    /// `Cᵀ[0..width, 0..64] (+)= W[0..width, 0..kc] · panelᵀ`, accumulators
    /// in registers.
    ///
    /// # Safety
    /// CPU features as for [`matmul`]; every row `w` has `kc` readable
    /// elements; `b` is a 64-byte aligned panel of `kc.div_ceil(2)` pairs;
    /// `c` has `width` rows of 64 writable floats (stride `ldc`), 64-byte
    /// aligned, ours alone.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn run(&self) {
        let mut acc = [[_mm512_setzero_ps(); XR / 16]; WR];
        let pairs = self.kc / 2;
        for t in 0..pairs {
            // SAFETY: pair t ends inside kc; word t·64 starts a panel row.
            unsafe {
                let b = load_panel_row(self.b.add(t * XR));
                for (acc_c, w) in acc.iter_mut().zip(&self.w) {
                    fma_row(acc_c, w.add(2 * t).cast::<i32>().read_unaligned(), &b);
                }
            }
        }
        if self.kc % 2 == 1 {
            // Odd k: the last pair holds one element; its partner is zero.
            // SAFETY: element 2·pairs = kc - 1 is inside each row; pair
            // `pairs` is inside the panel.
            unsafe {
                let b = load_panel_row(self.b.add(pairs * XR));
                for (acc_c, w) in acc.iter_mut().zip(&self.w) {
                    fma_row(acc_c, i32::from(*w.add(2 * pairs)), &b);
                }
            }
        }
        for (c, acc_c) in acc.iter().enumerate().take(self.width) {
            for (j, &v) in acc_c.iter().enumerate() {
                // SAFETY: row c < width of `c`, floats 16j..16j + 16 < 64,
                // aligned.
                unsafe {
                    let dst = self.c.add(c * self.ldc + 16 * j);
                    let v = if self.add {
                        _mm512_add_ps(v, _mm512_load_ps(dst))
                    } else {
                        v
                    };
                    _mm512_store_ps(dst, v);
                }
            }
        }
    }
}

/// Packs `rows` rows of `w` (`kc` elements each) into 64-column panels:
/// panel q, pair t holds `w[64q + c][2t..2t + 2]` at word `(q·kp + t)·64 + c`,
/// zero-filled past `rows` and past `kc`.
///
/// # Safety
/// CPU features as for [`matmul`]; each of the `rows` rows (stride `ldw`)
/// has `kc` readable elements; `dst` is 64-byte aligned with room for
/// `rows.div_ceil(64) · kc.div_ceil(2) · 64` words.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn pack_b(w: *const u16, ldw: usize, rows: usize, kc: usize, dst: *mut u32) {
    let kp = kc.div_ceil(2);
    for q in 0..rows.div_ceil(NR) {
        for g in 0..NR / 16 {
            let r0 = q * NR + g * 16;
            for t0 in (0..kp).step_by(16) {
                let mask = mask32(kc - 2 * t0);
                // Fixed trip counts keep the 16 vectors in registers.
                let mut v = [_mm512_setzero_si512(); 16];
                for (t, v) in v.iter_mut().enumerate() {
                    let r = r0 + t;
                    if r < rows {
                        // SAFETY: row r < rows; the mask stops at kc
                        // elements; the prefetch is a hint and never faults.
                        unsafe {
                            let src = w.add(r * ldw + 2 * t0);
                            *v = _mm512_maskz_loadu_epi16(mask, src.cast());
                            _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(PREFETCH).cast());
                        }
                    }
                }
                transpose16(&mut v);
                for (t, v) in v.into_iter().enumerate() {
                    if t0 + t < kp {
                        // SAFETY: word (q·kp + t0 + t)·64 + 16g is 64-byte
                        // aligned and its 16 words are inside `dst`.
                        unsafe {
                            let at = dst.add((q * kp + t0 + t) * NR + g * 16);
                            _mm512_store_si512(at.cast(), v);
                        }
                    }
                }
            }
        }
    }
}

/// Transposes a 16 × 16 matrix of 32-bit words held as 16 row vectors.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn transpose16(r: &mut [__m512i; 16]) {
    // Interleave words, then word pairs: u[4s + c] holds, in 128-bit lane
    // l, word 4l + c of rows 4s..4s + 4.
    let mut u = [_mm512_setzero_si512(); 16];
    for s in 0..4 {
        let [a, b, c, d] = [r[4 * s], r[4 * s + 1], r[4 * s + 2], r[4 * s + 3]];
        let (ab_lo, ab_hi) = (_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let (cd_lo, cd_hi) = (_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
        u[4 * s] = _mm512_unpacklo_epi64(ab_lo, cd_lo);
        u[4 * s + 1] = _mm512_unpackhi_epi64(ab_lo, cd_lo);
        u[4 * s + 2] = _mm512_unpacklo_epi64(ab_hi, cd_hi);
        u[4 * s + 3] = _mm512_unpackhi_epi64(ab_hi, cd_hi);
    }
    // Gather 128-bit lanes: first lanes {0, 2} / {1, 3} of row groups
    // (0, 1) and (2, 3), then across the halves.
    for c in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_i32x4::<0xdd>(u[c], u[4 + c]);
        let v2 = _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c]);
        let v3 = _mm512_shuffle_i32x4::<0xdd>(u[8 + c], u[12 + c]);
        r[c] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
        r[c + 8] = _mm512_shuffle_i32x4::<0xdd>(v0, v2);
        r[c + 4] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
        r[c + 12] = _mm512_shuffle_i32x4::<0xdd>(v1, v3);
    }
}

/// Operands of one microkernel call: up to `MR` rows of `x` against one
/// packed panel, over one k block.
struct Tile {
    a: *const u16,
    lda: usize,
    b: *const u32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    width: usize,
    add: bool,
}

impl Tile {
    /// `C[0..R, 0..width] (+)= A[0..R, 0..kc] · panel`, accumulators in
    /// registers, broadcasting one k-pair of `x` per row per step.
    ///
    /// # Safety
    /// CPU features as for [`matmul`]; `R` rows of `a` have `kc` readable
    /// elements; `b` is a 64-byte aligned panel of `kc.div_ceil(2)` pairs;
    /// `c` has `R` rows of `width` writable floats, ours alone.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn run<const R: usize>(&self) {
        let mut acc = [[_mm512_setzero_ps(); NR / 16]; R];
        let pairs = self.kc / 2;
        for t in 0..pairs {
            // SAFETY: pair t ends inside kc; word t·64 starts a panel row.
            unsafe {
                let b = load_panel_row(self.b.add(t * NR));
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let a = self
                        .a
                        .add(i * self.lda + 2 * t)
                        .cast::<i32>()
                        .read_unaligned();
                    fma_row(acc_i, a, &b);
                }
            }
        }
        if self.kc % 2 == 1 {
            // Odd k: the last pair holds one element; its partner is zero.
            // SAFETY: element 2·pairs = kc - 1 is inside each row; pair
            // `pairs` is inside the panel.
            unsafe {
                let b = load_panel_row(self.b.add(pairs * NR));
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let a = i32::from(*self.a.add(i * self.lda + 2 * pairs));
                    fma_row(acc_i, a, &b);
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            for (j, &v) in acc_i.iter().enumerate() {
                let mask = mask16(self.width.saturating_sub(16 * j));
                if mask == 0 {
                    break;
                }
                // SAFETY: the mask limits the access to row i's `width`
                // columns, which are ours.
                unsafe {
                    let dst = self.c.add(i * self.ldc + 16 * j);
                    let v = if self.add {
                        _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst))
                    } else {
                        v
                    };
                    _mm512_mask_storeu_ps(dst, mask, v);
                }
            }
        }
    }
}

/// Loads the four vectors of one pair row of a packed panel.
///
/// # Safety
/// `b` is 64-byte aligned with 64 readable words.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
#[inline]
unsafe fn load_panel_row(b: *const u32) -> [__m512bh; NR / 16] {
    let mut v = [bh(_mm512_setzero_si512()); NR / 16];
    for (j, v) in v.iter_mut().enumerate() {
        // SAFETY: aligned and in bounds per the contract.
        *v = bh(unsafe { _mm512_load_si512(b.add(16 * j).cast()) });
    }
    v
}

/// `acc[j] += pair(a) · b[j]` for one row's accumulators, where `a` holds
/// one k-pair of `x` broadcast to every lane.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
#[inline]
fn fma_row(acc: &mut [__m512; NR / 16], a: i32, b: &[__m512bh; NR / 16]) {
    let a = bh(_mm512_set1_epi32(a));
    for (acc, &b) in acc.iter_mut().zip(b) {
        *acc = _mm512_dpbf16_ps(*acc, a, b);
    }
}
