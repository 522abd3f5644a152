//! Trainer checkpoints: a directory holding the adapter as PEFT saves it, the trainer's tensors
//! (`trainer.safetensors`: trained tensors at full shape, optimiser moments, allocator state) and
//! `trainer_state.json`. Written into a staging directory and renamed into place, so a
//! checkpoint directory is complete or absent.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{PeftError, Result};
use crate::io::{read_safetensors, write_atomic, write_safetensors};
use crate::train::trainer::{Batch, TrainerOptions};

pub const STATE_NAME: &str = "trainer_state.json";
pub const TENSORS_NAME: &str = "trainer.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    pub optimizer_step: usize,
    pub epoch: usize,
    pub batches_done: usize,
    pub rng_seed: u64,
    pub rng_position: u64,
    pub adapter_name: String,
    pub options: TrainerOptions,
    pub data_fingerprint: Option<String>,
    /// The adapter's config at the checkpoint (AdaLoRA's `rank_pattern` changes in training).
    pub adapter_config: Value,
}

/// Writes `dir` atomically: `save_adapter` fills a staging directory beside it, the trainer's
/// files are added, and the staging directory is renamed to `dir` (replacing an older one).
pub fn write(
    dir: &Path,
    state: &TrainerState,
    tensors: &[(String, Tensor)],
    save_adapter: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let name = dir
        .file_name()
        .ok_or_else(|| {
            PeftError::InvalidOperation(format!("{}: not a directory name", dir.display()))
        })?
        .to_string_lossy()
        .into_owned();
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| PeftError::io(parent, e))?;
    let staging = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| PeftError::io(&staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| PeftError::io(&staging, e))?;
    let result = (|| {
        save_adapter(&staging)?;
        write_safetensors(&staging.join(TENSORS_NAME), tensors)?;
        let json = serde_json::to_string_pretty(state)
            .map_err(|e| PeftError::InvalidOperation(format!("trainer state: {e}")))?;
        write_atomic(&staging.join(STATE_NAME), json.as_bytes())?;
        replace_dir(&staging, dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// Renames `from` to `to`; an existing `to` is moved aside first and removed after.
fn replace_dir(from: &Path, to: &Path) -> Result<()> {
    let old: Option<PathBuf> = if to.exists() {
        let aside = to.with_extension(format!("old-{}", std::process::id()));
        std::fs::rename(to, &aside).map_err(|e| PeftError::io(to, e))?;
        Some(aside)
    } else {
        None
    };
    std::fs::rename(from, to).map_err(|e| PeftError::io(to, e))?;
    if let Some(old) = old {
        std::fs::remove_dir_all(&old).map_err(|e| PeftError::io(&old, e))?;
    }
    Ok(())
}

/// Reads a checkpoint's state and tensors.
pub fn read(dir: &Path) -> Result<(TrainerState, Vec<(String, Tensor)>)> {
    let state_path = dir.join(STATE_NAME);
    if !state_path.is_file() {
        return Err(PeftError::FileNotFound { path: state_path });
    }
    let text = std::fs::read_to_string(&state_path).map_err(|e| PeftError::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: state_path.clone(),
        source,
    })?;
    let tensors = read_safetensors(&dir.join(TENSORS_NAME))?;
    Ok((state, tensors))
}

/// Resuming on the same trajectory needs the same options; the first difference is an error.
pub fn check_options(saved: &TrainerOptions, current: &TrainerOptions) -> Result<()> {
    let (a, b) = (
        serde_json::to_value(saved).unwrap_or_default(),
        serde_json::to_value(current).unwrap_or_default(),
    );
    if let (Value::Object(a), Value::Object(b)) = (&a, &b) {
        for (field, saved_value) in a {
            let now = b.get(field).cloned().unwrap_or(Value::Null);
            if *saved_value != now {
                return Err(PeftError::config(
                    field,
                    format!(
                        "the checkpoint was trained with {saved_value}, this trainer has {now}; resume with the same options"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// A digest of the training data and batch size (FNV-1a over the token ids, masks and labels),
/// so a resumed run can tell it is fed the same data.
pub fn fingerprint(data: &Batch, batch_size: usize) -> Result<String> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |values: Vec<i64>| {
        for v in values {
            for byte in v.to_le_bytes() {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
    };
    let flat =
        |t: &Tensor| -> Result<Vec<i64>> { Ok(t.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?) };
    feed(flat(&data.input.input_ids)?);
    for t in [&data.input.attention_mask, &data.input.token_type_ids]
        .into_iter()
        .flatten()
    {
        feed(flat(t)?);
    }
    feed(flat(&data.labels)?);
    feed(vec![batch_size as i64]);
    Ok(format!("{hash:016x}/{:?}", data.input.input_ids.dims()))
}
