//! Intel AMX kernel built on `tdpbf16ps`, which multiplies a tile of 16 rows
//! × 32 bf16 by one of 16 k-pairs × 16 columns and adds the 16 × 16 f32 sums
//! to a third tile: 16 times the work of a `vdpbf16ps` per instruction.
//!
//! Measured on a Xeon with AMX: a tile load whose rows straddle cache lines
//! takes ~17 ns, an aligned one ~2.6 ns, against ~5.5 ns per `tdpbf16ps`.
//! So both operands are normally copied into 1 KiB tiles (`x` as it is, `w`
//! transposed into k-pairs), aligned and contiguous, and the sums come out
//! row-major. For few rows of `x` and an aligned `w`, the copy of `w` does
//! not pay: then `w`'s rows are loaded where they lie, `x` is packed into the
//! AVX-512 scheme's panels, and the sums come out transposed. Rust has no
//! stable AMX intrinsics, so the instructions are written as inline assembly;
//! no compiled code uses the tile registers, so nothing else can clobber them.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::Cell;
use std::ops::Range;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::avx512::{self, DOT_MAX_M, Line, SCRATCH, SharedMut, XR, mask32, transpose16, words};
use super::{Problem, Sink, chunk_len, parallel_for, threads_for};
use half::bf16;

/// Rows (of a tile of `x`) or columns (of a tile of `w`) per tile.
const TILE: usize = 16;
/// k per tile: 16 rows of 64 bytes.
const TK: usize = 32;
/// 32-bit words per tile (1 KiB).
const TILE_WORDS: usize = 256;
/// Rows and columns of one 2 × 2 tile product.
const BLOCK: usize = 2 * TILE;
/// Rows and at most columns per task: its sums (256 KiB) stay in L2.
const TASK_ROWS: usize = 256;
const TASK_COLS: usize = 256;
/// k per cache block: the 32 columns of `w` a product reads (`KC / 16` KiB)
/// stay in L1 while the task's rows pass over them (loaded with the
/// streaming hint, see [`Operand::streamed`]). Measured: the sums' store and
/// reload after each k block cost ~40% of the tile products at 256, and
/// 512 is the most `w` that stays in L1 beside the passing rows.
const KC: usize = 512;
/// k per cache block of the scheme that reads `w` in place.
const KC_IN_PLACE: usize = 1024;
/// Rows of `x` from which `w` is copied into tiles even when aligned.
const IN_PLACE_MAX_M: usize = 512;

thread_local! {
    /// The packed operands, reused across calls (a fresh multi-MiB buffer
    /// per call is page faults and zeroing); taken out during one, so a
    /// nested call on this thread allocates its own. It keeps the size of
    /// the largest call's `x` plus `w` in bf16 (4096² at 4096 rows: 64 MiB).
    static PACKED: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
}

/// Whether this CPU has AMX-BF16 and the kernel lets this process use the
/// tile registers (Linux hands them out on request, once per process).
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        let has_amx = edx & (1 << 22) != 0 && edx & (1 << 24) != 0;
        has_amx && super::has_bf16_dot() && request_tile_data()
    })
}

/// Asks Linux for the AMX tile data state (`ARCH_REQ_XCOMP_PERM`, state
/// component 18); without it the first tile instruction faults.
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only changes the process's
    // permission for the tile state; it reads and writes no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// Whether the tile kernel takes problem `p`: enough rows to fill a tile.
pub(super) fn fits(p: &Problem<'_>) -> bool {
    p.m >= DOT_MAX_M
}

/// Whether reading `w`'s rows where they lie beats copying them into tiles:
/// only if every tile row is aligned (a misaligned tile load costs ~6× an
/// aligned one) and for fewer than `IN_PLACE_MAX_M` rows of `x`, over which
/// the copy of `w` is not yet paid back. Measured on a Xeon with AMX, 2
/// cores, aligned `w`, in place vs copied: 128 rows 0.25 vs 0.30 ms
/// (1024 × 1024) and 3.1 vs 3.9–4.4 ms (4096 × 4096); 256 rows 0.42 vs 0.43
/// and 5.7–6.2 vs 6.0–7.0; 512 rows 0.85 vs 0.74 and 11.6–12.0 vs 10.9–11.5.
pub(super) fn w_in_place_pays(p: &Problem<'_>) -> bool {
    !p.f16
        && p.m < IN_PLACE_MAX_M
        && p.k.is_multiple_of(TK)
        && p.n.is_multiple_of(TILE)
        && (p.w.as_ptr() as usize).is_multiple_of(64)
        && (2 * p.ldw).is_multiple_of(64)
}

