//! Intel AMX kernel built on `tdpbf16ps`, which multiplies a tile of 16 rows
//! × 32 bf16 by one of 16 k-pairs × 16 columns and adds the 16 × 16 f32 sums
//! to a third tile: 16 times the work of a `vdpbf16ps` per instruction.
//!
//! `w`'s rows are loaded as tiles where they lie (output columns × k), and
//! `x` is packed into the 64-row panels of k-pairs of the AVX-512 scheme,
//! whose 16-row slices are the second operand with a stride: the sums come
//! out transposed (output columns × rows) and go to the sink through the
//! same 16 × 16 transposes. Rust has no stable AMX intrinsics, so the
//! instructions are written as inline assembly; no compiled code uses the
//! tile registers, so nothing else can clobber them.

use std::arch::asm;
use std::ops::Range;
use std::sync::OnceLock;

use super::avx512::{self, DOT_MAX_M, Line, SCRATCH, SharedMut, XR, words};
use super::{Problem, Sink, chunk_len, parallel_for, threads_for};

/// Output columns (rows of `w`) per tile.
const TILE: usize = 16;
/// k per tile step: 16 rows of 64 bytes.
const TK: usize = 32;
/// Rows of `x` per pass over a task's columns: their sums (`cols × TC`
/// floats) and a `KC` slice of their packed rows (512 KiB) stay in L2.
const TC: usize = 256;
/// k per cache block, between which the sums go through memory. Measured on
/// a Xeon with AMX (2 cores): 256 → 1024 gained 10–50%, 2048 nothing more; a
/// tile load costs about three `tdpbf16ps` there, wherever the data is.
const KC: usize = 1024;

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

/// Whether the tile kernel takes problem `p`: whole tiles along k and the
/// output columns (`w` is read in place, so a part tile would read past its
/// rows), and enough rows to fill them.
pub(super) fn fits(p: &Problem<'_>) -> bool {
    p.m >= DOT_MAX_M && p.k.is_multiple_of(TK) && p.n.is_multiple_of(TILE)
}

/// Computes the product of `p` into `sink`.
///
/// # Safety
/// [`available`] and [`fits`] hold.
pub(super) unsafe fn matmul(p: &Problem<'_>, sink: &Sink<'_>) {
    let threads = threads_for(p);
    // SAFETY: AMX implies the AVX-512 features (checked by `available`).
    let mut packed = unsafe { avx512::pack_x(p, threads) };
    let xp = SharedMut(packed.as_mut_ptr().cast::<u32>());
    let nc = chunk_len(p.n, 4 * threads, 2 * TILE);
    parallel_for(p.n.div_ceil(nc), threads, |t| {
        let cols = t * nc..p.n.min((t + 1) * nc);
        SCRATCH.with_borrow_mut(|s| {
            // SAFETY: the caller's contract; tasks own disjoint columns.
            unsafe { block(p, sink, cols, xp.at(0), &mut s.c, &mut s.b) }
        });
    });
}

