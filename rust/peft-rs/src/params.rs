//! Named trainable tensors of one adapted layer, shared by every method: naming, freezing and
//! registration in a [`VarMap`] are written once here.

use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use crate::error::{PeftError, Result};

#[derive(Debug, Clone, Default)]
pub struct Params {
    entries: Vec<(String, Tensor)>,
    frozen: bool,
}

impl Params {
    pub fn new(entries: Vec<(String, Tensor)>) -> Self {
        Self {
            entries,
            frozen: false,
        }
    }

    /// The tensor for `name`, detached from the graph when frozen.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let t = self.raw(name)?;
        Ok(if self.frozen { t.detach() } else { t.clone() })
    }

    pub fn get_opt(&self, name: &str) -> Option<Tensor> {
        self.raw(name)
            .ok()
            .map(|t| if self.frozen { t.detach() } else { t.clone() })
    }

    fn raw(&self, name: &str) -> Result<&Tensor> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| PeftError::MissingKey {
                key: name.to_string(),
                context: "adapter layer parameters".into(),
            })
    }

    pub fn push(&mut self, name: &str, tensor: Tensor) {
        self.entries.push((name.to_string(), tensor));
    }

    pub fn entries(&self) -> &[(String, Tensor)] {
        &self.entries
    }

    pub fn register(&mut self, varmap: &VarMap, prefix: &str) -> Result<()> {
        let data = varmap.data();
        let mut vars = data
            .lock()
            .map_err(|_| PeftError::InvalidOperation("the VarMap's lock is poisoned".into()))?;
        let keys: Vec<String> = self
            .entries
            .iter()
            .map(|(n, _)| format!("{prefix}.{n}"))
            .collect();
        if let Some(k) = keys.iter().find(|k| vars.contains_key(*k)) {
            return Err(PeftError::InvalidOperation(format!(
                "VarMap already holds a variable named `{k}`"
            )));
        }
        for ((_, tensor), key) in self.entries.iter_mut().zip(keys) {
            let var = Var::from_tensor(tensor)?;
            *tensor = var.as_tensor().clone();
            vars.insert(key, var);
        }
        Ok(())
    }

    pub fn set_frozen(&mut self, frozen: bool) {
        self.frozen = frozen;
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen
    }
}

/// `Trainable` for a layer struct with fields `params: Params` and `training: bool`.
macro_rules! impl_trainable {
    ($layer:ty) => {
        impl $crate::traits::Trainable for $layer {
            fn register(
                &mut self,
                varmap: &candle_nn::VarMap,
                prefix: &str,
            ) -> $crate::error::Result<()> {
                self.params.register(varmap, prefix)
            }

            fn freeze(&mut self) {
                self.params.set_frozen(true);
            }

            fn unfreeze(&mut self) {
                self.params.set_frozen(false);
            }

            fn is_frozen(&self) -> bool {
                self.params.is_frozen()
            }

            fn set_training(&mut self, training: bool) {
                self.training = training;
            }

            fn is_training(&self) -> bool {
                self.training
            }
        }
    };
}
pub(crate) use impl_trainable;
