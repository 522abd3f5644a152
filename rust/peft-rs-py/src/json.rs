//! Python values ↔ JSON values, for configs passed as keyword arguments or dicts.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString, PyTuple};
use serde_json::{Map, Value};

/// Converts dict/list/tuple/set/str/int/float/bool/None (and str-valued enums, as PEFT's
/// `PeftType` is) to JSON. Sets become sorted lists, as their order carries no meaning.
pub fn to_json(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    if obj.is_none() {
        Ok(Value::Null)
    } else if let Ok(b) = obj.cast::<PyBool>() {
        Ok(Value::Bool(b.is_true()))
    } else if obj.is_instance_of::<PyInt>() {
        Ok(Value::from(obj.extract::<i64>()?))
    } else if obj.is_instance_of::<PyFloat>() {
        Ok(Value::from(obj.extract::<f64>()?))
    } else if obj.is_instance_of::<PyString>() {
        // str subclasses (enums) serialise as their value.
        Ok(Value::String(obj.extract::<String>()?))
    } else if let Ok(d) = obj.cast::<PyDict>() {
        let mut map = Map::new();
        for (k, v) in d.iter() {
            let key: String = k
                .extract()
                .map_err(|_| crate::errors::type_error("config dict keys must be str"))?;
            map.insert(key, to_json(&v)?);
        }
        Ok(Value::Object(map))
    } else if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        Ok(Value::Array(
            obj.try_iter()?
                .map(|v| to_json(&v?))
                .collect::<PyResult<_>>()?,
        ))
    } else if obj.is_instance_of::<PySet>() || obj.is_instance_of::<PyFrozenSet>() {
        let mut items: Vec<Value> = obj
            .try_iter()?
            .map(|v| to_json(&v?))
            .collect::<PyResult<_>>()?;
        items.sort_by_key(|v| v.to_string());
        Ok(Value::Array(items))
    } else {
        Err(crate::errors::type_error(format!(
            "cannot use a {} in a config",
            obj.get_type().name()?
        )))
    }
}

pub fn from_json<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    let json = py.import("json")?;
    json.getattr("loads")?.call1((value.to_string(),))
}
