//! Small dense linear algebra on batches of small square matrices, built from candle tensor ops
//! so it runs on the tensors' own device (no copy to the host): what the orthogonal methods (OFT,
//! BOFT) need for their rotations and their unmerge.
//!
//! Every function takes and returns a batch `(n, b, b)` in one floating dtype. Results agree with
//! PyTorch's LAPACK-based `torch.linalg.inv` / `solve` to rounding, not bit for bit: elimination
//! order differs.

use candle_core::{DType, Device, Tensor};

use crate::error::{PeftError, Result};

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

/// The block-diagonal matrix `(n·b, n·b)` with the blocks of a batch `(n, b, b)` on its diagonal
/// (`torch.block_diag(*blocks)`).
pub fn block_diag(blocks: &Tensor) -> Result<Tensor> {
    let (n, b) = batch_dims(blocks, "diagonal blocks")?;
    // (n, b, n, b) with block i at [i, :, i, :] and zeros elsewhere.
    let mask = Tensor::eye(n, blocks.dtype(), blocks.device())?.reshape((n, 1, n, 1))?;
    let spread = blocks.unsqueeze(2)?.broadcast_mul(&mask)?;
    Ok(spread.reshape((n * b, n * b))?)
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
        let inv = inverse(&m).unwrap();
        let eye = identity(2, 3, DType::F64, &Device::Cpu).unwrap();
        assert!(max_abs_diff(&m.matmul(&inv).unwrap(), &eye) < 1e-12);
        assert!(max_abs_diff(&inv.matmul(&m).unwrap(), &eye) < 1e-12);
        let perm = m.narrow(0, 1, 1).unwrap();
        let perm_inv = inv.narrow(0, 1, 1).unwrap();
        assert_eq!(max_abs_diff(&perm_inv, &perm.transpose(1, 2).unwrap()), 0.0);
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

    #[test]
    fn non_square_batches_are_rejected() {
        let t = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(inverse(&t).is_err());
        assert!(cayley(&t).is_err());
        assert!(block_diag(&t).is_err());
    }
}