/// Computes the product of `p` into `sink`; `false`, nothing written, where f16 operands hold
/// an infinity (found while packing them): split, `∞ · 0` in a cross product would make it NaN.
///
/// # Safety
/// [`available`] and [`fits`] hold.
pub(super) unsafe fn matmul(p: &Problem<'_>, sink: &Sink<'_>) -> bool {
    if w_in_place_pays(p) {
        // SAFETY: the caller's contract; the shape fits whole tiles.
        unsafe { matmul_w_in_place(p, sink) };
        return true;
    }
    let threads = threads_for(p);
    let kt = k_tiles(p);
    let (m_pad, n_pad) = (p.m.next_multiple_of(BLOCK), p.n.next_multiple_of(BLOCK));
    // Over few rows, f16 strips of `w` are split in each task that uses them (one or two), a
    // k block at a time, and never leave L2; packed up front, the split weight is four times
    // its size, written to memory and read back. Measured on the 2-core Xeon, 4096², split in
    // the tasks vs up front: 64 rows 7.1 vs 17.7 ms, 256 rows 19.6 vs 28.7, 512 rows 39.8 vs
    // 46.7, 1024 rows 74 vs 77, 4096 rows 295 vs 275 (1024²: 512 rows 2.43 vs 2.43).
    let w_in_task = p.f16 && m_pad <= 2 * TASK_ROWS;
    let mut buf = PACKED.take();
    let a_words = m_pad / TILE * kt * TILE_WORDS;
    let b_words = if w_in_task {
        0
    } else {
        n_pad / TILE * kt * TILE_WORDS
    };
    let a = SharedMut(words(&mut buf, a_words + b_words));
    // SAFETY: `a_words` is inside the buffer.
    let b = unsafe { SharedMut(a.at(a_words)) };
    let (a_strips, b_strips) = (m_pad / TILE, if w_in_task { 0 } else { n_pad / TILE });
    let infinite = AtomicBool::new(false);
    parallel_for(a_strips + b_strips, threads, |s| {
        // SAFETY: AMX implies the AVX-512 features; strip s's rows or
        // columns exist up to m or n, and its tiles are written by this task
        // alone.
        unsafe {
            let (x, w) = (p.x.as_ptr().cast::<u16>(), p.w.as_ptr().cast::<u16>());
            if s < a_strips {
                let rows = TILE.min(p.m.saturating_sub(s * TILE));
                let dst = a.at(s * kt * TILE_WORDS);
                let src = x.wrapping_add(s * TILE * p.lda);
                if p.f16 {
                    if pack_strip_split::<false>(src, p.lda, rows, p.k, dst) {
                        infinite.store(true, Ordering::Relaxed);
                    }
                } else {
                    pack_strip::<false>(src, p.lda, rows, p.k, dst);
                }
            } else {
                let s = s - a_strips;
                let cols = TILE.min(p.n.saturating_sub(s * TILE));
                let dst = b.at(s * kt * TILE_WORDS);
                let src = w.wrapping_add(s * TILE * p.ldw);
                if p.f16 {
                    if pack_strip_split::<true>(src, p.ldw, cols, p.k, dst) {
                        infinite.store(true, Ordering::Relaxed);
                    }
                } else {
                    pack_strip::<true>(src, p.ldw, cols, p.k, dst);
                }
            }
        }
    });
    if infinite.into_inner() {
        PACKED.set(buf);
        return false;
    }
    let row_blocks = m_pad.div_ceil(TASK_ROWS);
    let nc = chunk_len(n_pad, (4 * threads).div_ceil(row_blocks), BLOCK).min(TASK_COLS);
    let col_blocks = n_pad.div_ceil(nc);
    parallel_for(row_blocks * col_blocks, threads, |t| {
        let rows = (t / col_blocks) * TASK_ROWS..m_pad.min((t / col_blocks + 1) * TASK_ROWS);
        let cols = (t % col_blocks) * nc..n_pad.min((t % col_blocks + 1) * nc);
        SCRATCH.with_borrow_mut(|s| {
            let w = if w_in_task {
                WTiles::Split(&mut s.b)
            } else {
                // SAFETY: the packed strips of `w` start here.
                WTiles::Packed(unsafe { b.at(0) })
            };
            // SAFETY: the caller's contract; `a` (and `b`) hold the packed
            // operands; tasks own disjoint output blocks.
            unsafe { block(p, sink, rows, cols, a.at(0), w, &mut s.c) }
        });
    });
    PACKED.set(buf);
    true
}

