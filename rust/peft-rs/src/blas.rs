//! An f32 GEMM from a BLAS library opened at run time (OpenBLAS, MKL).
//!
//! The fused CPU kernels multiply with faer by default. A BLAS's tuned kernels can be faster
//! (measured on a 2-core Xeon with AVX-512, 4096 × 1024 × 1024: faer 40 ms, OpenBLAS 27.5, torch's
//! MKL 28), but linking one at build time would add a system dependency to every build. Instead
//! [`load`] opens one by path, process-wide (the Python package opens the OpenBLAS that numpy's
//! wheel bundles, or the library `PEFT_RS_BLAS` names). The kernels then call its `cblas_sgemm`
//! on each block of their own parallel split, one thread per call (the library's thread-local
//! thread count set to 1), so rayon keeps the cores and the library's thread pool stays idle.

use std::ffi::{CStr, c_char, c_int};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use half::f16;

use crate::error::{PeftError, Result};

/// What [`current`] and [`load`] report about a loaded library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlasInfo {
    /// The path it was opened from.
    pub path: PathBuf,
    /// Its own description where it gives one (OpenBLAS's build configuration), else its kind.
    pub description: String,
    /// Whether its integers are 64-bit (ILP64).
    pub ilp64: bool,
    /// Whether it has an f16 GEMM with f32 sums (MKL's `cblas_gemm_f16f16f32`), which f16
    /// layers then use instead of f32 copies of their operands.
    pub f16_gemm: bool,
}

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

type SgemmLp64 = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    i32,
    i32,
    i32,
    f32,
    *const f32,
    i32,
    *const f32,
    i32,
    f32,
    *mut f32,
    i32,
);
type SgemmIlp64 = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    i64,
    i64,
    i64,
    f32,
    *const f32,
    i64,
    *const f32,
    i64,
    f32,
    *mut f32,
    i64,
);
/// The Fortran interface (column-major, arguments by reference), 32-bit integers.
type SgemmFortran = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    *const i32,
    *const i32,
    *const i32,
    *const f32,
    *const f32,
    *const i32,
    *const f32,
    *const i32,
    *const f32,
    *mut f32,
    *const i32,
);
/// MKL's `cblas_gemm_f16f16f32` (32-bit integers): CBLAS's sgemm arguments with f16 (`u16`)
/// operands and an f32 output.
type GemmF16 = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    i32,
    i32,
    i32,
    f32,
    *const u16,
    i32,
    *const u16,
    i32,
    f32,
    *mut f32,
    i32,
);
/// Sets the calling thread's thread count and returns the previous one.
type SetLocalThreads = unsafe extern "C" fn(c_int) -> c_int;
type GetConfig = unsafe extern "C" fn() -> *const c_char;

#[derive(Clone, Copy)]
enum Sgemm {
    Lp64(SgemmLp64),
    Ilp64(SgemmIlp64),
    Fortran(SgemmFortran),
}

/// `cblas_sgemm` under the names OpenBLAS, scipy's OpenBLAS builds (numpy's wheels) and MKL
/// export; the `64_` ones take 64-bit integers.
const SGEMM: [(&str, bool); 4] = [
    ("cblas_sgemm", false),
    ("scipy_cblas_sgemm", false),
    ("cblas_sgemm64_", true),
    ("scipy_cblas_sgemm64_", true),
];
/// (MKL's lower-case `mkl_set_num_threads_local` symbol is its Fortran form, by reference.)
const SET_LOCAL_THREADS: [&str; 2] = [
    "openblas_set_num_threads_local",
    "MKL_Set_Num_Threads_Local",
];
const CONFIG: [&str; 3] = [
    "openblas_get_config",
    "scipy_openblas_get_config",
    "scipy_openblas_get_config64_",
];

/// An opened library; never closed (kernels may be running it on other threads), so a
/// `Library` lives for the rest of the process.
pub(crate) struct Library {
    info: BlasInfo,
    sgemm: Sgemm,
    gemm_f16: Option<GemmF16>,
    set_local_threads: SetLocalThreads,
    _library: libloading::Library,
}

static CURRENT: RwLock<Option<&'static Library>> = RwLock::new(None);

