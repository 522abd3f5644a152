//! The layers a model builds through peft-rs so that adapters can be injected later without any
//! change to the model's code: each is a shared handle to an [`AdaptedModule`] registered under
//! its Hugging Face module path (the [`ModelBuilder`]'s `VarBuilder` prefix).

use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::base::{BaseLayer, Conv2dParams, ModuleKind};
use crate::error::{PeftError, Result};
use crate::module::AdaptedModule;

/// Which adapter each row of the current batch uses (a mixed batch), shared by every layer of a
/// model; `None` for an ordinary forward.
type RowAdapters = Arc<RwLock<Option<Arc<[String]>>>>;

/// A targetable layer of a model (Linear, transformers Conv1D, Embedding, Conv2d). The model
/// holds one clone and calls [`Layer::forward`]; a `PeftModel` holds another and adds, activates
/// and merges adapters on the same module.
#[derive(Debug, Clone)]
pub struct Layer {
    path: Arc<str>,
    module: Arc<RwLock<AdaptedModule>>,
    rows: RowAdapters,
}

impl Layer {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = self.rows.read().map_err(|_| poisoned(&self.path))?.clone();
        let module = self.module();
        match rows {
            Some(rows) => module.forward_rows(x, &rows),
            None => module.forward(x),
        }
    }

    /// The module path in the model (`"model.layers.0.self_attn.q_proj"`).
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn module(&self) -> RwLockReadGuard<'_, AdaptedModule> {
        // A panic while a write guard was held is the only way to poison the lock; the module's
        // state is still consistent (every mutation validates before it writes).
        self.module.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn module_mut(&self) -> RwLockWriteGuard<'_, AdaptedModule> {
        self.module.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl candle_core::Module for Layer {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        Layer::forward(self, xs).map_err(candle_core::Error::wrap)
    }
}

fn poisoned(path: &str) -> PeftError {
    PeftError::InvalidOperation(format!("`{path}`: a forward panicked while routing rows"))
}

/// Every layer a model built through one [`ModelBuilder`], in build order.
#[derive(Debug, Clone, Default)]
pub struct Modules {
    layers: Arc<Mutex<Vec<Layer>>>,
    /// Every module path the builder visited (containers and norms too): what PEFT's
    /// `named_modules()` would list, for condensing target lists.
    paths: Arc<Mutex<Vec<String>>>,
    rows: RowAdapters,
}

impl Modules {
    pub fn layers(&self) -> Vec<Layer> {
        self.layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every module path the model's builder visited, in order (layers and their containers).
    pub fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn visit(&self, path: String) {
        let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        if !paths.contains(&path) {
            paths.push(path);
        }
    }

    pub fn get(&self, path: &str) -> Option<Layer> {
        self.layers().into_iter().find(|l| l.path() == path)
    }

    /// Runs `f` with each row of the batch routed to its adapter (a mixed batch), then restores
    /// the ordinary forward, also when `f` fails. One mixed forward at a time per model.
    pub fn with_row_adapters<T>(
        &self,
        row_adapters: Vec<String>,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let mut slot = self.rows.write().map_err(|_| poisoned("model"))?;
        if slot.is_some() {
            return Err(PeftError::InvalidOperation(
                "another mixed-batch forward of this model is running".into(),
            ));
        }
        *slot = Some(row_adapters.into());
        drop(slot);
        let result = f();
        *self.rows.write().map_err(|_| poisoned("model"))? = None;
        result
    }

    fn register(&self, path: String, base: BaseLayer) -> Result<Layer> {
        let mut layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        if layers.iter().any(|l| *l.path == *path) {
            return Err(PeftError::InvalidOperation(format!(
                "the model builds two layers at `{path}`"
            )));
        }
        let layer = Layer {
            module: Arc::new(RwLock::new(AdaptedModule::new(&path, base))),
            path: path.into(),
            rows: self.rows.clone(),
        };
        layers.push(layer.clone());
        Ok(layer)
    }
}

/// A candle [`VarBuilder`] plus the [`Modules`] its layers join. A model written against it
/// (`b.pp("q_proj").linear(768, 768, true)`) can take adapters of any method, from a config or a
/// PEFT directory, through [`crate::model::PeftModel`].
#[derive(Clone)]
pub struct ModelBuilder<'a> {
    vb: VarBuilder<'a>,
    modules: Modules,
}