/// Copies one strip of 16 rows (`rows` of them real, the rest zero) of `x`
/// or `w`, all of k, into `k / 32` tiles at `dst`, k padded with zeros. Rows
/// of `x` are stored as they are (tile row i = row i); rows of `w` are
/// transposed into k-pairs (tile row t = pair t of the 16 columns).
///
/// # Safety
/// AVX-512 is available; `rows` rows of `k` elements at `src` (stride `ld`);
/// `dst` is 64-byte aligned with room for `k.div_ceil(32)` tiles.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn pack_strip<const PAIRS: bool>(
    src: *const u16,
    ld: usize,
    rows: usize,
    k: usize,
    dst: *mut u32,
) {
    for t in 0..k.div_ceil(TK) {
        let mask = mask32(k - t * TK);
        // Fixed trip counts keep the 16 vectors in registers.
        let mut v = [_mm512_setzero_si512(); TILE];
        for (i, v) in v.iter_mut().enumerate() {
            if i < rows {
                // SAFETY: row i < rows exists; the mask stops at k.
                *v = unsafe { _mm512_maskz_loadu_epi16(mask, src.add(i * ld + t * TK).cast()) };
            }
        }
        if PAIRS {
            transpose16(&mut v);
        }
        for (i, v) in v.into_iter().enumerate() {
            // SAFETY: tile t's row i is inside `dst`, 64-byte aligned.
            unsafe { _mm512_store_si512(dst.add(t * TILE_WORDS + i * TILE).cast(), v) };
        }
    }
}

/// Tiles along k per packed strip: f16 operands take four per 32 of k ([`pack_strip_split`]).
fn k_tiles(p: &Problem<'_>) -> usize {
    p.k.div_ceil(TK) * if p.f16 { SPLIT_TILES } else { 1 }
}

/// Tiles per 32 of k for f16 operands: each f16 is the sum of two bf16, `hi` (its top eight
/// significant bits) and `lo` (the other three, exact in bf16), so `x·wᵀ` is the sum of the four
/// products `hi·hi + hi·lo + lo·hi + lo·lo`, each multiply exact, all summed in f32 (torch's f16
/// matmul, in another order). The strips hold `x` as `[hi, hi, lo, lo]` and `w` as
/// `[hi, lo, hi, lo]`, so the tile loop is the bf16 one over four times the tiles.
const SPLIT_TILES: usize = 4;

