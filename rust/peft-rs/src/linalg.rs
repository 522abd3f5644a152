//! Small dense linear algebra on batches of small square matrices, built from candle tensor ops
//! so it runs on the tensors' own device (no copy to the host): what the orthogonal methods (OFT,
//! BOFT) need for their rotations and their unmerge.
//!
//! Every function takes and returns a batch `(n, b, b)` in one floating dtype; [`BlockFactors`]
//! keeps a product of permuted block-diagonal matrices without forming it. Results agree with
//! PyTorch's LAPACK-based `torch.linalg.inv` / `solve` to rounding, not bit for bit: elimination
//! order differs.

use candle_core::{DType, Device, Tensor};

use crate::error::{PeftError, Result};
use crate::kernels::elementwise::rotate_blocks;

/// The Cayley transform `(I − S)(I + S)⁻¹` of each matrix of a batch `(n, b, b)`: an exactly
/// orthogonal matrix when `S` is skew-symmetric (PEFT's `torch.linalg.solve(I + S, I − S,
/// left=False)`). `I + S` is invertible for every real skew-symmetric `S`.
pub fn cayley(skew: &Tensor) -> Result<Tensor> {
    let (n, b) = batch_dims(skew, "Cayley transform input")?;
    let eye = identity(n, b, skew.dtype(), skew.device())?;
    let plus = eye.add(skew)?;
    let minus = eye.sub(skew)?;
    Ok(minus.matmul(&inverse(&plus)?)?)
}

/// The inverse of each matrix of a batch `(n, b, b)`, by Gauss–Jordan elimination with partial
/// pivoting (one row swap per column, chosen per matrix on the device). A singular matrix gives
/// non-finite entries rather than an error: detecting it would need a copy to the host.
pub fn inverse(m: &Tensor) -> Result<Tensor> {
    let (n, b) = batch_dims(m, "matrix to invert")?;
    match inverse_on_host(m, n, b)? {
        Some(inv) => Ok(inv),
        None => inverse_by_ops(m, n, b),
    }
}

/// [`inverse`] by candle's ops, on the tensor's device (and recording gradients).
fn inverse_by_ops(m: &Tensor, n: usize, b: usize) -> Result<Tensor> {
    let shape = (n, b, b);
    let device = m.device();
    let rows = Tensor::arange(0u32, b as u32, device)?;
    // Row k of this is the mask of row k (made once: a scalar comparison would copy to the device).
    let row_masks = Tensor::eye(b, DType::U8, device)?;
    let mut a = m.contiguous()?;
    let mut inv = identity(n, b, m.dtype(), device)?;
    for k in 0..b {
        let perm = pivot_swap(&a, &rows, k)?
            .unsqueeze(2)?
            .broadcast_as(shape)?
            .contiguous()?;
        a = a.gather(&perm, 1)?;
        inv = inv.gather(&perm, 1)?;
        // Row k divided by its pivot; every other row loses its column-k multiple of it.
        let pivot = a.narrow(1, k, 1)?.narrow(2, k, 1)?;
        let row_a = a.narrow(1, k, 1)?.broadcast_div(&pivot)?;
        let row_inv = inv.narrow(1, k, 1)?.broadcast_div(&pivot)?;
        let factor = a.narrow(2, k, 1)?;
        let is_k = row_masks
            .narrow(0, k, 1)?
            .reshape((1, b, 1))?
            .broadcast_as(shape)?;
        a = is_k.where_cond(
            &row_a.broadcast_as(shape)?,
            &a.sub(&factor.broadcast_mul(&row_a)?)?,
        )?;
        inv = is_k.where_cond(
            &row_inv.broadcast_as(shape)?,
            &inv.sub(&factor.broadcast_mul(&row_inv)?)?,
        )?;
    }
    Ok(inv)
}

