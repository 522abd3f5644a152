//! Adapter configs and their `adapter_config.json` form.
//!
//! Field names and defaults are PEFT's. A config read from JSON keeps every field that peft-rs
//! implements; fields of PEFT features that peft-rs does not implement must hold PEFT's default
//! (they are rejected otherwise, naming the field), and are written back with that default so a
//! file we save has the key set PEFT writes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{PeftError, Result};
use crate::method::MethodConfig;
use crate::registry;

/// File name of the config inside an adapter directory.
pub const CONFIG_NAME: &str = "adapter_config.json";

/// The PEFT release whose files and numbers peft-rs follows (and tests against).
pub const PEFT_VERSION: &str = "0.21.2";

/// A config of any registered method: what an adapter directory holds.
#[derive(Debug, Clone)]
pub struct PeftConfig(Arc<dyn MethodConfig>);

impl PeftConfig {
    /// Wraps a method's config after validating it.
    pub fn new(config: Arc<dyn MethodConfig>) -> Result<Self> {
        config.validate()?;
        Ok(Self(config))
    }

    /// Reads PEFT's JSON form; `peft_type` picks the method from the registry.
    pub fn from_json(value: Value) -> Result<Self> {
        let peft_type = value
            .get("peft_type")
            .and_then(Value::as_str)
            .ok_or_else(|| PeftError::config("peft_type", "missing or not a string"))?;
        Self::new((registry::method(peft_type)?.from_json)(value)?)
    }

    pub fn to_json(&self) -> Value {
        self.0.to_json()
    }

    pub fn arc(&self) -> &Arc<dyn MethodConfig> {
        &self.0
    }

    /// The config with `target_modules="all-linear"` replaced by the module list it means in a
    /// model ([`crate::matching::all_linear_targets`]), as PEFT rewrites and saves it; the
    /// config itself otherwise.
    pub fn expand_all_linear(
        &self,
        modules: &[(String, crate::base::ModuleKind)],
        output_head: Option<&str>,
    ) -> Result<Self> {
        if !self.selection().is_all_linear() {
            return Ok(self.clone());
        }
        let mut value = self.to_json();
        let task_type = value.get("task_type").and_then(Value::as_str);
        let targets = crate::matching::all_linear_targets(modules, output_head, task_type);
        value["target_modules"] = Value::from(targets);
        Self::from_json(value)
    }
}

impl std::ops::Deref for PeftConfig {
    type Target = dyn MethodConfig;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl PartialEq for PeftConfig {
    fn eq(&self, other: &Self) -> bool {
        self.peft_type() == other.peft_type() && self.to_json() == other.to_json()
    }
}

/// Fields shared by every config (PEFT's `PeftConfig`). They describe the adapter, not its math.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CommonFields {
    pub task_type: Option<String>,
    pub auto_mapping: Option<Value>,
    pub peft_version: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
    pub inference_mode: bool,
}

const TASK_TYPES: &[&str] = &[
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
];

impl CommonFields {
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.task_type
            && !TASK_TYPES.contains(&t.as_str())
        {
            return Err(PeftError::config(
                "task_type",
                format!("{t:?} is not one of {TASK_TYPES:?}"),
            ));
        }
        Ok(())
    }
}

/// `target_modules` / `exclude_modules` / `modules_to_save`-like selectors: a list of names matched
/// as dot-bounded suffixes, or one regex matched against the whole module path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSelector {
    Names(Vec<String>),
    Regex(String),
}

/// `layers_to_transform`: one layer index or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            Self::One(v) => vec![v.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

/// Splits a JSON object into the fields a config type knows and checks the rest: fields of PEFT
/// features peft-rs lacks must hold PEFT's default; other unknown fields must be "off"
/// (null/false/empty), as a newer PEFT writes for features left unused.
pub(crate) fn check_extra_fields(
    extra: &Map<String, Value>,
    unsupported_defaults: &[(&str, Value)],
) -> Result<()> {
    for (key, value) in extra {
        let default = unsupported_defaults
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, d)| d);
        let ok = match default {
            Some(d) => value == d || value.is_null(),
            None => is_off(value),
        };
        if !ok {
            let reason = if default.is_some() {
                format!("{value} is not supported by peft-rs (only PEFT's default {default:?} is)")
            } else {
                format!("unknown field with value {value}; peft-rs does not implement it")
            };
            return Err(PeftError::config(key, reason));
        }
    }
    Ok(())
}

fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Checks that `value` is an object whose `peft_type` (if present) is `expected`, and removes it.
pub(crate) fn take_peft_type(value: &mut Value, expected: &str) -> Result<()> {
    let Value::Object(map) = value else {
        return Err(PeftError::config(
            "<root>",
            "a config must be a JSON object",
        ));
    };
    match map.remove("peft_type") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(t)) if t == expected => Ok(()),
        Some(other) => Err(PeftError::UnsupportedPeftType {
            found: other.to_string(),
            supported: expected.into(),
        }),
    }
}

/// A serde config read from PEFT's JSON form: `peft_type` (if present) checked and removed,
/// fields deserialised (a type error names the field), then validated.
pub(crate) fn parse_config<T>(value: Value, peft_type: &str) -> Result<T>
where
    T: serde::de::DeserializeOwned + MethodConfig,
{
    let mut value = value;
    take_peft_type(&mut value, peft_type)?;
    let config: T = deserialize_fields(value)?;
    config.validate()?;
    Ok(config)
}

/// Deserialises a config struct, naming the offending field on a type error.
pub(crate) fn deserialize_fields<T: serde::de::DeserializeOwned>(value: Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        PeftError::config(&field, e.into_inner().to_string())
    })
}

/// Sorts object keys recursively, as PEFT's `json.dumps(sort_keys=True)` does.
pub(crate) fn sort_keys(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sort_keys(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

/// Reads `adapter_config.json` (or any config file path).
pub fn read_config(path: &Path) -> Result<PeftConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    if !value.is_object() {
        return Err(PeftError::config(
            "<root>",
            format!("{} must hold a JSON object", path.display()),
        ));
    }
    PeftConfig::from_json(value)
}

/// Serialises a config as PEFT does: keys sorted recursively, 2-space indent, `inference_mode`
/// written as `true` (PEFT always saves it so).
pub fn config_to_file_json(config: &dyn MethodConfig) -> String {
    let mut value = config.to_json();
    if let Value::Object(map) = &mut value {
        map.insert("inference_mode".into(), Value::Bool(true));
    }
    let mut text = serde_json::to_string_pretty(&sort_keys(value)).expect("JSON values serialise");
    text.push('\n');
    text
}

/// Serialises a JSON number the way Python prints it: integral values without a fraction.
pub(crate) fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}