/// [`pack_strip`] for f16 rows (their bits, as `u16`): each tile of 32 along k becomes the
/// four tiles of [`SPLIT_TILES`]. `hi` is cut from the f16 value widened to f32 (its top eight
/// significant bits, all normal in bf16: f16's range is inside bf16's), `lo` the exact rest (zero
/// where `hi` is NaN, which stays NaN). Returns whether a value was infinite: its products with
/// the other operand's `lo` would be `∞ · 0`, so the caller must not use these tiles then.
///
/// # Safety
/// As for [`pack_strip`], with room for `SPLIT_TILES · k.div_ceil(32)` tiles at `dst`.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn pack_strip_split<const PAIRS: bool>(
    src: *const u16,
    ld: usize,
    rows: usize,
    k: usize,
    dst: *mut u32,
) -> bool {
    let (magnitude, infinity) = (_mm512_set1_epi16(0x7fff), _mm512_set1_epi16(0x7c00));
    let mut infinite = 0;
    let top = _mm512_set1_epi32(0xffff_0000_u32 as i32);
    // 16 f16 widened: the top eight significant bits and the exact rest (zero where the value
    // is not finite: a NaN stays NaN in the top part).
    let parts = |h: __m256i| {
        let v = _mm512_cvtph_ps(h);
        let high = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), top));
        let rest = _mm512_sub_ps(v, high);
        let finite = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(rest, rest);
        (high, _mm512_maskz_mov_ps(finite, rest))
    };
    for t in 0..k.div_ceil(TK) {
        let mask = mask32(k - t * TK);
        let mut raw = [_mm512_setzero_si512(); TILE];
        for (i, v) in raw.iter_mut().enumerate().take(rows.min(TILE)) {
            // SAFETY: row i < rows exists; the mask stops at k.
            *v = unsafe { _mm512_maskz_loadu_epi16(mask, src.add(i * ld + t * TK).cast()) };
            infinite |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(*v, magnitude), infinity);
        }
        // The split is per element, so it commutes with the transpose into k-pairs: one
        // transpose of the raw values instead of one per part.
        if PAIRS {
            transpose16(&mut raw);
        }
        let mut hi = [_mm512_setzero_si512(); TILE];
        let mut lo = [_mm512_setzero_si512(); TILE];
        for i in 0..TILE {
            let (h0, l0) = parts(_mm512_castsi512_si256(raw[i]));
            let (h1, l1) = parts(_mm512_extracti64x4_epi64::<1>(raw[i]));
            // Both parts are bf16 values, so the conversion's rounding leaves them exact.
            // SAFETY: both types are 512 bits of lanes, any bit pattern valid.
            unsafe {
                hi[i] = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(h1, h0));
                lo[i] = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(l1, l0));
            }
        }
        // x: [hi, hi, lo, lo]; w: [hi, lo, hi, lo] (see SPLIT_TILES).
        let order = if PAIRS {
            [&hi, &lo, &hi, &lo]
        } else {
            [&hi, &hi, &lo, &lo]
        };
        for (j, tile) in order.into_iter().enumerate() {
            for (i, v) in tile.iter().enumerate() {
                let at = (SPLIT_TILES * t + j) * TILE_WORDS + i * TILE;
                // SAFETY: the tile's row i is inside `dst`, 64-byte aligned.
                unsafe { _mm512_store_si512(dst.add(at).cast(), *v) };
            }
        }
    }
    infinite != 0
}

/// Where [`block`] finds `w`'s tiles.
enum WTiles<'a> {
    /// All strips, packed by [`pack_strip`] or [`pack_strip_split`].
    Packed(*const u32),
    /// f16 `w` read where it lies and split into this buffer a k block at a time.
    Split(&'a mut Vec<Line>),
}

/// Output rows `rows` × columns `cols` (block-aligned, possibly past m and
/// n) from the packed operands: sums kept in `sums` (row-major) through the
/// k blocks, then the real rows and columns handed to the sink. An infinity
/// met while splitting `w` here hands the block to [`exact_sums`].
///
/// # Safety
/// As for [`matmul`]; `a` holds `x` packed by [`pack_strip`] (or split) and
/// `w` is as described; no other thread writes these output elements.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn block(
    p: &Problem<'_>,
    sink: &Sink<'_>,
    rows: Range<usize>,
    cols: Range<usize>,
    a: *const u32,
    mut w: WTiles<'_>,
    sums: &mut Vec<Line>,
) {
    let kt = k_tiles(p);
    let strip = kt * TILE_WORDS;
    let ldc = cols.len();
    let c = words(sums, rows.len() * ldc).cast::<f32>();
    // Split per k block: KC / TK tiles per strip, from KC / TK / SPLIT_TILES chunks of 32 of k.
    let panel_strip = KC / TK * TILE_WORDS;
    let panel = match &mut w {
        WTiles::Split(buf) => words(buf, cols.len() / TILE * panel_strip),
        WTiles::Packed(_) => std::ptr::null_mut(),
    };
    let tiles = Tiles::configure();
    for k0 in (0..kt).step_by(KC / TK) {
        let steps = (KC / TK).min(kt - k0);
        let (b, b_strip) = match w {
            WTiles::Packed(b) => (b.wrapping_add(k0 * TILE_WORDS), strip),
            WTiles::Split(_) => {
                let k_start = k0 / SPLIT_TILES * TK;
                let k_len = (KC / SPLIT_TILES).min(p.k - k_start);
                let mut infinite = false;
                for s in 0..cols.len() / TILE {
                    let col = cols.start + s * TILE;
                    let src =
                        p.w.as_ptr()
                            .cast::<u16>()
                            .wrapping_add(col * p.ldw + k_start);
                    let real = TILE.min(p.n.saturating_sub(col));
                    // SAFETY: `real` columns of `w` from `col`, `k_len` of k from `k_start`;
                    // the panel holds `steps` tiles per strip.
                    infinite |= unsafe {
                        pack_strip_split::<true>(
                            src,
                            p.ldw,
                            real,
                            k_len,
                            panel.add(s * panel_strip),
                        )
                    };
                }
                if infinite {
                    drop(tiles);
                    // SAFETY: as for this function.
                    unsafe { exact_sums(p, sink, rows, cols, c) };
                    return;
                }
                // Strip g / TILE of this task at `(g - cols.start)`: offset by `cols.start`.
                let offset = cols.start / TILE * panel_strip;
                (panel.cast_const().wrapping_sub(offset), panel_strip)
            }
        };
        for g in (0..ldc).step_by(BLOCK) {
            for r in (0..rows.len()).step_by(BLOCK) {
                // SAFETY: the strips of these rows and columns exist up to
                // m_pad and n_pad; the sums block is inside `c`.
                unsafe {
                    tiles.product::<2>(
                        Operand::packed(
                            a.add((rows.start + r) / TILE * strip + k0 * TILE_WORDS),
                            strip,
                            true,
                        ),
                        Operand::packed(
                            b.wrapping_add((cols.start + g) / TILE * b_strip),
                            b_strip,
                            false,
                        ),
                        steps,
                        Sums {
                            c: c.add(r * ldc + g),
                            ldc,
                            add: k0 > 0,
                        },
                    );
                }
            }
        }
    }
    drop(tiles);
    let n_real = cols.len().min(p.n.saturating_sub(cols.start));
    for i in 0..rows.len().min(p.m.saturating_sub(rows.start)) {
        // SAFETY: row i of the sums holds finished sums for `cols`; output
        // row rows.start + i and these columns are ours.
        unsafe {
            let vals = std::slice::from_raw_parts(c.add(i * ldc), n_real);
            sink.put_row(rows.start + i, cols.start, vals);
        }
    }
}

