//! Models whose targetable layers are peft-rs [`Layer`]s, built through a [`ModelBuilder`], so
//! that adapters of any method can be injected by PEFT's targeting rules without any per-method
//! or per-model code.
//!
//! Reference models (one file each) register in [`ARCHITECTURES`] under their transformers class
//! name, which is how the Python bindings find them.
//!
//! A downstream crate makes its own candle model adaptable by building its layers through a
//! [`ModelBuilder`] (whose prefixes are the Hugging Face module paths) and implementing [`Model`]:
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::VarBuilder;
//! use peft_rs::model::{checkpoint, Layer, Model, ModelBuilder, ModelInput, Modules, PeftModel};
//! use peft_rs::PeftConfig;
//!
//! struct TinyMlp {
//!     up: Layer,
//!     down: Layer,
//!     modules: Modules,
//! }
//!
//! impl TinyMlp {
//!     fn new(b: ModelBuilder) -> peft_rs::Result<Self> {
//!         Ok(Self {
//!             up: b.pp("up").linear(8, 32, true)?,
//!             down: b.pp("down").linear(32, 8, true)?,
//!             modules: b.modules(),
//!         })
//!     }
//! }
//!
//! impl Model for TinyMlp {
//!     fn forward(&self, input: &ModelInput) -> peft_rs::Result<Tensor> {
//!         let h = self.up.forward(&input.input_ids)?.relu()?;
//!         self.down.forward(&h)
//!     }
//!     fn modules(&self) -> &Modules {
//!         &self.modules
//!     }
//!     fn architecture(&self) -> &'static str {
//!         "TinyMlp"
//!     }
//! }
//!
//! # fn main() -> peft_rs::Result<()> {
//! let vb: VarBuilder = checkpoint::var_builder("model_dir".as_ref(), DType::F32, &Device::Cpu)?;
//! let mut model = PeftModel::new(Arc::new(TinyMlp::new(ModelBuilder::new(vb))?));
//! // Any registered method, from a config...
//! let config = serde_json::json!({"peft_type": "LOHA", "r": 4, "target_modules": ["up", "down"]});
//! model.add_adapter("default", PeftConfig::from_json(config)?, 0)?;
//! // ...or from a directory written by PEFT; several at once, or one per batch row.
//! model.load_adapter("path/to/adapter".as_ref(), "other")?;
//! model.set_adapter(&["default", "other"])?;
//! # Ok(()) }
//! ```

mod activation;
pub mod bert;
pub mod checkpoint;
mod layers;
pub mod llama;
mod ops;
mod peft_model;
pub mod tokenizer;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{PeftError, Result};

pub use activation::HiddenAct;
pub use layers::{Layer, ModelBuilder, Modules};
pub use peft_model::{BASE_ROWS, PeftModel, TrainableParam};
pub use tokenizer::Tokenizer;

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

    /// Path of the output embedding layer (transformers' `get_output_embeddings()`, e.g.
    /// `"lm_head"`), which `target_modules="all-linear"` leaves out.
    fn output_head(&self) -> Option<&str> {
        None
    }

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
    Architecture {
        name: "LlamaForCausalLM",
        load: llama::LlamaForCausalLM::load_boxed,
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

/// Loads `dir` as the sequence-classification model `name` with a `num_labels`-way head, a new
/// one (drawn from `seed`) when the checkpoint has none: transformers' `from_pretrained(dir,
/// num_labels=n)` for fine-tuning.
pub fn load_for_labels(
    name: &str,
    dir: &Path,
    dtype: DType,
    device: &Device,
    num_labels: usize,
    seed: u64,
) -> Result<Box<dyn Model>> {
    if name != "BertForSequenceClassification" {
        return Err(PeftError::InvalidOperation(format!(
            "num_labels applies to sequence classification models (BertForSequenceClassification), not {name}"
        )));
    }
    if num_labels == 0 {
        return Err(PeftError::config("num_labels", "must be >= 1, found 0"));
    }
    if !dir.is_dir() {
        return Err(PeftError::FileNotFound {
            path: dir.to_path_buf(),
        });
    }
    Ok(Box::new(
        bert::BertForSequenceClassification::load_with_head(
            dir,
            dtype,
            device,
            Some((num_labels, seed)),
        )?,
    ))
}