/// Opens the BLAS library at `path` and makes the CPU kernels' f32 products use it (replacing
/// any library loaded before). The library needs `cblas_sgemm` (plain, `64_`-suffixed or
/// scipy-prefixed) and a thread-local thread count (`openblas_set_num_threads_local`, OpenBLAS
/// ≥ 0.3.27, or `mkl_set_num_threads_local`); a 2 × 2 product is checked before it is used.
pub fn load(path: impl AsRef<Path>) -> Result<BlasInfo> {
    let path = path.as_ref();
    let fail = |reason: String| PeftError::Library {
        path: path.to_path_buf(),
        reason,
    };
    if !path.exists() {
        return Err(PeftError::FileNotFound {
            path: path.to_path_buf(),
        });
    }
    // SAFETY: opening a library runs its initialisers; the caller names a BLAS to run.
    let library = unsafe { libloading::Library::new(path) }.map_err(|e| fail(e.to_string()))?;
    // SAFETY (the three lookups): each name is that of a C function with the given signature
    // in the libraries listed above.
    let config = CONFIG.iter().find_map(|name| unsafe {
        let get = library.get::<GetConfig>(name.as_bytes()).ok()?;
        let text = get();
        (!text.is_null()).then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
    });
    // OpenBLAS built with 64-bit integers may export them under the plain names too.
    let config_ilp64 = config.as_ref().is_some_and(|c| c.contains("USE64BITINT"));
    let sgemm = SGEMM
        .iter()
        .find_map(|(name, ilp64)| unsafe {
            Some(if *ilp64 || config_ilp64 {
                Sgemm::Ilp64(*library.get::<SgemmIlp64>(name.as_bytes()).ok()?)
            } else {
                Sgemm::Lp64(*library.get::<SgemmLp64>(name.as_bytes()).ok()?)
            })
        })
        .or_else(|| unsafe {
            Some(Sgemm::Fortran(
                *library.get::<SgemmFortran>(b"sgemm_").ok()?,
            ))
        })
        .ok_or_else(|| fail(format!("no cblas_sgemm (looked for {SGEMM:?}) or sgemm_")))?;
    let set_local_threads = SET_LOCAL_THREADS
        .iter()
        .find_map(|name| unsafe { Some(*library.get::<SetLocalThreads>(name.as_bytes()).ok()?) })
        .ok_or_else(|| {
            fail(format!(
                "no thread-local thread count (looked for {SET_LOCAL_THREADS:?}; OpenBLAS has it from 0.3.27)"
            ))
        })?;
    // SAFETY: as above.
    let mkl = unsafe { library.get::<SetLocalThreads>(b"MKL_Set_Num_Threads_Local") }.is_ok();
    let kind = if mkl { "MKL" } else { "BLAS" };
    let ilp64 = matches!(sgemm, Sgemm::Ilp64(_));
    // SAFETY: as above (MKL's LP64 interface; an ILP64 library's would take 64-bit integers).
    let gemm_f16 = (!ilp64)
        .then(|| unsafe { Some(*library.get::<GemmF16>(b"cblas_gemm_f16f16f32").ok()?) })
        .flatten();
    let mut library = Library {
        info: BlasInfo {
            path: path.to_path_buf(),
            description: config.unwrap_or_else(|| kind.to_string()),
            ilp64,
            f16_gemm: gemm_f16.is_some(),
        },
        sgemm,
        gemm_f16,
        set_local_threads,
        _library: library,
    };
    // [[1, 2], [3, 4]] · [[5, 6], [7, 8]]ᵀ, which a wrong integer width would not give.
    let (a, b, mut c) = ([1f32, 2., 3., 4.], [5f32, 6., 7., 8.], [0f32; 4]);
    // SAFETY: 2 × 2 row-major operands and output.
    unsafe { library.call(2, 2, 2, 1.0, (&a, false, 2), (&b, true, 2), 0.0, &mut c, 2) };
    if c != [17., 23., 39., 53.] {
        return Err(fail(format!(
            "its sgemm computed {c:?} for a product that is [17, 23, 39, 53]"
        )));
    }
    let (a, b) = (
        [1., 2., 3., 4.].map(f16::from_f32),
        [5., 6., 7., 8.].map(f16::from_f32),
    );
    let mut c = [0f32; 4];
    // SAFETY: 2 × 2 row-major operands and output.
    let ran = unsafe {
        library.gemm_f16_nt(
            2,
            2,
            2,
            (a.as_ptr(), 2),
            (b.as_ptr(), 2),
            false,
            c.as_mut_ptr(),
            2,
        )
    };
    if ran && c != [17., 23., 39., 53.] {
        // Not an error: f16 layers then take f32 copies through its sgemm.
        library.gemm_f16 = None;
        library.info.f16_gemm = false;
    }
    let info = library.info.clone();
    *CURRENT.write().unwrap_or_else(|e| e.into_inner()) = Some(Box::leak(Box::new(library)));
    Ok(info)
}

/// Stops using a loaded library (the kernels go back to faer); the library stays open.
pub fn unload() {
    *CURRENT.write().unwrap_or_else(|e| e.into_inner()) = None;
}

/// The library the kernels use, if any.
pub fn current() -> Option<BlasInfo> {
    library().map(|l| l.info.clone())
}