/// The block's f32 sums of the exact f16 products in k order, handed to the
/// sink: for a block whose `w` holds an infinity, which the split would turn
/// into NaN (`∞ · 0`) where torch's product keeps it.
///
/// # Safety
/// As for [`block`], f16 operands; `c` holds `rows.len() × cols.len()` floats.
unsafe fn exact_sums(
    p: &Problem<'_>,
    sink: &Sink<'_>,
    rows: Range<usize>,
    cols: Range<usize>,
    c: *mut f32,
) {
    let f16s = |v: &[bf16], at: usize| -> &[half::f16] {
        // SAFETY: f16 operands travel as bf16 bit patterns of the same size; `at + k` is inside.
        unsafe { std::slice::from_raw_parts(v.as_ptr().add(at).cast(), p.k) }
    };
    let n_real = cols.len().min(p.n.saturating_sub(cols.start));
    // SAFETY: `c` holds a row of the block's sums, this task's alone.
    let vals = unsafe { std::slice::from_raw_parts_mut(c, n_real) };
    for i in rows.start..rows.end.min(p.m) {
        let x = f16s(p.x, i * p.lda);
        for (j, v) in vals.iter_mut().enumerate() {
            let w = f16s(p.w, (cols.start + j) * p.ldw);
            *v = x
                .iter()
                .zip(w)
                .fold(0f32, |s, (a, b)| s + a.to_f32() * b.to_f32());
        }
        // SAFETY: output row i and these columns are this block's.
        unsafe { sink.put_row(i, cols.start, vals) };
    }
}

/// Where one operand's tiles lie: `F` tiles (`next` bytes apart), rows
/// `stride` bytes apart, each followed by its next k tile `step` bytes on.
#[derive(Clone, Copy)]
struct Operand {
    at: *const u8,
    next: usize,
    stride: usize,
    step: usize,
    /// Loaded once per product and not again soon: loaded with
    /// `tileloaddt1`, whose hint keeps these lines from pushing the other
    /// operand's reused tiles out of L1 (measured with `w`'s 32 KiB reused
    /// and `x` streamed from L2: ~8.9 ns per tile product, 11.8 without).
    streamed: bool,
}

impl Operand {
    /// Tiles packed by [`pack_strip`]: 1 KiB each, `strip` words per strip.
    fn packed(at: *const u32, strip: usize, streamed: bool) -> Self {
        Self {
            at: at.cast(),
            next: 4 * strip,
            stride: 64,
            step: 4 * TILE_WORDS,
            streamed,
        }
    }
}

