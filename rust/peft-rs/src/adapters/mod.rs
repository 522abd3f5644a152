//! One file per method; this module routes a [`PeftConfig`] to its method. Adding a method adds
//! a file, a `PeftConfig` variant and one arm per function below.

pub mod lora;

use std::sync::Arc;

use candle_core::Tensor;

use crate::base::{BaseLayer, ModuleKind};
use crate::config::PeftConfig;
use crate::error::Result;
use crate::matching::Selection;
use crate::traits::AdapterLayer;

/// Which base-model biases are saved with the adapter.
pub use lora::BiasMode;

impl PeftConfig {
    /// Tensor names a layer of this method can have, relative to its module.
    pub fn param_names(&self) -> &'static [&'static str] {
        match self {
            Self::Lora(_) => lora::PARAM_NAMES,
        }
    }

    pub fn selection(&self) -> Selection<'_> {
        match self {
            Self::Lora(c) => c.selection(),
        }
    }

    pub fn modules_to_save(&self) -> &[String] {
        match self {
            Self::Lora(c) => c.modules_to_save.as_deref().unwrap_or_default(),
        }
    }

    pub fn bias_mode(&self) -> BiasMode {
        match self {
            Self::Lora(c) => c.bias,
        }
    }

    /// Checks a saved layer's tensors against the config (names, ranks) and tells which kind of
    /// module they were saved for.
    pub fn check_saved_layer(
        &self,
        module: &str,
        tensors: &[(String, Tensor)],
    ) -> Result<ModuleKind> {
        match self {
            Self::Lora(c) => lora::check_saved_layer(c, module, tensors),
        }
    }

    /// The adapted layer for `base` with saved tensors.
    pub fn build_layer(
        &self,
        module: &str,
        base: BaseLayer,
        tensors: Vec<(String, Tensor)>,
    ) -> Result<Box<dyn AdapterLayer>> {
        match self {
            Self::Lora(c) => Ok(Box::new(lora::LoraLayer::from_weights(
                module,
                base,
                Arc::new(c.clone()),
                tensors,
            )?)),
        }
    }

    /// PEFT rewrites method settings that depend on the targeted layer types when it creates an
    /// adapter, and saves the rewritten config; this does the same.
    pub fn adapt_to_targets(&mut self, kinds: &[ModuleKind]) -> Result<()> {
        match self {
            Self::Lora(c) => lora::adapt_fan_in_fan_out(c, kinds),
        }
    }

    /// A freshly initialised adapted layer for `base`.
    pub fn init_layer(
        &self,
        module: &str,
        base: BaseLayer,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        match self {
            Self::Lora(c) => Ok(Box::new(lora::LoraLayer::new(
                module,
                base,
                Arc::new(c.clone()),
                seed,
            )?)),
        }
    }
}
