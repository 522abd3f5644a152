//! `peft_rs.PeftConfig` and, for every registered method, a subclass under PEFT's class name
//! (`LoraConfig`, `LoHaConfig`...) made from the registry when the module loads: PEFT's keyword
//! names, defaults and dict form, with the core doing all parsing and validation.

use peft_rs::PeftConfig;
use peft_rs::registry::{self, METHODS};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::errors::{to_pyerr, type_error};
use crate::json::{from_json, to_json};

/// Class attribute of each method's subclass naming its `peft_type`.
const PEFT_TYPE_ATTR: &str = "_peft_type";

/// A PEFT config of any method; instantiate a method's subclass (`peft_rs.LoraConfig(r=8)`),
/// or `PeftConfig.from_dict(d)` with `d["peft_type"]`.
#[pyclass(
    name = "PeftConfig",
    module = "peft_rs._core",
    subclass,
    frozen,
    eq,
    skip_from_py_object
)]
#[derive(Clone, PartialEq)]
pub struct PyPeftConfig {
    pub inner: PeftConfig,
}

fn class_peft_type(cls: &Bound<'_, PyType>) -> PyResult<Option<String>> {
    match cls.getattr(PEFT_TYPE_ATTR) {
        Ok(t) => Ok(Some(t.extract()?)),
        Err(_) => Ok(None),
    }
}

#[pymethods]
impl PyPeftConfig {
    #[new]
    #[classmethod]
    #[pyo3(signature = (**kwargs))]
    fn new(cls: &Bound<'_, PyType>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let peft_type = class_peft_type(cls)?.ok_or_else(|| {
            type_error("PeftConfig is abstract: use a method's class (LoraConfig...) or PeftConfig.from_dict")
        })?;
        let value = match kwargs {
            Some(k) => to_json(k.as_any())?,
            None => serde_json::Value::Object(Default::default()),
        };
        let entry = registry::method(&peft_type).map_err(to_pyerr)?;
        Ok(Self {
            inner: PeftConfig::new((entry.from_json)(value).map_err(to_pyerr)?)
                .map_err(to_pyerr)?,
        })
    }

    /// A config from a dict as `to_dict()` or PEFT's `to_dict()` gives it. On `PeftConfig`
    /// itself, `d["peft_type"]` picks the method.
    #[classmethod]
    fn from_dict(cls: &Bound<'_, PyType>, d: &Bound<'_, PyDict>) -> PyResult<Py<PyAny>> {
        let mut value = to_json(d.as_any())?;
        if let (Some(t), serde_json::Value::Object(map)) = (class_peft_type(cls)?, &mut value) {
            map.entry("peft_type").or_insert(t.into());
        }
        let config = PeftConfig::from_json(value).map_err(to_pyerr)?;
        config_to_py(cls.py(), &config)
    }

    /// The config as PEFT's `to_dict()` gives it (every field PEFT writes).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        from_json(py, &self.inner.to_json())
    }

    /// PEFT's `peft_type` (`"LORA"`...).
    #[getter]
    fn peft_type(&self) -> &'static str {
        self.inner.peft_type()
    }

    /// The tensor names a module's adapter can have in files (`"lora_A.weight"`...).
    #[getter]
    fn param_names(&self) -> Vec<&'static str> {
        self.inner.param_names().to_vec()
    }

    /// Names of adapter-wide tensors, saved as `base_model.<name>` (VeRA's projections).
    #[getter]
    fn shared_names(&self) -> Vec<&'static str> {
        self.inner.shared_names().to_vec()
    }

    /// Every PEFT field is readable as an attribute (`config.r`, `config.target_modules`...).
    fn __getattr__<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        match self.inner.to_json().get(name) {
            Some(v) => from_json(py, v),
            None => Err(pyo3::exceptions::PyAttributeError::new_err(format!(
                "{} has no field {name:?}",
                class_name(&self.inner)
            ))),
        }
    }

    fn __repr__(&self) -> String {
        format!("{}({})", class_name(&self.inner), self.inner.to_json())
    }
}

fn class_name(config: &PeftConfig) -> &'static str {
    registry::method(config.peft_type())
        .map(|m| m.config_class)
        .unwrap_or("PeftConfig")
}

/// Adds `PeftConfig` and one subclass per registered method to the module.
pub fn add_config_classes(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyPeftConfig>()?;
    let base = py.get_type::<PyPeftConfig>();
    for method in METHODS {
        let attrs = PyDict::new(py);
        attrs.set_item(PEFT_TYPE_ATTR, method.peft_type)?;
        attrs.set_item("__module__", "peft_rs._core")?;
        attrs.set_item(
            "__doc__",
            format!(
                "PEFT's {} (peft_type {:?}): same keyword names, defaults and dict form.",
                method.config_class, method.peft_type
            ),
        )?;
        let bases = PyTuple::new(py, [&base])?;
        let cls = py
            .get_type::<PyType>()
            .call1((method.config_class, bases, attrs))?;
        m.add(method.config_class, cls)?;
    }
    Ok(())
}

/// The Python config object (of its method's class) for a core config: the class is called
/// with the config's own dict, which the core reads back to an equal config.
pub fn config_to_py(py: Python<'_>, config: &PeftConfig) -> PyResult<Py<PyAny>> {
    let cls = py.import("peft_rs._core")?.getattr(class_name(config))?;
    let kwargs = from_json(py, &config.to_json())?.cast_into::<PyDict>()?;
    Ok(cls.call((), Some(&kwargs))?.unbind())
}

/// A core config from a `PeftConfig` (any subclass).
pub fn config_from_py(obj: &Bound<'_, PyAny>) -> PyResult<PeftConfig> {
    obj.cast::<PyPeftConfig>()
        .map(|c| c.get().inner.clone())
        .map_err(|_| type_error("config must be a peft_rs config (LoraConfig, IA3Config...)"))
}