/// Where [`Tiles::product`] leaves its 32 × 32 sums: row-major f32 at `c`,
/// `ldc` floats per row, added to what is there when `add`.
#[derive(Clone, Copy)]
struct Sums {
    c: *mut f32,
    ldc: usize,
    add: bool,
}

/// Loads tile register `$tmm` from `$at` (rows `$stride` bytes apart), with
/// the streaming hint (`tileloaddt1`) when `$streamed`.
macro_rules! tile_load {
    ($streamed:expr, $tmm:literal, $at:expr, $stride:expr) => {
        if $streamed {
            asm!(
                concat!("tileloaddt1 ", $tmm, ", [{at} + {stride}]"),
                at = in(reg) $at,
                stride = in(reg) $stride,
                options(nostack, readonly)
            )
        } else {
            asm!(
                concat!("tileloadd ", $tmm, ", [{at} + {stride}]"),
                at = in(reg) $at,
                stride = in(reg) $stride,
                options(nostack, readonly)
            )
        }
    };
}

/// The tile registers of the calling thread, configured as 16 rows × 64
/// bytes each: tmm0–3 sums, tmm4–5 rows of `x`, tmm6–7 pairs of `w`.
/// Released (back to the initial state, so the OS saves no tile data on a
/// context switch) when dropped.
struct Tiles;

impl Tiles {
    fn configure() -> Self {
        // Palette 1; bytes 16.. hold each tile's row length in bytes (u16),
        // bytes 48.. its row count.
        let mut config = [0u8; 64];
        config[0] = 1;
        for t in 0..8 {
            config[16 + 2 * t] = 64;
            config[48 + t] = 16;
        }
        // SAFETY: AMX is available (callers of `matmul`); the config is a
        // valid palette-1 layout in readable memory.
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.as_ptr(), options(nostack, readonly)) };
        Self
    }

    /// `C (+)= A · B` for `16F` rows (`F` tiles of `a`) × 32 columns (two
    /// tiles of `b`) over `steps` tiles of k, `C` in tile registers.
    ///
    /// # Safety
    /// `steps` tiles at each tile address, and `16F` rows of 32 floats at
    /// `sums.c` (stride `sums.ldc`).
    #[inline(always)]
    unsafe fn product<const F: usize>(&self, a: Operand, b: Operand, steps: usize, sums: Sums) {
        let row = 4 * sums.ldc;
        let c = [sums.c, sums.c.wrapping_add(TILE * sums.ldc)];
        // SAFETY (all blocks): tiles are configured; the loads stay inside
        // the tiles the caller vouches for and the stores inside `sums`.
        unsafe {
            if sums.add {
                asm!(
                    "tileloadd tmm0, [{c0} + {row}]",
                    "tileloadd tmm1, [{c1} + {row}]",
                    c0 = in(reg) c[0],
                    c1 = in(reg) c[0].add(TILE),
                    row = in(reg) row,
                    options(nostack, readonly)
                );
                if F == 2 {
                    asm!(
                        "tileloadd tmm2, [{c0} + {row}]",
                        "tileloadd tmm3, [{c1} + {row}]",
                        c0 = in(reg) c[1],
                        c1 = in(reg) c[1].add(TILE),
                        row = in(reg) row,
                        options(nostack, readonly)
                    );
                }
            } else {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
            }
            for t in 0..steps {
                let (a0, b0) = (a.at.add(t * a.step), b.at.add(t * b.step));
                tile_load!(a.streamed, "tmm4", a0, a.stride);
                tile_load!(b.streamed, "tmm6", b0, b.stride);
                asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack, nomem));
                tile_load!(b.streamed, "tmm7", b0.add(b.next), b.stride);
                asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem));
                if F == 2 {
                    tile_load!(a.streamed, "tmm5", a0.add(a.next), a.stride);
                    asm!(
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        options(nostack, nomem)
                    );
                }
            }
            asm!(
                "tilestored [{c0} + {row}], tmm0",
                "tilestored [{c1} + {row}], tmm1",
                c0 = in(reg) c[0],
                c1 = in(reg) c[0].add(TILE),
                row = in(reg) row,
                options(nostack)
            );
            if F == 2 {
                asm!(
                    "tilestored [{c0} + {row}], tmm2",
                    "tilestored [{c1} + {row}], tmm3",
                    c0 = in(reg) c[1],
                    c1 = in(reg) c[1].add(TILE),
                    row = in(reg) row,
                    options(nostack)
                );
            }
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by this thread.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Computes the product of `p` into `sink` with `w`'s rows loaded where
/// they lie (aligned) and `x` packed in the AVX-512 scheme's panels.
///
/// # Safety
/// As for [`matmul`]; `k` is a multiple of 32 and `n` of 16.
unsafe fn matmul_w_in_place(p: &Problem<'_>, sink: &Sink<'_>) {
    let threads = threads_for(p);
    // SAFETY: AMX implies the AVX-512 features (checked by `available`).
    let mut packed = unsafe { avx512::pack_x(p, threads) };
    let xp = SharedMut(packed.as_mut_ptr().cast::<u32>());
    let nc = chunk_len(p.n, 4 * threads, 2 * TILE);
    parallel_for(p.n.div_ceil(nc), threads, |t| {
        let cols = t * nc..p.n.min((t + 1) * nc);
        SCRATCH.with_borrow_mut(|s| {
            // SAFETY: the caller's contract; tasks own disjoint columns.
            unsafe { block_w_in_place(p, sink, cols, xp.at(0), &mut s.c, &mut s.b) }
        });
    });
}

