//! `peft_rs.LoraConfig`.

use peft_rs::config::AdapterConfig;
use peft_rs::{LoraConfig, PeftConfig};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_pyerr;
use crate::json::{from_json, to_json};

/// LoRA configuration with PEFT's keyword names and defaults (`peft.LoraConfig`).
#[pyclass(
    name = "LoraConfig",
    module = "peft_rs._core",
    frozen,
    eq,
    skip_from_py_object
)]
#[derive(Clone, PartialEq)]
pub struct PyLoraConfig {
    pub inner: LoraConfig,
}

#[pymethods]
impl PyLoraConfig {
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let value = match kwargs {
            Some(k) => to_json(k.as_any())?,
            None => serde_json::Value::Object(Default::default()),
        };
        Ok(Self {
            inner: LoraConfig::from_json(value).map_err(to_pyerr)?,
        })
    }

    /// Builds a config from a dict as `to_dict()` or PEFT's `LoraConfig.to_dict()` returns.
    #[staticmethod]
    fn from_dict(d: &Bound<'_, PyDict>) -> PyResult<Self> {
        Ok(Self {
            inner: LoraConfig::from_json(to_json(d.as_any())?).map_err(to_pyerr)?,
        })
    }

    /// The config as PEFT's `to_dict()` gives it (every field PEFT writes).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        from_json(py, &self.inner.to_json())
    }

    #[getter]
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    /// Every PEFT field is readable as an attribute (`config.r`, `config.target_modules`...).
    fn __getattr__<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        match self.inner.to_json().get(name) {
            Some(v) => from_json(py, v),
            None => Err(pyo3::exceptions::PyAttributeError::new_err(format!(
                "LoraConfig has no field {name:?}"
            ))),
        }
    }

    fn __repr__(&self) -> String {
        format!("LoraConfig({})", self.inner.to_json())
    }
}

impl PyLoraConfig {
    pub fn peft_config(&self) -> PeftConfig {
        PeftConfig::Lora(self.inner.clone())
    }
}

/// A Python object for any config.
pub fn config_to_py(py: Python<'_>, config: &PeftConfig) -> PyResult<Py<PyAny>> {
    match config {
        PeftConfig::Lora(c) => Ok(Py::new(py, PyLoraConfig { inner: c.clone() })?.into_any()),
    }
}