/// All rows of the output in columns `cols`, `TC` rows at a time.
///
/// # Safety
/// As for [`matmul`]; `xp` is `x` packed by [`avx512::pack_x`]; `cols` is
/// a whole number of tiles inside the output, written by no other thread.
unsafe fn block(
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
    for r0 in (0..m_pad).step_by(TC) {
        let tc = TC.min(m_pad - r0);
        // Sums, transposed: output column c of the block at row c, tc wide.
        let ct = words(sums, cols.len() * tc).cast::<f32>();
        for k0 in (0..p.k).step_by(KC) {
            let kc = KC.min(p.k - k0);
            for g in (0..cols.len()).step_by(2 * TILE) {
                // SAFETY: rows cols.start + g.. of `w` exist (whole tiles).
                let w_rows = unsafe { w.add((cols.start + g) * p.ldw + k0) };
                let two = cols.len() - g >= 2 * TILE;
                for r in (0..tc).step_by(2 * TILE) {
                    // Rows r0 + r.. lie in one 64-row panel (TC and 2·TILE
                    // divide XR's multiples), at row offset (r0 + r) % 64.
                    let (q, o) = ((r0 + r) / XR, (r0 + r) % XR);
                    // SAFETY: the panel slice, `w`'s rows and `ct`'s rows
                    // g.. (columns r..r + 32) are inside their buffers.
                    unsafe {
                        let x = xp.add((q * kp + k0 / 2) * XR + o);
                        let c = ct.add(g * tc + r);
                        let sums = Sums {
                            c,
                            ldc: tc,
                            add: k0 > 0,
                        };
                        if two {
                            tiles.product::<2>(w_rows, p.ldw, x, kc / 2, sums);
                        } else {
                            tiles.product::<1>(w_rows, p.ldw, x, kc / 2, sums);
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

/// The tile registers of the calling thread, configured as 16 rows × 64
/// bytes each: tmm0–3 sums, tmm4–5 rows of `w`, tmm6–7 pairs of `x`.
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

    /// Sums of `F` × 16 output columns (`w`'s rows from `w`, stride `ldw`
    /// elements) by 32 rows of `x` (a panel slice at `x`: pair t of row i
    /// at word `64t + i`), over `2·kp` of k, stored in `sums`.
    ///
    /// # Safety
    /// `16F` rows of `w` with `2·kp` elements each, `kp` panel rows of 32
    /// words at `x`, and `16F` rows of 32 floats at `sums.c`.
    #[inline(always)]
    unsafe fn product<const F: usize>(
        &self,
        w: *const u16,
        ldw: usize,
        x: *const u32,
        kp: usize,
        sums: Sums,
    ) {
        let (w_stride, x_stride, c_stride) = (2 * ldw, 4 * XR, 4 * sums.ldc);
        let c = [sums.c, sums.c.wrapping_add(TILE * sums.ldc)];
        // SAFETY (all blocks): tiles are configured; the loads stay inside
        // the rows the caller vouches for and the stores inside `sums`.
        unsafe {
            if sums.add {
                asm!(
                    "tileloadd tmm0, [{c0} + {cs}]",
                    "tileloadd tmm1, [{c1} + {cs}]",
                    c0 = in(reg) c[0],
                    c1 = in(reg) c[0].add(TILE),
                    cs = in(reg) c_stride,
                    options(nostack, readonly)
                );
                if F == 2 {
                    asm!(
                        "tileloadd tmm2, [{c0} + {cs}]",
                        "tileloadd tmm3, [{c1} + {cs}]",
                        c0 = in(reg) c[1],
                        c1 = in(reg) c[1].add(TILE),
                        cs = in(reg) c_stride,
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
            for t in (0..kp).step_by(TK / 2) {
                let xt = x.add(t * XR);
                asm!(
                    "tileloadd tmm6, [{x} + {xs}]",
                    "tileloadd tmm7, [{x1} + {xs}]",
                    "tileloadd tmm4, [{w} + {ws}]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    x = in(reg) xt,
                    x1 = in(reg) xt.add(TILE),
                    xs = in(reg) x_stride,
                    w = in(reg) w.add(2 * t),
                    ws = in(reg) w_stride,
                    options(nostack, readonly)
                );
                if F == 2 {
                    asm!(
                        "tileloadd tmm5, [{w} + {ws}]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        w = in(reg) w.add(TILE * ldw + 2 * t),
                        ws = in(reg) w_stride,
                        options(nostack, readonly)
                    );
                }
            }
            asm!(
                "tilestored [{c0} + {cs}], tmm0",
                "tilestored [{c1} + {cs}], tmm1",
                c0 = in(reg) c[0],
                c1 = in(reg) c[0].add(TILE),
                cs = in(reg) c_stride,
                options(nostack)
            );
            if F == 2 {
                asm!(
                    "tilestored [{c0} + {cs}], tmm2",
                    "tilestored [{c1} + {cs}], tmm3",
                    c0 = in(reg) c[1],
                    c1 = in(reg) c[1].add(TILE),
                    cs = in(reg) c_stride,
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

/// Where [`Tiles::product`] leaves its sums: transposed, column i of output
/// column f at float `f·ldc + i` of `c`, added to what is there when `add`.
#[derive(Clone, Copy)]
struct Sums {
    c: *mut f32,
    ldc: usize,
    add: bool,
}