/// All rows of the output in columns `cols`, `TASK_ROWS` rows at a time.
///
/// # Safety
/// As for [`matmul`]; `xp` is `x` packed by [`avx512::pack_x`]; `cols` is
/// a whole number of tiles inside the output, written by no other thread.
unsafe fn block_w_in_place(
    p: &Problem<'_>,
    sink: &Sink<'_>,
    cols: Range<usize>,
    xp: *const u32,
    sums: &mut Vec<Line>,
    rows_buf: &mut Vec<Line>,
) {
    let m_pad = p.m.next_multiple_of(XR);
    let kp = p.k / 2;
    let w = p.w.as_ptr().cast::<u16>();
    let tiles = Tiles::configure();
    for r0 in (0..m_pad).step_by(TASK_ROWS) {
        let tc = TASK_ROWS.min(m_pad - r0);
        // Sums, transposed: output column c of the block at row c, tc wide.
        let ct = words(sums, cols.len() * tc).cast::<f32>();
        for k0 in (0..p.k).step_by(KC_IN_PLACE) {
            let kc = KC_IN_PLACE.min(p.k - k0);
            for g in (0..cols.len()).step_by(2 * TILE) {
                // SAFETY: rows cols.start + g.. of `w` exist (whole tiles).
                let w_rows = unsafe { w.add((cols.start + g) * p.ldw + k0) };
                let two = cols.len() - g >= 2 * TILE;
                for r in (0..tc).step_by(2 * TILE) {
                    // Rows r0 + r.. lie in one 64-row panel (TASK_ROWS and 2·TILE
                    // divide XR's multiples), at row offset (r0 + r) % 64.
                    let (q, o) = ((r0 + r) / XR, (r0 + r) % XR);
                    // SAFETY: the panel slice, `w`'s rows and `ct`'s rows
                    // g.. (columns r..r + 32) are inside their buffers.
                    unsafe {
                        let w = Operand {
                            at: w_rows.cast(),
                            next: 2 * TILE * p.ldw,
                            stride: 2 * p.ldw,
                            step: 2 * TK,
                            streamed: false,
                        };
                        let x = Operand {
                            at: xp.add((q * kp + k0 / 2) * XR + o).cast(),
                            next: 4 * TILE,
                            stride: 4 * XR,
                            step: 4 * XR * TK / 2,
                            streamed: true,
                        };
                        let sums = Sums {
                            c: ct.add(g * tc + r),
                            ldc: tc,
                            add: k0 > 0,
                        };
                        if two {
                            tiles.product::<2>(w, x, kc / TK, sums);
                        } else {
                            tiles.product::<1>(w, x, kc / TK, sums);
                        }
                    }
                }
            }
        }
        let rows = r0..p.m.min(r0 + tc);
        // SAFETY: `ct` holds the sums of these rows, laid out as
        // `store_transposed` reads them (tc and r0 are multiples of 16).
        unsafe { avx512::store_transposed(sink, ct, tc, rows, cols.clone(), rows_buf) };
    }
}
