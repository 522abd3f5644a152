//! peft-rs: parameter-efficient fine-tuning on candle, numerically and file-compatible with
//! HuggingFace PEFT.
//!
//! A targeted module of a model is an [`AdaptedModule`]: its base layer plus any number of named
//! adapters of any registered method ([`registry::METHODS`]).
//!
//! ```no_run
//! use std::collections::HashMap;
//!
//! use candle_core::{DType, Device, Tensor};
//! use peft_rs::base::{BaseLayer, ModuleKind};
//! use peft_rs::{AdaptedModule, ParamSource, PeftAdapter, PeftConfig};
//! # fn main() -> peft_rs::Result<()> {
//! let (weight, x) = (Tensor::zeros((16, 32), DType::F32, &Device::Cpu)?, Tensor::ones((4, 32), DType::F32, &Device::Cpu)?);
//! let adapter = PeftAdapter::from_pretrained("path/to/adapter".as_ref(), None)?;
//! let base = BaseLayer::new(ModuleKind::Linear, weight.clone(), None)?; // PyTorch layouts
//! let mut layer: AdaptedModule = adapter.layer("lin0", base)?; // holds the adapter, active
//! let loha = PeftConfig::from_json(serde_json::json!({"peft_type": "LOHA", "r": 4}))?;
//! layer.add("other", &*loha, ParamSource::Init { seed: 0 }, &Default::default())?;
//! layer.set_active(&["default", "other"])?;
//! let y = layer.forward(&x)?;
//! layer.merge(None, true)?; // safe merge of the active adapters
//! layer.unmerge()?;
//! let state_dict = HashMap::from([("lin0.weight".to_string(), weight)]);
//! let kinds = HashMap::from([("lin0".to_string(), ModuleKind::Linear)]);
//! let merged = adapter.merge_into(&state_dict, &kinds, false)?;
//! # let _ = (y, merged); Ok(()) }
//! ```

pub mod arithmetic;
pub mod base;
pub mod blas;
pub mod config;
pub mod error;
pub mod init;
pub mod io;
mod kernels;
pub mod linalg;
pub mod matching;
pub mod merge;
pub mod method;
pub mod methods;
pub mod model;
pub mod module;
pub mod params;
pub mod peft_adapter;
pub mod registry;
pub mod rng;
pub mod stream_merge;
pub mod train;

pub use config::PeftConfig;
pub use error::{PeftError, Result};
pub use kernels::use_amx;
pub use method::{BiasMode, LayerAdapter, MergeRule, MethodConfig, ParamSource};
pub use methods::lora::LoraConfig;
pub use module::{AdaptedModule, MergeOutcome};
pub use peft_adapter::{BaseModule, PeftAdapter};
