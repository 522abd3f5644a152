//! peft-rs: parameter-efficient fine-tuning on candle, numerically and file-compatible with
//! HuggingFace PEFT.
//!
//! ```no_run
//! use peft_rs::{PeftAdapter, base::{BaseLayer, ModuleKind}};
//! # fn main() -> peft_rs::Result<()> {
//! let adapter = PeftAdapter::from_pretrained("my-adapter".as_ref(), None)?;
//! let weight = candle_core::Tensor::zeros((16, 32), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let layer = adapter.layer("lin0", BaseLayer::new(ModuleKind::Linear, weight, None)?)?;
//! let x = candle_core::Tensor::ones((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let y = layer.forward(&x)?;
//! # let _ = y; Ok(()) }
//! ```

pub mod adapters;
pub mod base;
pub mod config;
pub mod error;
pub mod init;
pub mod io;
mod kernels;
pub mod matching;
pub mod merge;
pub mod params;
pub mod peft_adapter;
pub mod traits;

pub use adapters::adalora::{AdaLoraConfig, AdaLoraLayer};
pub use adapters::ia3::{Ia3Config, Ia3Layer};
pub use adapters::lora::{LoraConfig, LoraLayer};
pub use adapters::vera::{VeraConfig, VeraLayer};
pub use config::{AdapterConfig, PeftConfig, PeftType};
pub use error::{PeftError, Result};
pub use peft_adapter::{BaseModule, PeftAdapter};
pub use traits::{Adapter, AdapterLayer, Mergeable, Trainable};
