//! `peft_rs.Tokenizer`: a model directory's `tokenizer.json` through the `tokenizers` crate.

use std::path::PathBuf;

use peft_rs::model::Tokenizer;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::dlpack::ArrayKind;
use crate::errors::{run, value_error};

#[pyclass(name = "Tokenizer", module = "peft_rs._core", frozen)]
pub struct PyTokenizer {
    inner: Tokenizer,
}

#[pymethods]
impl PyTokenizer {
    #[staticmethod]
    fn from_pretrained(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = run(py, || Tokenizer::from_dir(&path))?;
        Ok(Self { inner })
    }

    /// `{"input_ids", "attention_mask", "token_type_ids"}`, padded to the longest text and, with
    /// `max_length`, truncated to it (transformers' `padding=True, truncation=True`); int64
    /// numpy arrays, or torch tensors with `return_tensors="pt"`.
    #[pyo3(signature = (texts, max_length=None, return_tensors="np"))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        max_length: Option<usize>,
        return_tensors: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let kind = match return_tensors {
            "np" => ArrayKind::Numpy,
            "pt" => ArrayKind::Torch,
            other => {
                return Err(value_error(format!(
                    "return_tensors must be \"np\" or \"pt\", found {other:?}"
                )));
            }
        };
        let inner = &self.inner;
        let encoded = run(py, || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            inner.encode(&refs, max_length)
        })?;
        let out = PyDict::new(py);
        out.set_item("input_ids", kind.wrap(py, encoded.input_ids)?)?;
        for (name, t) in [
            ("attention_mask", encoded.attention_mask),
            ("token_type_ids", encoded.token_type_ids),
        ] {
            if let Some(t) = t {
                out.set_item(name, kind.wrap(py, t)?)?;
            }
        }
        Ok(out)
    }
}