/// [`inverse`] by the same elimination on the CPU's own memory, in f64, one matrix per parallel
/// task, for CPU tensors without gradients: candle's ops cost more than the arithmetic there
/// (OFT's unmerge at width 1024, 32 blocks of 32: 7 ms). `None` elsewhere.
fn inverse_on_host(m: &Tensor, n: usize, b: usize) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    if !m.device().is_cpu() || m.track_op() || !matches!(m.dtype(), DType::F32 | DType::F64) {
        return Ok(None);
    }
    let mut inv = vec![0f64; n * b * b];
    let values = m.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let per_matrix = (b * b).max(1);
    inv.par_chunks_mut(per_matrix)
        .zip(values.par_chunks(per_matrix))
        .for_each(|(inv, a)| {
            let mut a = a.to_vec();
            for i in 0..b {
                inv[i * b + i] = 1.0;
            }
            for k in 0..b {
                // Partial pivoting: the row at or below k with the largest |a[·][k]|.
                let mut pivot_row = k;
                for r in k + 1..b {
                    if a[r * b + k].abs() > a[pivot_row * b + k].abs() {
                        pivot_row = r;
                    }
                }
                for c in 0..b {
                    a.swap(k * b + c, pivot_row * b + c);
                    inv.swap(k * b + c, pivot_row * b + c);
                }
                let pivot = a[k * b + k];
                for c in 0..b {
                    a[k * b + c] /= pivot;
                    inv[k * b + c] /= pivot;
                }
                for r in (0..b).filter(|&r| r != k) {
                    let factor = a[r * b + k];
                    for c in 0..b {
                        a[r * b + c] -= factor * a[k * b + c];
                        inv[r * b + c] -= factor * inv[k * b + c];
                    }
                }
            }
        });
    let inv = Tensor::from_vec(inv, (n, b, b), &Device::Cpu)?;
    Ok(Some(inv.to_dtype(m.dtype())?))
}

/// The block-diagonal matrix `(n·b, n·b)` with the blocks of a batch `(n, b, b)` on its diagonal
/// (`torch.block_diag(*blocks)`).
pub fn block_diag(blocks: &Tensor) -> Result<Tensor> {
    let (n, b) = batch_dims(blocks, "diagonal blocks")?;
    // (n, b, n, b) with block i at [i, :, i, :] and zeros elsewhere.
    let mask = Tensor::eye(n, blocks.dtype(), blocks.device())?.reshape((n, 1, n, 1))?;
    let spread = blocks.unsqueeze(2)?.broadcast_mul(&mask)?;
    Ok(spread.reshape((n * b, n * b))?)
}

/// A square matrix `R = M_{n−1} ⋯ M_0` `(D, D)` kept as its factors, each a block-diagonal
/// matrix with its rows and columns permuted: `M_i[a, c] = B_i[p_i(a), p_i(c)]` for the
/// block-diagonal `B_i` and a permutation `p_i` of the features (none: the identity). OFT's
/// rotation is one factor without a permutation, BOFT's the butterfly factors. A product with it
/// takes `n · D · b` multiply-adds per row where the formed matrix takes `D²` (OFT's merge at width
/// 1024, blocks of 32: 32× less).
#[derive(Debug, Clone)]
pub struct BlockFactors {
    dim: usize,
    factors: Vec<BlockFactor>,
}

#[derive(Debug, Clone)]
struct BlockFactor {
    /// `(count, b, b)`: the blocks along the diagonal, or one block repeated (`count` 1).
    blocks: Tensor,
    /// `p` and its inverse, as u32 indices.
    perm: Option<(Tensor, Tensor)>,
}

impl BlockFactors {
    /// The block-diagonal `(dim, dim)` matrix of `blocks` `(dim / b, b, b)`, or of one block
    /// `(1, b, b)` repeated along the diagonal.
    pub fn block_diagonal(blocks: Tensor, dim: usize) -> Result<Self> {
        Self::new(vec![(blocks, None)], dim)
    }

    /// `M_{n−1} ⋯ M_0` from `(B_i, p_i)` in the order `i = 0 … n−1`, `p_i` u32 indices
    /// `(dim)`.
    pub fn new(factors: Vec<(Tensor, Option<Tensor>)>, dim: usize) -> Result<Self> {
        let factors = factors
            .into_iter()
            .map(|(blocks, perm)| {
                let (count, b) = batch_dims(&blocks, "diagonal blocks")?;
                if b == 0 || !dim.is_multiple_of(b) || (count != 1 && count * b != dim) {
                    return Err(PeftError::shape(
                        "diagonal blocks",
                        &[dim / b.max(1), b, b],
                        blocks.dims(),
                    ));
                }
                let perm = perm.map(|p| inverse_permutation(&p, dim)).transpose()?;
                Ok(BlockFactor { blocks, perm })
            })
            .collect::<Result<_>>()?;
        Ok(Self { dim, factors })
    }

