//! Config classes (`peft_rs.LoraConfig`, `peft_rs.IA3Config`): PEFT's keyword names, defaults and
//! dict form; each wraps the core config of its method.

use peft_rs::config::AdapterConfig;
use peft_rs::{AdaLoraConfig, Ia3Config, LoraConfig, PeftConfig, VeraConfig};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_pyerr;
use crate::json::{from_json, to_json};

macro_rules! config_class {
    ($py_name:literal, $cls:ident, $core:ty, $variant:ident, $doc:literal) => {
        #[doc = $doc]
        #[pyclass(name = $py_name, module = "peft_rs._core", frozen, eq, skip_from_py_object)]
        #[derive(Clone, PartialEq)]
        pub struct $cls {
            pub inner: $core,
        }

        #[pymethods]
        impl $cls {
            #[new]
            #[pyo3(signature = (**kwargs))]
            fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
                let value = match kwargs {
                    Some(k) => to_json(k.as_any())?,
                    None => serde_json::Value::Object(Default::default()),
                };
                Ok(Self {
                    inner: <$core>::from_json(value).map_err(to_pyerr)?,
                })
            }

            /// Builds a config from a dict as `to_dict()` or PEFT's `to_dict()` returns.
            #[staticmethod]
            fn from_dict(d: &Bound<'_, PyDict>) -> PyResult<Self> {
                Ok(Self {
                    inner: <$core>::from_json(to_json(d.as_any())?).map_err(to_pyerr)?,
                })
            }

            /// The config as PEFT's `to_dict()` gives it (every field PEFT writes).
            fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                from_json(py, &self.inner.to_json())
            }

            #[getter]
            fn peft_type(&self) -> &'static str {
                self.inner.peft_type().as_str()
            }

            /// Every PEFT field is readable as an attribute (`config.r`, `config.target_modules`...).
            fn __getattr__<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
                match self.inner.to_json().get(name) {
                    Some(v) => from_json(py, v),
                    None => Err(pyo3::exceptions::PyAttributeError::new_err(format!(
                        "{} has no field {name:?}",
                        $py_name
                    ))),
                }
            }

            fn __repr__(&self) -> String {
                format!("{}({})", $py_name, self.inner.to_json())
            }
        }

        impl $cls {
            pub fn peft_config(&self) -> PeftConfig {
                PeftConfig::$variant(self.inner.clone())
            }
        }
    };
}

config_class!(
    "LoraConfig",
    PyLoraConfig,
    LoraConfig,
    Lora,
    "LoRA configuration (`peft.LoraConfig`)."
);
config_class!(
    "IA3Config",
    PyIa3Config,
    Ia3Config,
    Ia3,
    "IA³ configuration (`peft.IA3Config`)."
);
config_class!(
    "VeraConfig",
    PyVeraConfig,
    VeraConfig,
    Vera,
    "VeRA configuration (`peft.VeraConfig`)."
);
config_class!(
    "AdaLoraConfig",
    PyAdaLoraConfig,
    AdaLoraConfig,
    AdaLora,
    "AdaLoRA configuration (`peft.AdaLoraConfig`)."
);

/// A Python object for any config.
pub fn config_to_py(py: Python<'_>, config: &PeftConfig) -> PyResult<Py<PyAny>> {
    match config {
        PeftConfig::Lora(c) => Ok(Py::new(py, PyLoraConfig { inner: c.clone() })?.into_any()),
        PeftConfig::Ia3(c) => Ok(Py::new(py, PyIa3Config { inner: c.clone() })?.into_any()),
        PeftConfig::AdaLora(c) => Ok(Py::new(py, PyAdaLoraConfig { inner: c.clone() })?.into_any()),
        PeftConfig::Vera(c) => Ok(Py::new(py, PyVeraConfig { inner: c.clone() })?.into_any()),
    }
}

/// The core config of any config object.
pub fn config_from_py(obj: &Bound<'_, PyAny>) -> PyResult<PeftConfig> {
    if let Ok(c) = obj.cast::<PyLoraConfig>() {
        return Ok(c.get().peft_config());
    }
    if let Ok(c) = obj.cast::<PyIa3Config>() {
        return Ok(c.get().peft_config());
    }
    if let Ok(c) = obj.cast::<PyAdaLoraConfig>() {
        return Ok(c.get().peft_config());
    }
    if let Ok(c) = obj.cast::<PyVeraConfig>() {
        return Ok(c.get().peft_config());
    }
    Err(crate::errors::type_error(format!(
        "expected a peft_rs config (LoraConfig, AdaLoraConfig, IA3Config, VeraConfig), found {}",
        obj.get_type().name()?
    )))
}
