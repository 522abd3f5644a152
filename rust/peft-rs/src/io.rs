//! Adapter files as PEFT writes them: `adapter_model.safetensors` (or the legacy
//! `adapter_model.bin` pickle) with keys `base_model.model.<module>.<param>`. Writes are atomic.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{PeftError, Result};

pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
pub const LEGACY_WEIGHTS_NAME: &str = "adapter_model.bin";
/// Prefix of every module parameter in PEFT's files (`PeftModel.base_model.model`).
pub const MODEL_PREFIX: &str = "base_model.model.";

/// Reads the weights of an adapter directory, preferring safetensors as PEFT does.
pub fn read_adapter_weights(dir: &Path) -> Result<Vec<(String, Tensor)>> {
    let safetensors = dir.join(WEIGHTS_NAME);
    if safetensors.is_file() {
        return read_safetensors(&safetensors);
    }
    let legacy = dir.join(LEGACY_WEIGHTS_NAME);
    if legacy.is_file() {
        return read_pickle(&legacy);
    }
    Err(PeftError::FileNotFound { path: safetensors })
}

pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| PeftError::io(path, e))?;
    let invalid = |reason: String| PeftError::InvalidWeightsFile {
        path: path.to_path_buf(),
        reason,
    };
    // Parse the header first: it reports truncation and corruption precisely.
    safetensors::SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| invalid(e.to_string()))?;
    let mut tensors: Vec<_> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// Reads a `torch.save`d state dict (PEFT's `safe_serialization=False`).
pub fn read_pickle(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.is_file() {
        return Err(PeftError::FileNotFound {
            path: path.to_path_buf(),
        });
    }
    candle_core::pickle::read_all(path).map_err(|e| PeftError::InvalidWeightsFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Writes tensors as safetensors with PEFT's `{"format": "pt"}` metadata, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let data = tensors.iter().map(|(k, t)| (k.as_str(), t));
    let bytes = safetensors::serialize(data, Some(metadata)).map_err(|e| {
        PeftError::InvalidWeightsFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`, so
/// an interrupted save leaves either the old file or the new one, never a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        PeftError::InvalidOperation(format!("{} is not a file path", path.display()))
    })?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        PeftError::io(path, e)
    })
}
