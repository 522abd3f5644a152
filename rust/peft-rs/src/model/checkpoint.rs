//! transformers-format model directories: `config.json` and `model.safetensors`, or shards listed
//! in `model.safetensors.index.json`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{PeftError, Result};

pub const MODEL_CONFIG: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// The model's `config.json` as `T` (a field of the wrong type is an error naming it).
pub fn read_model_config<T: DeserializeOwned>(dir: &Path) -> Result<T> {
    let path = dir.join(MODEL_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io(&path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: path.clone(),
        source,
    })?;
    crate::config::deserialize_fields(value)
}

/// The weight files of a model directory: `model.safetensors`, or every shard the index names.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(SHARD_INDEX);
    if !index.is_file() {
        return Err(PeftError::FileNotFound { path: single });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| PeftError::io(&index, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: index.clone(),
        source,
    })?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| PeftError::InvalidWeightsFile {
            path: index.clone(),
            reason: "no `weight_map` object".into(),
        })?;
    let shards: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
    shards
        .into_iter()
        .map(|name| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(PeftError::FileNotFound { path })
            }
        })
        .collect()
}

/// A `VarBuilder` over a model directory's weights, memory-mapped and converted to `dtype` as
/// each tensor is read.
pub fn var_builder(dir: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let files = weight_files(dir)?;
    // SAFETY: the files are mapped read-only; like every memory-mapped reader, this assumes no
    // other process truncates them while the model is alive.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) };
    vb.map_err(|e| PeftError::InvalidWeightsFile {
        path: files[0].clone(),
        reason: e.to_string(),
    })
}
