//! Named trainable tensors of one adapted layer, shared by every method: naming, freezing and
//! registration in a [`VarMap`] are written once here.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use crate::error::{PeftError, Result};
use crate::io::MODEL_PREFIX;

/// The key of a module's tensor in PEFT's files (`base_model.model.<module>.<name>`); just
/// `name` for a standalone layer (empty module path).
pub fn file_key(module: &str, name: &str) -> String {
    if module.is_empty() {
        name.to_string()
    } else {
        format!("{MODEL_PREFIX}{module}.{name}")
    }
}

/// Checks given tensors against the names and shapes a method expects for one module (every
/// expected tensor present with its exact shape and a float dtype, nothing else), and moves them
/// to `dtype` on `device`. `what` describes the layer for messages (`"LoRA Linear r=8"`).
pub fn take_params(
    module: &str,
    what: &str,
    given: Vec<(String, Tensor)>,
    expected: &[(&str, Vec<usize>)],
    dtype: DType,
    device: &Device,
) -> Result<Params> {
    if let Some((name, _)) = given
        .iter()
        .find(|(n, _)| !expected.iter().any(|(e, _)| e == n))
    {
        return Err(PeftError::UnexpectedKey {
            key: file_key(module, name),
            context: format!(
                "a {what} layer has {:?}",
                expected.iter().map(|e| e.0).collect::<Vec<_>>()
            ),
        });
    }
    let mut given = given;
    let mut entries = Vec::with_capacity(expected.len());
    for (name, shape) in expected {
        let pos =
            given
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| PeftError::MissingKey {
                    key: file_key(module, name),
                    context: format!("required by a {what} layer"),
                })?;
        let (_, t) = given.swap_remove(pos);
        if t.dims() != shape.as_slice() {
            return Err(PeftError::shape(
                format!("{} ({what})", file_key(module, name)),
                shape,
                t.dims(),
            ));
        }
        if !t.dtype().is_float() {
            return Err(PeftError::DType {
                what: file_key(module, name),
                expected: "a floating-point dtype".into(),
                found: format!("{:?}", t.dtype()),
            });
        }
        entries.push((name.to_string(), t.to_dtype(dtype)?.to_device(device)?));
    }
    Ok(Params::new(entries))
}

thread_local! {
    static GRAD_ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Runs `f` without recording gradients, as PyTorch's `torch.no_grad()`: adapter tensors enter
/// the computation detached, so no autograd graph holds the intermediate tensors (inference
/// frees each one as soon as it is used, and an output kept by the caller keeps nothing else
/// alive). Per thread; nests.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_ENABLED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GRAD_ENABLED.with(|g| g.replace(false)));
    f()
}

fn grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

#[derive(Debug, Clone, Default)]
pub struct Params {
    entries: Vec<(String, Tensor)>,
    /// Names of the tensors that get no gradient.
    frozen: BTreeSet<String>,
}

impl Params {
    pub fn new(entries: Vec<(String, Tensor)>) -> Self {
        Self {
            entries,
            frozen: BTreeSet::new(),
        }
    }

    /// The tensor for `name`, detached from the graph when frozen or under [`no_grad`].
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let t = self.raw(name)?;
        Ok(self.tracked(name, t))
    }

    pub fn get_opt(&self, name: &str) -> Option<Tensor> {
        self.raw(name).ok().map(|t| self.tracked(name, t))
    }

    fn tracked(&self, name: &str, t: &Tensor) -> Tensor {
        if self.frozen.contains(name) || !grad_enabled() {
            t.detach()
        } else {
            t.clone()
        }
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

    /// Number of scalars over every tensor.
    pub fn num_elements(&self) -> usize {
        self.entries.iter().map(|(_, t)| t.elem_count()).sum()
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

    /// Turns every tensor into a trainable variable (in place: the layer computes with the
    /// variables from then on) and returns them by name. Idempotent: a tensor that is a variable
    /// already is returned as it is.
    pub fn vars(&mut self) -> Result<Vec<(String, Var)>> {
        let mut vars = Vec::with_capacity(self.entries.len());
        for (name, tensor) in self.entries.iter_mut() {
            let var = Var::from_tensor(tensor)?;
            *tensor = var.as_tensor().clone();
            vars.push((name.clone(), var));
        }
        Ok(vars)
    }

    /// Freezes (or unfreezes) every tensor.
    pub fn set_frozen(&mut self, frozen: bool) {
        self.frozen = if frozen {
            self.entries.iter().map(|(n, _)| n.clone()).collect()
        } else {
            BTreeSet::new()
        };
    }

    /// Freezes (or unfreezes) one tensor (LoRA-FA freezes `lora_A`).
    pub fn set_tensor_frozen(&mut self, name: &str, frozen: bool) -> Result<()> {
        self.raw(name)?;
        if frozen {
            self.frozen.insert(name.to_string());
        } else {
            self.frozen.remove(name);
        }
        Ok(())
    }

    /// Whether every tensor is frozen.
    pub fn is_frozen(&self) -> bool {
        self.entries.iter().all(|(n, _)| self.frozen.contains(n))
    }

    pub fn is_tensor_frozen(&self, name: &str) -> bool {
        self.frozen.contains(name)
    }
}
