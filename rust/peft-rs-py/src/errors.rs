//! `PeftError` → the matching `peft_rs.errors` class, and a guard that keeps panics out of Python.

use peft_rs::PeftError;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyType;

/// The Python class (in `peft_rs/errors.py`) for each variant.
fn class_name(e: &PeftError) -> &'static str {
    match e {
        PeftError::ShapeMismatch { .. } => "ShapeError",
        PeftError::MissingKey { .. } => "MissingKeyError",
        PeftError::UnexpectedKey { .. } => "UnexpectedKeyError",
        PeftError::InvalidConfig { .. } => "ConfigError",
        PeftError::UnsupportedPeftType { .. } => "UnsupportedPeftTypeError",
        PeftError::DType { .. } => "DTypeError",
        PeftError::InvalidOperation(_) => "InvalidOperationError",
        PeftError::NonFiniteMerge { .. } => "NonFiniteMergeError",
        PeftError::FileNotFound { .. } => "AdapterFileNotFoundError",
        PeftError::Io { .. } => "AdapterIOError",
        PeftError::Json { .. } | PeftError::InvalidWeightsFile { .. } => "InvalidFileError",
        PeftError::Library { .. } => "LibraryError",
        PeftError::Candle(_) => "ComputeError",
    }
}

pub fn to_pyerr(e: PeftError) -> PyErr {
    raise(class_name(&e), e.to_string())
}

/// An instance of the `peft_rs.errors` class `class` with `message`.
fn raise(class: &str, message: String) -> PyErr {
    Python::attach(|py| {
        let class = py
            .import("peft_rs.errors")
            .and_then(|m| m.getattr(class))
            .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
        match class {
            Ok(class) => PyErr::from_type(class, message),
            Err(import_error) => import_error,
        }
    })
}

/// An argument of the wrong Python type (`ArgumentTypeError`, also a `TypeError`).
pub fn type_error(message: impl Into<String>) -> PyErr {
    raise("ArgumentTypeError", message.into())
}

/// An argument with an invalid value (`InvalidArgumentError`, also a `ValueError`).
pub fn value_error(message: impl Into<String>) -> PyErr {
    raise("InvalidArgumentError", message.into())
}

pub fn candle_err(e: candle_core::Error) -> PyErr {
    to_pyerr(PeftError::Candle(e))
}

/// [`run`] for inference: no autograd graph is recorded (`torch.no_grad()`), so outputs handed
/// to Python keep no intermediate tensors alive.
pub fn run_inference<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> peft_rs::Result<T> + Send,
) -> PyResult<T> {
    run(py, || peft_rs::params::no_grad(f))
}

/// Runs `f` without the GIL, turning errors into Python exceptions and panics into
/// `RuntimeError` (a panic must never unwind into the interpreter).
pub fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> peft_rs::Result<T> + Send) -> PyResult<T> {
    let result = py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_pyerr(e)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(PyRuntimeError::new_err(format!(
                "internal error in peft-rs: {msg}"
            )))
        }
    }
}
