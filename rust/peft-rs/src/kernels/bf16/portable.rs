//! Portable fallback for CPUs without AVX-512 BF16: converts cache blocks of
//! `x` and `w` to f32 and forms dot products with independent lane sums, a
//! shape the compiler vectorizes for any target.

use std::ops::Range;

use super::{Problem, Sink, chunk_len, parallel_for, threads_for};
use half::bf16;

/// Rows of `x` per task.
const BM: usize = 16;
/// Columns (rows of `w`) per task at most.
const BN: usize = 64;
/// k per converted block.
const BK: usize = 256;
/// Independent partial sums per dot product.
const LANES: usize = 16;

pub(crate) fn matmul(p: &Problem<'_>, sink: &Sink<'_>) {
    let threads = threads_for(p);
    let mb = p.m.div_ceil(BM);
    let nc = chunk_len(p.n, (4 * threads).div_ceil(mb).max(p.n.div_ceil(BN)), 1);
    let nb = p.n.div_ceil(nc);
    parallel_for(mb * nb, threads, |t| {
        let (bi, bj) = (t / nb, t % nb);
        let rows = bi * BM..p.m.min((bi + 1) * BM);
        let cols = bj * nc..p.n.min((bj + 1) * nc);
        block(p, sink, rows, cols);
    });
}

/// Output tile `rows × cols` over all of k.
fn block(p: &Problem<'_>, sink: &Sink<'_>, rows: Range<usize>, cols: Range<usize>) {
    let (ml, nl) = (rows.len(), cols.len());
    let mut acc = vec![0.0f32; ml * nl];
    let mut xb = vec![0.0f32; ml * BK.min(p.k)];
    let mut wb = vec![0.0f32; nl * BK.min(p.k)];
    for pc in (0..p.k).step_by(BK) {
        let kc = BK.min(p.k - pc);
        to_f32(p.x, p.lda, rows.clone(), pc..pc + kc, &mut xb);
        to_f32(p.w, p.ldw, cols.clone(), pc..pc + kc, &mut wb);
        for (acc_i, xr) in acc.chunks_exact_mut(nl).zip(xb.chunks_exact(kc)) {
            for (a, wr) in acc_i.iter_mut().zip(wb.chunks_exact(kc)) {
                *a += dot(xr, wr);
            }
        }
    }
    for (r, i) in rows.enumerate() {
        // SAFETY: row i < m, columns `cols` lie in 0..n, and this task is the
        // only one writing this tile.
        unsafe { sink.put_row(i, cols.start, &acc[r * nl..(r + 1) * nl]) };
    }
}

/// Copies `src[r·ld + ks]` for `r` in `rows` into consecutive rows of `dst`.
fn to_f32(src: &[bf16], ld: usize, rows: Range<usize>, ks: Range<usize>, dst: &mut [f32]) {
    for (r, d) in rows.zip(dst.chunks_exact_mut(ks.len())) {
        let s = &src[r * ld + ks.start..r * ld + ks.end];
        for (d, s) in d.iter_mut().zip(s) {
            // Exact widening (bf16 is the top half of an f32); unlike
            // `bf16::to_f32` it has no NaN branch, so it vectorizes.
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a_chunks, a_tail) = a.as_chunks::<LANES>();
    let (b_chunks, b_tail) = b.as_chunks::<LANES>();
    let mut lanes = [0.0f32; LANES];
    for (a, b) in a_chunks.iter().zip(b_chunks) {
        for l in 0..LANES {
            lanes[l] += a[l] * b[l];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(a, b)| a * b).sum();
    lanes.iter().sum::<f32>() + tail
}
