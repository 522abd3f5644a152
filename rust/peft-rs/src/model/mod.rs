//! Models whose targetable layers are peft-rs [`Layer`]s, built through a [`ModelBuilder`], so
//! that adapters of any method can be injected by PEFT's targeting rules without any per-method
//! or per-model code.
//!
//! Reference models (one file each) register in [`ARCHITECTURES`] under their transformers class
//! name, which is how the Python bindings find them.

pub mod bert;
pub mod checkpoint;
mod layers;
mod peft_model;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{PeftError, Result};

pub use layers::{Layer, ModelBuilder, Modules};
pub use peft_model::{BASE_ROWS, PeftModel};

/// What a model's forward takes: token ids `(batch, seq)` and the optional masks transformers
/// takes (1 = attend / real token).
#[derive(Debug, Clone)]
pub struct ModelInput {
    pub input_ids: Tensor,
    pub attention_mask: Option<Tensor>,
    pub token_type_ids: Option<Tensor>,
}

impl ModelInput {
    pub fn new(input_ids: Tensor) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            token_type_ids: None,
        }
    }
}

/// A loaded model: its forward (what transformers' class returns first: last hidden state or
/// logits) and its targetable layers.
pub trait Model: Send + Sync {
    fn forward(&self, input: &ModelInput) -> Result<Tensor>;

    /// Every targetable layer, by module path (as transformers' `named_modules()` names it).
    fn modules(&self) -> &Modules;

    /// The transformers class name (`"BertModel"`).
    fn architecture(&self) -> &'static str;

    /// Greedy decoding (causal language models): `max_new_tokens` tokens appended to each row of
    /// `input_ids`, using a KV cache; stops a row at `eos_token_id` as transformers does.
    fn generate(&self, _input: &ModelInput, _max_new_tokens: usize) -> Result<Tensor> {
        Err(PeftError::InvalidOperation(format!(
            "{} does not generate text",
            self.architecture()
        )))
    }
}

/// One reference model in [`ARCHITECTURES`].
#[derive(Debug, Clone, Copy)]
pub struct Architecture {
    /// transformers' class name (`"LlamaForCausalLM"`).
    pub name: &'static str,
    /// Loads a transformers-format directory.
    pub load: fn(&Path, DType, &Device) -> Result<Box<dyn Model>>,
}

/// Every reference model, one line each.
pub const ARCHITECTURES: &[Architecture] = &[
    Architecture {
        name: "BertModel",
        load: bert::BertModel::load_boxed,
    },
    Architecture {
        name: "BertForSequenceClassification",
        load: bert::BertForSequenceClassification::load_boxed,
    },
];

/// Loads `dir` as the reference model `name`.
pub fn load(name: &str, dir: &Path, dtype: DType, device: &Device) -> Result<Box<dyn Model>> {
    let arch = ARCHITECTURES
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| {
            PeftError::InvalidOperation(format!(
                "unknown model class {name:?}; peft-rs implements {:?}",
                ARCHITECTURES.iter().map(|a| a.name).collect::<Vec<_>>()
            ))
        })?;
    if !dir.is_dir() {
        return Err(PeftError::FileNotFound {
            path: dir.to_path_buf(),
        });
    }
    (arch.load)(dir, dtype, device)
}
