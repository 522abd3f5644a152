//! Training an adapter of a [`crate::model::PeftModel`]: PyTorch's AdamW with parameter groups
//! (weight decay, LoRA+, LoRA-FA), transformers' learning-rate schedules, gradient clipping and
//! accumulation, AdaLoRA's rank allocator, and resumable checkpoints.

pub mod adalora;
pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod schedule;
mod trainer;

pub use loss::Task;
pub use optim::{AdamW, ParamGroup};
pub use schedule::{Schedule, ScheduleKind};
pub use trainer::{Batch, CheckpointPlan, Fit, LoraPlus, StepStats, Trainer, TrainerOptions};

use std::collections::HashMap;

use candle_core::{Tensor, TensorId};

/// Gradients by parameter (a [`candle_core::Var`]'s tensor), summed over the micro-batches of
/// one optimiser step.
#[derive(Debug, Default, Clone)]
pub struct Gradients {
    grads: HashMap<TensorId, Tensor>,
}

impl Gradients {
    /// The gradient of `param` (a variable's tensor), if it received one.
    pub fn get(&self, param: &Tensor) -> Option<&Tensor> {
        self.grads.get(&param.id())
    }

    pub fn insert(&mut self, param: &Tensor, grad: Tensor) {
        self.grads.insert(param.id(), grad);
    }
}