pub(crate) fn library() -> Option<&'static Library> {
    *CURRENT.read().unwrap_or_else(|e| e.into_inner())
}

impl Library {
    /// `dst = alpha · lhs·rhs [+ dst]` on this thread, where each matrix has a unit stride along
    /// one of its axes (else `false`, nothing done).
    pub(crate) fn sgemm(
        &self,
        dst: faer::MatMut<'_, f32>,
        accumulate: bool,
        lhs: faer::MatRef<'_, f32>,
        rhs: faer::MatRef<'_, f32>,
        alpha: f32,
    ) -> bool {
        let (n, m, k) = (dst.nrows(), dst.ncols(), lhs.ncols());
        if n == 0 || m == 0 {
            return true;
        }
        // CBLAS's row-major output: a column-major `dst` is computed as dstᵀ = rhsᵀ·lhsᵀ.
        let (dst, lhs, rhs) = if dst.col_stride() == 1 {
            (dst, lhs, rhs)
        } else {
            (dst.transpose_mut(), rhs.transpose(), lhs.transpose())
        };
        let (n, m) = (dst.nrows(), dst.ncols());
        let Some(ldc) = leading(dst.row_stride(), dst.col_stride(), n, m) else {
            return false;
        };
        let (Some(a), Some(b)) = (operand(lhs), operand(rhs)) else {
            return false;
        };
        let beta = if accumulate { 1.0 } else { 0.0 };
        let dst = dst.as_ptr_mut();
        // SAFETY: the views' strides and sizes describe their memory (faer's invariant), and
        // the leading dimensions were derived from them.
        unsafe { self.call_raw(n, m, k, alpha, a, b, beta, dst, ldc) };
        true
    }

    /// Whether this library has an f16 GEMM ([`Self::gemm_f16_nt`]) whose integers hold these
    /// sizes.
    pub(crate) fn f16_gemm_fits<const N: usize>(&self, sizes: [usize; N]) -> bool {
        self.gemm_f16.is_some() && sizes.iter().all(|v| *v <= i32::MAX as usize)
    }

    /// `c (n × m, row-major, leading dimension ldc) = a·bᵀ [+ c]` for f16 `a (n × k)` and `b
    /// (m × k)`, each row-major with its leading dimension, with f32 sums of the exact products
    /// (as torch's f16 matmul), on this thread. `false`, nothing done, where the library has no
    /// f16 GEMM or a size does not fit its integers.
    ///
    /// # Safety
    /// The operands and the output hold what their sizes and leading dimensions describe.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_f16_nt(
        &self,
        n: usize,
        m: usize,
        k: usize,
        (a, lda): (*const f16, usize),
        (b, ldb): (*const f16, usize),
        accumulate: bool,
        c: *mut f32,
        ldc: usize,
    ) -> bool {
        if !self.f16_gemm_fits([n, m, k, lda, ldb, ldc]) || lda < k || ldb < k || ldc < m {
            return false;
        }
        let Some(gemm) = self.gemm_f16 else {
            return false;
        };
        let i = |v: usize| v as i32;
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: the caller's contract; sizes checked to fit.
        unsafe {
            let threads = (self.set_local_threads)(1);
            gemm(
                ROW_MAJOR,
                NO_TRANS,
                TRANS,
                i(n),
                i(m),
                i(k),
                1.0,
                a.cast(),
                i(lda),
                b.cast(),
                i(ldb),
                beta,
                c,
                i(ldc),
            );
            (self.set_local_threads)(threads);
        }
        true
    }

    /// [`Self::call_raw`] on slices: `(data, transposed, leading dimension)` per operand.
    #[allow(clippy::too_many_arguments)]
    unsafe fn call(
        &self,
        n: usize,
        m: usize,
        k: usize,
        alpha: f32,
        a: (&[f32], bool, usize),
        b: (&[f32], bool, usize),
        beta: f32,
        c: &mut [f32],
        ldc: usize,
    ) {
        let (a, b) = ((a.0.as_ptr(), a.1, a.2), (b.0.as_ptr(), b.1, b.2));
        // SAFETY: forwarded from the caller.
        unsafe { self.call_raw(n, m, k, alpha, a, b, beta, c.as_mut_ptr(), ldc) }
    }

    /// `c (n × m, row-major, leading dimension ldc) = alpha · op(a)·op(b) + beta · c` with the
    /// library's own threads off for this call.
    #[allow(clippy::too_many_arguments)]
    unsafe fn call_raw(
        &self,
        n: usize,
        m: usize,
        k: usize,
        alpha: f32,
        (a, a_t, lda): (*const f32, bool, usize),
        (b, b_t, ldb): (*const f32, bool, usize),
        beta: f32,
        c: *mut f32,
        ldc: usize,
    ) {
        let trans = |t: bool| if t { TRANS } else { NO_TRANS };
        // SAFETY: forwarded from the caller; the library's functions take these arguments.
        unsafe {
            let threads = (self.set_local_threads)(1);
            match self.sgemm {
                Sgemm::Lp64(f) => {
                    // Every size and leading dimension was checked to fit (`leading`).
                    let i = |v: usize| v as i32;
                    f(
                        ROW_MAJOR,
                        trans(a_t),
                        trans(b_t),
                        i(n),
                        i(m),
                        i(k),
                        alpha,
                        a,
                        i(lda),
                        b,
                        i(ldb),
                        beta,
                        c,
                        i(ldc),
                    )
                }
                Sgemm::Fortran(f) => {
                    // Column-major: the row-major c = a·b is cᵀ = bᵀ·aᵀ, each matrix's memory
                    // read as its transpose, so the operands swap and keep their flags.
                    let i = |v: usize| v as i32;
                    let flag = |t: bool| if t { c"T".as_ptr() } else { c"N".as_ptr() };
                    let (m, n, k, lda, ldb, ldc) = (i(m), i(n), i(k), i(lda), i(ldb), i(ldc));
                    f(
                        flag(b_t),
                        flag(a_t),
                        &m,
                        &n,
                        &k,
                        &alpha,
                        b,
                        &ldb,
                        a,
                        &lda,
                        &beta,
                        c,
                        &ldc,
                    )
                }
                Sgemm::Ilp64(f) => f(
                    ROW_MAJOR,
                    trans(a_t),
                    trans(b_t),
                    n as i64,
                    m as i64,
                    k as i64,
                    alpha,
                    a,
                    lda as i64,
                    b,
                    ldb as i64,
                    beta,
                    c,
                    ldc as i64,
                ),
            }
            (self.set_local_threads)(threads);
        }
    }
}