impl<'a> ModelBuilder<'a> {
    pub fn new(vb: VarBuilder<'a>) -> Self {
        Self {
            vb,
            modules: Modules::default(),
        }
    }

    /// The builder for the sub-module `name` (module paths join with dots, as in PyTorch).
    pub fn pp(&self, name: impl ToString) -> Self {
        let vb = self.vb.pp(name);
        self.modules.visit(vb.prefix());
        Self {
            vb,
            modules: self.modules.clone(),
        }
    }

    /// The wrapped `VarBuilder`, for tensors that are not targetable layers (norms, biases...).
    pub fn vb(&self) -> &VarBuilder<'a> {
        &self.vb
    }

    /// The layers built so far (all of them, from any sub-builder).
    pub fn modules(&self) -> Modules {
        self.modules.clone()
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    /// A checkpoint tensor of this module with its expected shape, in the builder's dtype: a
    /// missing or mis-shaped tensor is an error naming its key.
    pub fn tensor(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let key = match self.vb.prefix() {
            p if p.is_empty() => name.to_string(),
            p => format!("{p}.{name}"),
        };
        if !self.vb.contains_tensor(name) {
            return Err(PeftError::MissingKey {
                key,
                context: "the model's checkpoint".into(),
            });
        }
        let t = self.vb.get_unchecked_dtype(name, self.vb.dtype())?;
        if t.dims() != shape {
            return Err(PeftError::shape(key, shape, t.dims()));
        }
        Ok(t)
    }

    /// `nn.Linear(in_features, out_features, bias)`: weight `(out, in)`.
    pub fn linear(&self, in_features: usize, out_features: usize, bias: bool) -> Result<Layer> {
        let weight = self.tensor(&[out_features, in_features], "weight")?;
        let bias = self.bias(bias, out_features)?;
        self.layer(ModuleKind::Linear, weight, bias)
    }

    /// transformers' `Conv1D(nf, nx)` (GPT-2): weight `(nx, nf)` = `(in, out)`, with a bias.
    pub fn conv1d(&self, nf: usize, nx: usize) -> Result<Layer> {
        let weight = self.tensor(&[nx, nf], "weight")?;
        let bias = self.bias(true, nf)?;
        self.layer(ModuleKind::Conv1D, weight, bias)
    }

    /// `nn.Embedding(num_embeddings, embedding_dim)`.
    pub fn embedding(&self, num_embeddings: usize, embedding_dim: usize) -> Result<Layer> {
        let weight = self.tensor(&[num_embeddings, embedding_dim], "weight")?;
        self.layer(ModuleKind::Embedding, weight, None)
    }

    /// `nn.Conv2d(in, out, kernel, ...)`: weight `(out, in / groups, kh, kw)`.
    pub fn conv2d(
        &self,
        in_channels: usize,
        out_channels: usize,
        kernel: (usize, usize),
        params: Conv2dParams,
        bias: bool,
    ) -> Result<Layer> {
        let shape = [
            out_channels,
            in_channels / params.groups.max(1),
            kernel.0,
            kernel.1,
        ];
        let weight = self.tensor(&shape, "weight")?;
        let bias = self.bias(bias, out_channels)?;
        self.layer(ModuleKind::Conv2d(params), weight, bias)
    }

    fn bias(&self, present: bool, size: usize) -> Result<Option<Tensor>> {
        Ok(if present {
            Some(self.tensor(&[size], "bias")?)
        } else {
            None
        })
    }

    fn layer(&self, kind: ModuleKind, weight: Tensor, bias: Option<Tensor>) -> Result<Layer> {
        self.new_layer(kind, weight, bias)
    }

    /// A targetable layer at this path from given tensors (a newly initialised task head).
    pub fn new_layer(
        &self,
        kind: ModuleKind,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> Result<Layer> {
        let base = BaseLayer::new(kind, weight, bias)?;
        self.modules.register(self.vb.prefix(), base)
    }
}
