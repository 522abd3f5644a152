//! One file per method; this module routes a [`PeftConfig`] to its method. Adding a method adds
//! a file, a `PeftConfig` variant and one arm per function below.

pub mod adalora;
pub mod dora;
pub mod ia3;
pub mod lora;
pub mod vera;

use std::collections::BTreeMap;
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
            Self::AdaLora(_) => adalora::PARAM_NAMES,
            Self::Ia3(_) => ia3::PARAM_NAMES,
            Self::Vera(_) => vera::PARAM_NAMES,
        }
    }

    pub fn selection(&self) -> Selection<'_> {
        match self {
            Self::Lora(c) => c.selection(),
            Self::AdaLora(c) => c.selection(),
            Self::Ia3(c) => c.selection(),
            Self::Vera(c) => c.selection(),
        }
    }

    pub fn modules_to_save(&self) -> &[String] {
        match self {
            Self::Lora(c) => c.modules_to_save.as_deref().unwrap_or_default(),
            Self::AdaLora(c) => c.lora.modules_to_save.as_deref().unwrap_or_default(),
            Self::Ia3(c) => c.modules_to_save.as_deref().unwrap_or_default(),
            Self::Vera(c) => c.modules_to_save.as_deref().unwrap_or_default(),
        }
    }

    pub fn bias_mode(&self) -> BiasMode {
        match self {
            Self::Lora(c) => c.bias,
            Self::AdaLora(c) => c.lora.bias,
            Self::Ia3(_) => BiasMode::None,
            Self::Vera(c) => c.bias,
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
            Self::AdaLora(c) => adalora::check_saved_layer(c, module, tensors),
            Self::Ia3(c) => ia3::check_saved_layer(c, module, tensors),
            Self::Vera(c) => vera::check_saved_layer(c, module, tensors),
        }
    }

    /// The adapted layer for `base` with saved tensors.
    pub fn build_layer(
        &self,
        module: &str,
        base: BaseLayer,
        tensors: Vec<(String, Tensor)>,
        shared: &BTreeMap<String, Tensor>,
    ) -> Result<Box<dyn AdapterLayer>> {
        match self {
            Self::Lora(c) => Ok(Box::new(lora::LoraLayer::from_weights(
                module,
                base,
                Arc::new(c.clone()),
                tensors,
            )?)),
            Self::AdaLora(c) => Ok(Box::new(adalora::AdaLoraLayer::from_weights(
                module,
                base,
                Arc::new(c.clone()),
                tensors,
            )?)),
            Self::Ia3(c) => Ok(Box::new(ia3::Ia3Layer::from_weights(
                module,
                base,
                Arc::new(c.clone()),
                tensors,
            )?)),
            Self::Vera(c) => Ok(Box::new(vera::VeraLayer::from_weights(
                module,
                base,
                Arc::new(c.clone()),
                tensors,
                shared,
            )?)),
        }
    }

    /// Names of adapter-wide tensors (saved as `base_model.<name>`).
    pub fn shared_names(&self) -> &'static [&'static str] {
        match self {
            Self::Vera(_) => vera::SHARED_NAMES,
            _ => &[],
        }
    }

    /// Whether the adapter-wide tensors are written to the file.
    pub fn saves_shared(&self) -> bool {
        match self {
            Self::Vera(c) => c.save_projection,
            _ => false,
        }
    }

    /// The adapter-wide tensors for layers of at most `out_max` outputs and `in_max` inputs.
    pub fn generate_shared(
        &self,
        out_max: usize,
        in_max: usize,
    ) -> Result<BTreeMap<String, Tensor>> {
        match self {
            Self::Vera(c) => c.generate_projections(out_max, in_max),
            _ => Ok(BTreeMap::new()),
        }
    }

    /// PEFT rewrites method settings that depend on the targeted layer types when it creates an
    /// adapter, and saves the rewritten config; this does the same.
    pub fn adapt_to_targets(&mut self, kinds: &[ModuleKind]) -> Result<()> {
        match self {
            Self::Lora(c) => adapt_fan_in_fan_out(&mut c.fan_in_fan_out, kinds),
            Self::AdaLora(c) => adapt_fan_in_fan_out(&mut c.lora.fan_in_fan_out, kinds),
            Self::Ia3(c) => adapt_fan_in_fan_out(&mut c.fan_in_fan_out, kinds),
            Self::Vera(c) => adapt_fan_in_fan_out(&mut c.fan_in_fan_out, kinds),
        }
    }

    /// A freshly initialised adapted layer for `base`.
    pub fn init_layer(
        &self,
        module: &str,
        base: BaseLayer,
        seed: u64,
        shared: &BTreeMap<String, Tensor>,
    ) -> Result<Box<dyn AdapterLayer>> {
        match self {
            Self::Lora(c) => Ok(Box::new(lora::LoraLayer::new(
                module,
                base,
                Arc::new(c.clone()),
                seed,
            )?)),
            Self::AdaLora(c) => Ok(Box::new(adalora::AdaLoraLayer::new(
                module,
                base,
                Arc::new(c.clone()),
                seed,
            )?)),
            Self::Ia3(c) => Ok(Box::new(ia3::Ia3Layer::new(
                module,
                base,
                Arc::new(c.clone()),
                seed,
            )?)),
            Self::Vera(c) => Ok(Box::new(vera::VeraLayer::new(
                module,
                base,
                Arc::new(c.clone()),
                shared,
                seed,
            )?)),
        }
    }
}

/// PEFT forces `fan_in_fan_out` to true for transformers `Conv1D` targets and to false for
/// `nn.Linear` ones, and saves the result; the loader reads the layout from it.
fn adapt_fan_in_fan_out(fan_in_fan_out: &mut bool, kinds: &[ModuleKind]) -> Result<()> {
    let conv1d = kinds.contains(&ModuleKind::Conv1D);
    let linear = kinds.contains(&ModuleKind::Linear);
    if conv1d && linear {
        return Err(crate::error::PeftError::config(
            "fan_in_fan_out",
            "the targets mix nn.Linear and transformers Conv1D layers; an adapter file records one layout",
        ));
    }
    if conv1d || linear {
        *fan_in_fan_out = conv1d;
    }
    Ok(())
}