/// A row-major operand `(pointer, transposed, leading dimension)` for CBLAS: its rows or its
/// columns contiguous.
fn operand(v: faer::MatRef<'_, f32>) -> Option<(*const f32, bool, usize)> {
    let (rows, cols) = (v.nrows(), v.ncols());
    if let Some(ld) = leading(v.row_stride(), v.col_stride(), rows, cols) {
        Some((v.as_ptr(), false, ld))
    } else {
        let ld = leading(v.col_stride(), v.row_stride(), cols, rows)?;
        Some((v.as_ptr(), true, ld))
    }
}

/// The leading dimension of a row-major `rows × cols` view with these strides, if it is one
/// (unit column stride, rows apart by at least `cols`) and fits a 32-bit BLAS.
fn leading(row_stride: isize, col_stride: isize, rows: usize, cols: usize) -> Option<usize> {
    let ld = if rows <= 1 {
        cols.max(1)
    } else {
        usize::try_from(row_stride).ok()?
    };
    let fits = (col_stride == 1 || cols <= 1) && ld >= cols.max(1);
    let small = [rows, cols, ld].iter().all(|v| *v <= i32::MAX as usize);
    (fits && small).then_some(ld)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_dimension_of_row_major_views_only() {
        assert_eq!(leading(8, 1, 3, 5), Some(8));
        assert_eq!(leading(5, 1, 3, 5), Some(5));
        assert_eq!(leading(4, 1, 3, 5), None, "rows overlap");
        assert_eq!(leading(1, 3, 3, 5), None, "columns not contiguous");
        assert_eq!(
            leading(0, 1, 1, 5),
            Some(5),
            "one row: its stride is never used"
        );
        assert_eq!(leading(7, 0, 3, 1), Some(7), "one column");
        assert_eq!(leading(-8, 1, 3, 5), None, "negative stride");
    }

    #[test]
    fn operands_transposed_when_their_columns_are_contiguous() {
        let data = [0f32; 12];
        let rows = faer::MatRef::from_row_major_slice(&data, 3, 4);
        assert_eq!(operand(rows).map(|o| (o.1, o.2)), Some((false, 4)));
        let columns = faer::MatRef::from_column_major_slice(&data, 3, 4);
        assert_eq!(operand(columns).map(|o| (o.1, o.2)), Some((true, 3)));
    }

    #[test]
    fn a_missing_or_unusable_library_is_an_error_that_changes_nothing() {
        let before = current();
        let missing = load("/no/such/libblas.so").unwrap_err();
        assert!(
            matches!(missing, PeftError::FileNotFound { .. }),
            "{missing}"
        );
        // An existing file that is not a shared library with a BLAS in it.
        let not_blas = std::env::current_exe().unwrap();
        let error = load(&not_blas).unwrap_err();
        assert!(matches!(error, PeftError::Library { .. }), "{error}");
        assert!(error.to_string().contains(&not_blas.display().to_string()));
        assert_eq!(current(), before);
    }
}
