//! `peft_rs._core.Model`: a reference model (BERT, Llama...) loaded from a transformers-format
//! directory; `peft_rs.models` names one class per architecture over it.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use peft_rs::model::{self, Model, ModelInput};
use pyo3::prelude::*;

use crate::dlpack::{ArrayKind, tensor_from_py};
use crate::errors::{run, run_inference, value_error};

#[pyclass(name = "Model", module = "peft_rs._core", frozen)]
pub struct PyModel {
    pub inner: Arc<dyn Model>,
}

/// `"float32"`, `"float16"`, `"bfloat16"` (PyTorch's names; `torch.float32` works too).
pub fn parse_dtype(dtype: &Bound<'_, PyAny>) -> PyResult<DType> {
    let name = dtype.str()?.to_string();
    Ok(match name.trim_start_matches("torch.") {
        "float32" | "float" => DType::F32,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        other => {
            return Err(value_error(format!(
                "dtype must be float32, float16 or bfloat16, found {other:?}"
            )));
        }
    })
}

/// A model input from Python arrays (token ids and the optional masks).
pub fn input(
    input_ids: &Bound<'_, PyAny>,
    attention_mask: Option<&Bound<'_, PyAny>>,
    token_type_ids: Option<&Bound<'_, PyAny>>,
) -> PyResult<ModelInput> {
    Ok(ModelInput {
        input_ids: tensor_from_py(input_ids)?,
        attention_mask: attention_mask.map(tensor_from_py).transpose()?,
        token_type_ids: token_type_ids.map(tensor_from_py).transpose()?,
    })
}

#[pymethods]
impl PyModel {
    /// Loads the transformers-format directory `path` as `architecture` (a transformers class
    /// name, e.g. `"BertModel"`), in `dtype`. `num_labels` (sequence classification) starts a
    /// fine-tuning head as transformers does: a head missing from the checkpoint is
    /// initialised from `seed`.
    #[staticmethod]
    #[pyo3(signature = (architecture, path, dtype=None, num_labels=None, seed=0))]
    fn from_pretrained(
        py: Python<'_>,
        architecture: &str,
        path: PathBuf,
        dtype: Option<&Bound<'_, PyAny>>,
        num_labels: Option<usize>,
        seed: u64,
    ) -> PyResult<Self> {
        let dtype = dtype.map(parse_dtype).transpose()?.unwrap_or(DType::F32);
        let inner = run(py, || match num_labels {
            None => model::load(architecture, &path, dtype, &Device::Cpu),
            Some(n) => model::load_for_labels(architecture, &path, dtype, &Device::Cpu, n, seed),
        })?;
        Ok(Self {
            inner: Arc::from(inner),
        })
    }

    /// The model's output (last hidden state or logits) for token ids `(batch, seq)`; returns
    /// `input_ids`' array type.
    #[pyo3(signature = (input_ids, attention_mask=None, token_type_ids=None))]
    pub fn forward<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        token_type_ids: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kind = ArrayKind::of(input_ids)?;
        let input = input(input_ids, attention_mask, token_type_ids)?;
        let model = &self.inner;
        let out = run_inference(py, || model.forward(&input))?;
        kind.wrap(py, out)
    }

    #[pyo3(signature = (input_ids, attention_mask=None, token_type_ids=None))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        token_type_ids: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.forward(py, input_ids, attention_mask, token_type_ids)
    }

    /// Greedy decoding: `input_ids` with `max_new_tokens` generated tokens appended.
    #[pyo3(signature = (input_ids, max_new_tokens=20, attention_mask=None))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        max_new_tokens: usize,
        attention_mask: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kind = ArrayKind::of(input_ids)?;
        let input = input(input_ids, attention_mask, None)?;
        let model = &self.inner;
        let out = run_inference(py, || model.generate(&input, max_new_tokens))?;
        kind.wrap(py, out)
    }

    /// transformers' class name of the model.
    #[getter]
    fn architecture(&self) -> &'static str {
        self.inner.architecture()
    }

    /// Paths of the targetable layers, in build order.
    fn module_names(&self) -> Vec<String> {
        self.inner
            .modules()
            .layers()
            .iter()
            .map(|l| l.path().to_string())
            .collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "Model({}, {} targetable layers)",
            self.inner.architecture(),
            self.inner.modules().layers().len()
        )
    }
}
