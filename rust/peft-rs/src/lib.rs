//! peft-rs: parameter-efficient fine-tuning on candle, numerically and file-compatible with
//! HuggingFace PEFT.
//!
//! A targeted module of a model is an [`AdaptedModule`]: its base layer plus any number of named
//! adapters of any registered method ([`registry::METHODS`]).
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use peft_rs::{AdaptedModule, PeftAdapter, base::{BaseLayer, ModuleKind}};
//! # fn main() -> peft_rs::Result<()> {
//! let adapter = PeftAdapter::from_pretrained("my-adapter".as_ref(), None)?;
//! let weight = Tensor::zeros((16, 32), DType::F32, &Device::Cpu)?;
//! let base = BaseLayer::new(ModuleKind::Linear, weight, None)?;
//! let layer: AdaptedModule = adapter.layer("lin0", base)?;
//! let x = Tensor::ones((4, 32), DType::F32, &Device::Cpu)?;
//! let y = layer.forward(&x)?;
//! # let _ = y; Ok(()) }
//! ```

pub mod base;
pub mod config;
pub mod error;
pub mod init;
pub mod io;
mod kernels;
pub mod matching;
pub mod merge;
pub mod method;
pub mod methods;
pub mod module;
pub mod params;
pub mod peft_adapter;
pub mod registry;

pub use config::PeftConfig;
pub use error::{PeftError, Result};
pub use method::{BiasMode, LayerAdapter, MergeRule, MethodConfig, ParamSource};
pub use methods::lora::LoraConfig;
pub use module::{AdaptedModule, MergeOutcome};
pub use peft_adapter::{BaseModule, PeftAdapter};
