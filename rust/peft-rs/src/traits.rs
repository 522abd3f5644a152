//! The traits every adapter method implements.
//!
//! An adapted layer owns its base layer ([`crate::base::BaseLayer`]), so a method whose forward
//! needs the base weight or the base input (IA³ on feed-forward modules, OFT, BOFT, DoRA) sees it
//! through the same `forward(x)` as LoRA, and merging writes into that owned base.

use candle_core::Tensor;
use candle_nn::VarMap;

use crate::base::BaseLayer;
use crate::config::AdapterConfig;
use crate::error::{PeftError, Result};

/// A layer with an adapter applied: the base layer plus the method's trainable tensors.
pub trait Adapter: Send + Sync {
    /// The adapted layer's output for `x` (any number of leading batch dimensions).
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// Every trainable tensor, named as in PEFT's files relative to the module
    /// (`"lora_A.weight"`, `"lora_embedding_B"`, ...). Quantizers and optimizers go through this.
    fn weights(&self) -> Vec<(String, Tensor)>;

    /// Number of trainable scalars.
    fn num_parameters(&self) -> usize {
        self.weights().iter().map(|(_, t)| t.elem_count()).sum()
    }

    fn config(&self) -> &dyn AdapterConfig;

    /// The wrapped base layer, holding the merged weights while merged.
    fn base(&self) -> &BaseLayer;
}

/// Methods whose adapter can be folded into the base weight.
pub trait Mergeable {
    /// The additive change to the base weight, in the base weight's layout.
    fn delta_weight(&self) -> Result<Tensor> {
        Err(PeftError::InvalidOperation(
            "this adapter method has no additive delta weight".into(),
        ))
    }

    /// Folds the adapter into the base weight; with `safe_merge` the result is checked for
    /// NaN/inf first and the weight is left untouched if any is found.
    fn merge(&mut self, safe_merge: bool) -> Result<()>;

    /// Restores the base weight (up to floating-point rounding).
    fn unmerge(&mut self) -> Result<()>;

    fn is_merged(&self) -> bool;
}

/// Training hooks: parameters registered in a candle [`VarMap`] so an optimizer updates them.
pub trait Trainable {
    /// Turns the trainable tensors into variables stored in `varmap` under `prefix.<name>`.
    fn register(&mut self, varmap: &VarMap, prefix: &str) -> Result<()>;
    /// Stops gradients reaching the adapter tensors.
    fn freeze(&mut self);
    fn unfreeze(&mut self);
    fn is_frozen(&self) -> bool;
    /// Training mode enables dropout.
    fn set_training(&mut self, training: bool);
    fn is_training(&self) -> bool;
}

/// What the registry and the bindings hold: a layer with every capability.
pub trait AdapterLayer: Adapter + Mergeable + Trainable {}
impl<T: Adapter + Mergeable + Trainable> AdapterLayer for T {}
