//! `peft_rs._core.use_blas` / `blas_info`: the BLAS library of `peft_rs::blas`; `use_amx`: the
//! kernels' use of the AMX tiles.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_pyerr;

fn info_dict<'py>(py: Python<'py>, info: peft_rs::blas::BlasInfo) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("path", info.path)?;
    dict.set_item("description", info.description)?;
    dict.set_item("ilp64", info.ilp64)?;
    dict.set_item("f16_gemm", info.f16_gemm)?;
    Ok(dict)
}

/// Opens the BLAS library at `path` for the CPU kernels' f32 products (`None`: stop using one,
/// back to the built-in kernels); returns what `blas_info` returns.
#[pyfunction]
#[pyo3(signature = (path))]
pub fn use_blas(py: Python<'_>, path: Option<PathBuf>) -> PyResult<Option<Bound<'_, PyDict>>> {
    match path {
        Some(path) => {
            let info = peft_rs::blas::load(path).map_err(to_pyerr)?;
            info_dict(py, info).map(Some)
        }
        None => {
            peft_rs::blas::unload();
            Ok(None)
        }
    }
}

/// The BLAS library in use (`path`, `description`, `ilp64`, `f16_gemm`), or `None`.
#[pyfunction]
pub fn blas_info(py: Python<'_>) -> PyResult<Option<Bound<'_, PyDict>>> {
    peft_rs::blas::current()
        .map(|info| info_dict(py, info))
        .transpose()
}

/// Lets the CPU kernels use the AMX tiles where the CPU has them (the default) or not; returns
/// whether they are in use now.
#[pyfunction]
pub fn use_amx(enabled: bool) -> bool {
    peft_rs::use_amx(enabled)
}
