//! `peft_rs.merge_checkpoint`: the streaming merge of `peft_rs::stream_merge`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use peft_rs::PeftError;
use peft_rs::stream_merge::merge_checkpoint as merge;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::run;
use crate::model::parse_dtype;

/// Merges the adapters in `adapter_dirs` into the transformers checkpoint `base_dir`, tensor by
/// tensor, writing `out_dir` with the same shards. `progress(done, total)` (bytes) is called
/// after each tensor; an exception it raises (or Ctrl-C) stops the merge. Returns
/// `{"written": [...], "skipped": [...], "total_bytes": n}`.
#[pyfunction]
#[pyo3(signature = (base_dir, adapter_dirs, out_dir, weights=None, dtype=None, resume=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn merge_checkpoint<'py>(
    py: Python<'py>,
    base_dir: PathBuf,
    adapter_dirs: Vec<PathBuf>,
    out_dir: PathBuf,
    weights: Option<Vec<f64>>,
    dtype: Option<&Bound<'py, PyAny>>,
    resume: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let dtype = dtype.map(parse_dtype).transpose()?;
    // An exception raised by the callback, handed back once the merge has stopped.
    let raised: Mutex<Option<PyErr>> = Mutex::new(None);
    let result = run(py, || {
        let dirs: Vec<&Path> = adapter_dirs.iter().map(PathBuf::as_path).collect();
        let mut report = |done: u64, total: u64| -> peft_rs::Result<()> {
            let outcome = Python::attach(|py| {
                py.check_signals()?;
                match &progress {
                    Some(callback) => callback.call1(py, (done, total)).map(|_| ()),
                    None => Ok(()),
                }
            });
            outcome.map_err(|e| {
                if let Ok(mut slot) = raised.lock() {
                    *slot = Some(e);
                }
                PeftError::InvalidOperation("merge stopped by the progress callback".into())
            })
        };
        merge(
            &base_dir,
            &dirs,
            weights.as_deref(),
            &out_dir,
            dtype,
            resume,
            &mut report,
        )
    });
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => {
            let callback_error = raised.lock().ok().and_then(|mut slot| slot.take());
            return Err(callback_error.unwrap_or(e));
        }
    };
    let out = PyDict::new(py);
    out.set_item("written", summary.written)?;
    out.set_item("skipped", summary.skipped)?;
    out.set_item("total_bytes", summary.total_bytes)?;
    Ok(out)
}