    /// `D`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The blocks' dtype.
    pub fn dtype(&self) -> DType {
        self.factors
            .first()
            .map_or(DType::F32, |f| f.blocks.dtype())
    }

    /// `Rᵀ = M_0ᵀ ⋯ M_{n−1}ᵀ`, each `M_iᵀ` the same permutation of `B_iᵀ`.
    pub fn transpose(&self) -> Result<Self> {
        self.reversed_with(|blocks| Ok(blocks.transpose(1, 2)?.contiguous()?))
    }

    /// `R⁻¹ = M_0⁻¹ ⋯ M_{n−1}⁻¹`, the blocks inverted in f32 (as `torch.linalg.inv` in PEFT's
    /// unmerge) and cast back.
    pub fn inverse(&self) -> Result<Self> {
        self.reversed_with(|blocks| {
            Ok(inverse(&blocks.to_dtype(DType::F32)?)?.to_dtype(blocks.dtype())?)
        })
    }

    fn reversed_with(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let factors = self
            .factors
            .iter()
            .rev()
            .map(|factor| {
                Ok(BlockFactor {
                    blocks: f(&factor.blocks)?,
                    perm: factor.perm.clone(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            dim: self.dim,
            factors,
        })
    }

    /// The formed `(D, D)` matrix, in the blocks' dtype.
    pub fn to_dense(&self) -> Result<Tensor> {
        let mut product: Option<Tensor> = None;
        for factor in &self.factors {
            let (count, b) = batch_dims(&factor.blocks, "diagonal blocks")?;
            let blocks = factor.blocks.broadcast_as((self.dim / b, b, b))?;
            let blocks = if count == 1 {
                blocks.contiguous()?
            } else {
                blocks
            };
            let mut m = block_diag(&blocks)?;
            if let Some((p, _)) = &factor.perm {
                m = m.index_select(p, 0)?.index_select(p, 1)?;
            }
            product = Some(match product {
                None => m,
                Some(prev) => m.matmul(&prev)?,
            });
        }
        product.ok_or_else(|| PeftError::InvalidOperation("a matrix of no factors".into()))
    }

    /// `x · R` over `x`'s last dimension (`D`), stored in `dtype`: the CPU's one-pass block
    /// products where they apply, else candle's ops per factor in the blocks' dtype (any
    /// device; keeps gradients).
    pub fn rows_times(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        if let Some(y) = self.rows_times_on_cpu(x, dtype)? {
            return Ok(y);
        }
        if self.dim == 0 || x.elem_count() == 0 {
            return Ok(x.to_dtype(dtype)?);
        }
        let mut y = x.to_dtype(self.dtype())?.contiguous()?;
        for factor in self.factors.iter().rev() {
            y = factor.times(&y, |y| {
                let (count, b) = batch_dims(&factor.blocks, "diagonal blocks")?;
                let dims = y.dims();
                let rows = y.elem_count() / self.dim;
                let r = self.dim / b;
                let out = if count == 1 {
                    y.reshape((rows * r, b))?
                        .matmul(&factor.blocks.squeeze(0)?)?
                } else {
                    let per_block = y.reshape((rows, r, b))?.transpose(0, 1)?.contiguous()?;
                    per_block.matmul(&factor.blocks)?.transpose(0, 1)?
                };
                Ok(out.reshape(dims)?)
            })?;
        }
        Ok(y.to_dtype(dtype)?)
    }

    /// [`Self::rows_times`] by the CPU's one-pass block products (f32 sums, only the last
    /// factor's result stored in `dtype`); `None` where they do not apply (other devices, f64
    /// blocks, tracked tensors).
    pub(crate) fn rows_times_on_cpu(&self, x: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
        self.check_width(x)?;
        let mut y = x.contiguous()?;
        for (i, factor) in self.factors.iter().enumerate().rev() {
            let step = if i == 0 { dtype } else { DType::F32 };
            let mut done = true;
            y = factor.times(&y, |y| match rotate_blocks(y, &factor.blocks, step)? {
                Some(rotated) => Ok(rotated),
                None => {
                    done = false;
                    Ok(y.clone())
                }
            })?;
            if !done {
                return Ok(None);
            }
        }
        Ok(Some(y))
    }

    fn check_width(&self, x: &Tensor) -> Result<()> {
        let dims = x.dims();
        if dims.last() == Some(&self.dim) {
            return Ok(());
        }
        let mut expected = dims[..dims.len().saturating_sub(1)].to_vec();
        expected.push(self.dim);
        Err(PeftError::shape(
            "rotated features (last dimension)",
            &expected,
            dims,
        ))
    }
}

impl BlockFactor {
    /// `x · M` with `block_times(z) = z · B`: `x` scattered by `p`, times `B`, gathered by `p`.
    fn times(
        &self,
        x: &Tensor,
        block_times: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let last = x.rank() - 1;
        match &self.perm {
            Some((p, inverse)) => {
                Ok(block_times(&x.index_select(inverse, last)?)?.index_select(p, last)?)
            }
            None => block_times(x),
        }
    }
}

/// `(p, p⁻¹)` of u32 indices `(dim)`, checked to be a permutation.
fn inverse_permutation(p: &Tensor, dim: usize) -> Result<(Tensor, Tensor)> {
    let values = p.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let mut inverse = vec![u32::MAX; dim];
    if values.len() == dim {
        for (a, &pa) in values.iter().enumerate() {
            if let Some(slot) = inverse.get_mut(pa as usize) {
                *slot = a as u32;
            }
        }
    }
    if inverse.contains(&u32::MAX) {
        return Err(PeftError::InvalidOperation(format!(
            "a permutation of {dim} features was expected, found {values:?}"
        )));
    }
    let inverse = Tensor::from_vec(inverse, dim, p.device())?;
    Ok((p.to_dtype(DType::U32)?, inverse))
}

/// `(n, b)` of a batch of square matrices.
fn batch_dims(t: &Tensor, what: &str) -> Result<(usize, usize)> {
    match *t.dims() {
        [n, b, c] if b == c => Ok((n, b)),
        _ => Err(PeftError::InvalidOperation(format!(
            "{what} must be a batch of square matrices (n, b, b), found shape {:?}",
            t.dims()
        ))),
    }
}

fn identity(n: usize, b: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::eye(b, dtype, device)?
        .unsqueeze(0)?
        .broadcast_as((n, b, b))?
        .contiguous()?)
}

/// Per matrix, the row order `(n, b)` that swaps row `k` with the row at or below it whose
/// column-`k` entry is largest in magnitude.
fn pivot_swap(a: &Tensor, rows: &Tensor, k: usize) -> Result<Tensor> {
    let b = rows.dim(0)?;
    let below = a.narrow(1, k, b - k)?.narrow(2, k, 1)?.abs()?.squeeze(2)?;
    let pivot_row = below.argmax_keepdim(1)?.affine(1.0, k as f64)?; // (n, 1), u32
    let n = pivot_row.dim(0)?;
    let rows = rows.unsqueeze(0)?.broadcast_as((n, b))?;
    let k_row = Tensor::full(k as u32, (n, b), a.device())?;
    let pivot_row = pivot_row.broadcast_as((n, b))?;
    // row k takes the pivot row, the pivot row takes row k, the others stay.
    let swapped = rows.eq(&pivot_row)?.where_cond(&k_row, &rows)?;
    Ok(rows.eq(&k_row)?.where_cond(&pivot_row, &swapped)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(values: &[f64], n: usize, b: usize) -> Tensor {
        Tensor::from_vec(values.to_vec(), (n, b, b), &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        a.sub(b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn inverse_needs_pivoting_and_is_exact_on_permutations() {
        // The first matrix has a zero leading entry; the second is a permutation.
        let m = batch(
            &[
                0.0, 2.0, 1.0, 1.0, 0.0, 3.0, 4.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0,
                1.0, 0.0,
            ],
            2,
            3,
        );
        // On the host (what `inverse` takes here) and by candle's ops (other devices, tracked).
        let on_host = inverse_on_host(&m, 2, 3).unwrap().unwrap();
        for inv in [on_host.clone(), inverse_by_ops(&m, 2, 3).unwrap()] {
            let eye = identity(2, 3, DType::F64, &Device::Cpu).unwrap();
            assert!(max_abs_diff(&m.matmul(&inv).unwrap(), &eye) < 1e-12);
            assert!(max_abs_diff(&inv.matmul(&m).unwrap(), &eye) < 1e-12);
            let perm = m.narrow(0, 1, 1).unwrap();
            let perm_inv = inv.narrow(0, 1, 1).unwrap();
            assert_eq!(max_abs_diff(&perm_inv, &perm.transpose(1, 2).unwrap()), 0.0);
        }
        assert_eq!(max_abs_diff(&inverse(&m).unwrap(), &on_host), 0.0);
        let empty = Tensor::zeros((2, 0, 0), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(inverse(&empty).unwrap().dims(), &[2, 0, 0]);
    }

    /// Both eliminations agree on a batch of f32 blocks (OFT's unmerge), and a tracked batch
    /// takes candle's ops.
    #[test]
    fn inverse_on_host_equals_inverse_by_ops() {
        let eye = identity(5, 6, DType::F32, &Device::Cpu).unwrap();
        let m = (random(&[5, 6, 6], 9).affine(0.3, 0.0).unwrap() + &eye).unwrap();
        let on_host = inverse_on_host(&m, 5, 6).unwrap().unwrap();
        assert_eq!(on_host.dtype(), DType::F32);
        let by_ops = inverse_by_ops(&m, 5, 6).unwrap();
        assert!(max_abs_diff32(&on_host, &by_ops) < 1e-5);
        assert!(max_abs_diff32(&m.matmul(&on_host).unwrap(), &eye) < 1e-5);
        let tracked = candle_core::Var::from_tensor(&m).unwrap();
        assert!(
            inverse_on_host(tracked.as_tensor(), 5, 6)
                .unwrap()
                .is_none()
        );
        let via_ops = inverse(tracked.as_tensor()).unwrap();
        assert!(max_abs_diff32(&via_ops, &by_ops) < 1e-6);
    }

    #[test]
    fn cayley_of_skew_is_orthogonal_and_of_zero_is_identity() {
        let s = batch(&[0.0, 0.3, -0.2, -0.3, 0.0, 0.5, 0.2, -0.5, 0.0], 1, 3);
        let r = cayley(&s).unwrap();
        let eye = identity(1, 3, DType::F64, &Device::Cpu).unwrap();
        assert!(max_abs_diff(&r.matmul(&r.transpose(1, 2).unwrap()).unwrap(), &eye) < 1e-12);
        // (I − S)(I + S)⁻¹ (I + S) = I − S.
        let plus = eye.add(&s).unwrap();
        let minus = eye.sub(&s).unwrap();
        assert!(max_abs_diff(&r.matmul(&plus).unwrap(), &minus) < 1e-12);
        let zero = s.zeros_like().unwrap();
        assert_eq!(max_abs_diff(&cayley(&zero).unwrap(), &eye), 0.0);
    }

    #[test]
    fn block_diag_places_blocks_in_order() {
        let blocks = batch(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], 2, 2);
        let full = block_diag(&blocks).unwrap().to_vec2::<f64>().unwrap();
        assert_eq!(
            full,
            vec![
                vec![1.0, 2.0, 0.0, 0.0],
                vec![3.0, 4.0, 0.0, 0.0],
                vec![0.0, 0.0, 5.0, 6.0],
                vec![0.0, 0.0, 7.0, 8.0],
            ]
        );
    }

    fn random(dims: &[usize], seed: u64) -> Tensor {
        crate::init::Initializer::new(seed)
            .uniform(dims, 1.0, DType::F32)
            .unwrap()
    }

    fn max_abs_diff32(a: &Tensor, b: &Tensor) -> f32 {
        let d = a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap();
        d.unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn perm(values: &[u32]) -> Tensor {
        Tensor::from_vec(values.to_vec(), values.len(), &Device::Cpu).unwrap()
    }

    /// Products of permuted block-diagonal factors (one factor, several with permutations, one
    /// block repeated), their transposes and inverses, equal the formed matrices; `x · R` equals
    /// the formed product by the CPU's block products and by candle's ops (f64, and tracked
    /// blocks), on 2-D, 3-D and strided rows.
    #[test]
    fn block_factors_equal_the_formed_matrix() {
        let p1 = perm(&[3, 0, 5, 1, 7, 2, 4, 6]);
        let p2 = perm(&[1, 0, 3, 2, 5, 4, 7, 6]);
        let cases = [
            vec![(random(&[4, 2, 2], 1), None)],
            vec![(random(&[1, 4, 4], 2), None)],
            vec![
                (random(&[2, 4, 4], 3), Some(p1.clone())),
                (random(&[4, 2, 2], 4), None),
                (random(&[1, 2, 2], 5), Some(p2.clone())),
            ],
        ];
        let wide = random(&[6, 11], 6);
        let inputs = [
            random(&[5, 8], 7),
            random(&[2, 3, 8], 8),
            wide.narrow(1, 2, 8).unwrap(),
        ];
        for factors in cases {
            // Formed by hand: each factor's block diagonal, permuted, multiplied in order.
            let mut formed: Option<Tensor> = None;
            for (blocks, p) in &factors {
                let (count, b, _) = blocks.dims3().unwrap();
                let full = block_diag(
                    &blocks
                        .broadcast_as((8 / b, b, b))
                        .unwrap()
                        .contiguous()
                        .unwrap(),
                )
                .unwrap();
                assert!(count == 1 || count == 8 / b);
                let m = match p {
                    Some(p) => full.index_select(p, 0).unwrap().index_select(p, 1).unwrap(),
                    None => full,
                };
                formed = Some(match formed {
                    None => m,
                    Some(prev) => m.matmul(&prev).unwrap(),
                });
            }
            let formed = formed.unwrap();
            let matrix = BlockFactors::new(factors.clone(), 8).unwrap();
            assert!(max_abs_diff32(&matrix.to_dense().unwrap(), &formed) < 1e-6);
            let t = matrix.transpose().unwrap().to_dense().unwrap();
            assert!(max_abs_diff32(&t, &formed.t().unwrap()) < 1e-6);
            let inv = matrix.inverse().unwrap().to_dense().unwrap();
            let eye = Tensor::eye(8, DType::F32, &Device::Cpu).unwrap();
            assert!(max_abs_diff32(&inv.matmul(&formed).unwrap(), &eye) < 1e-3);
            let f64_factors: Vec<_> = (factors.iter())
                .map(|(b, p)| (b.to_dtype(DType::F64).unwrap(), p.clone()))
                .collect();
            let wide64 = BlockFactors::new(f64_factors, 8).unwrap();
            let tracked: Vec<_> = (factors.iter())
                .map(|(b, p)| {
                    (
                        candle_core::Var::from_tensor(b)
                            .unwrap()
                            .as_tensor()
                            .clone(),
                        p.clone(),
                    )
                })
                .collect();
            let tracked = BlockFactors::new(tracked, 8).unwrap();
            for x in &inputs {
                let expected = x.broadcast_matmul(&formed).unwrap();
                let fast = matrix.rows_times_on_cpu(x, DType::F32).unwrap().unwrap();
                assert!(max_abs_diff32(&fast, &expected) < 1e-5);
                let half = matrix.rows_times(x, DType::BF16).unwrap();
                assert_eq!(half.dtype(), DType::BF16);
                assert!(max_abs_diff32(&half, &expected) < 3e-2);
                assert!(wide64.rows_times_on_cpu(x, DType::F32).unwrap().is_none());
                let by_ops = wide64.rows_times(x, DType::F32).unwrap();
                assert_eq!(by_ops.dtype(), DType::F32);
                assert!(max_abs_diff32(&by_ops, &expected) < 1e-5);
                let by_ops = tracked.rows_times(x, DType::F32).unwrap();
                assert!(max_abs_diff32(&by_ops, &expected) < 1e-5);
            }
        }
    }

    #[test]
    fn block_factors_refuse_bad_shapes_and_permutations() {
        let blocks = random(&[3, 2, 2], 1);
        let e = BlockFactors::block_diagonal(blocks.clone(), 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[4, 2, 2]") && e.contains("[3, 2, 2]"), "{e}");
        let e = BlockFactors::new(
            vec![(random(&[4, 2, 2], 1), Some(perm(&[0, 1, 1, 3, 4, 5, 6, 7])))],
            8,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("permutation of 8"), "{e}");
        let matrix = BlockFactors::block_diagonal(random(&[4, 2, 2], 1), 8).unwrap();
        let e = matrix
            .rows_times(&random(&[3, 6], 2), DType::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[3, 8]") && e.contains("[3, 6]"), "{e}");
        let none = Tensor::zeros((0, 8), DType::F64, &Device::Cpu).unwrap();
        assert_eq!(
            matrix.rows_times(&none, DType::F32).unwrap().dims(),
            &[0, 8]
        );
    }

    #[test]
    fn non_square_batches_are_rejected() {
        let t = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(inverse(&t).is_err());
        assert!(cayley(&t).is_err());
        assert!(block_diag(&t).is_err());
    }
}
