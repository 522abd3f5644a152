//! `peft_rs.PeftAdapter`: an adapter directory, independent of any model.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use peft_rs::base::{BaseLayer, ModuleKind};
use peft_rs::{BaseModule, PeftAdapter, PeftError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::config::{config_from_py, config_to_py};
use crate::dlpack::{ArrayKind, tensor_from_py};
use crate::errors::{run, to_pyerr};
use crate::layers::{conv2d_params_or_default, wrap_layer};

#[pyclass(name = "PeftAdapter", module = "peft_rs._core", frozen)]
pub struct PyPeftAdapter {
    inner: PeftAdapter,
}

/// Converts the entries `keys` of a `state_dict` (those present) to candle tensors.
fn pick(
    state_dict: &Bound<'_, PyDict>,
    keys: impl IntoIterator<Item = String>,
) -> PyResult<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for key in keys {
        if let Some(v) = state_dict.get_item(&key)? {
            out.insert(key, tensor_from_py(&v)?);
        }
    }
    Ok(out)
}

fn parse_kind(name: &str, kind: &str) -> PyResult<ModuleKind> {
    Ok(match kind {
        "linear" => ModuleKind::Linear,
        "conv1d" => ModuleKind::Conv1D,
        "embedding" => ModuleKind::Embedding,
        "conv2d" => ModuleKind::Conv2d(Default::default()),
        other => {
            return Err(crate::errors::value_error(format!(
                "module {name:?}: unknown module type {other:?}; expected linear, conv1d, embedding or conv2d"
            )));
        }
    })
}

#[pymethods]
impl PyPeftAdapter {
    /// Loads an adapter directory written by PEFT's `save_pretrained` (or by `save_pretrained`
    /// here). With `adapter_name`, `path/<adapter_name>` is used when it holds an adapter.
    #[staticmethod]
    #[pyo3(signature = (path, adapter_name=None))]
    fn from_pretrained(
        py: Python<'_>,
        path: PathBuf,
        adapter_name: Option<String>,
    ) -> PyResult<Self> {
        let inner = run(py, || {
            PeftAdapter::from_pretrained(&path, adapter_name.as_deref())
        })?;
        Ok(Self { inner })
    }

    /// A new adapter for a base model given by its `state_dict()` and module types
    /// (`{"lin0": "linear", "emb": "embedding", "c_attn": "conv1d", "conv": "conv2d"}`; see
    /// `peft_rs.module_types`). Every typed module the config selects gets an adapter.
    #[staticmethod]
    #[pyo3(signature = (config, state_dict, module_types, *, adapter_name="default", seed=0))]
    fn create(
        py: Python<'_>,
        config: &Bound<'_, PyAny>,
        state_dict: &Bound<'_, PyDict>,
        module_types: HashMap<String, String>,
        adapter_name: &str,
        seed: u64,
    ) -> PyResult<Self> {
        let peft_config = config_from_py(config)?;
        let mut names: Vec<_> = module_types.keys().cloned().collect();
        names.sort();
        let mut modules = Vec::new();
        for name in names {
            let kind = parse_kind(&name, &module_types[&name])?;
            let weight = state_dict
                .get_item(format!("{name}.weight"))?
                .ok_or_else(|| {
                    to_pyerr(PeftError::MissingKey {
                        key: format!("{name}.weight"),
                        context: "state_dict (module_types names this module)".into(),
                    })
                })?;
            let bias = state_dict.get_item(format!("{name}.bias"))?;
            let layer = BaseLayer::new(
                kind,
                tensor_from_py(&weight)?,
                bias.as_ref().map(tensor_from_py).transpose()?,
            )
            .map_err(to_pyerr)?;
            modules.push(BaseModule { name, layer });
        }
        // Only modules_to_save and biases are copied from the rest of the state dict.
        let mut extra = HashMap::new();
        for (k, v) in state_dict.iter() {
            let key: String = k.extract()?;
            if key.ends_with(".bias")
                || key == "bias"
                || peft_config
                    .modules_to_save()
                    .iter()
                    .any(|m| key.contains(m.as_str()))
            {
                extra.insert(key, tensor_from_py(&v)?);
            }
        }
        let inner = run(py, || {
            PeftAdapter::create(adapter_name, peft_config, modules, &extra, seed)
        })?;
        Ok(Self { inner })
    }

    /// `"LORA"`, ...
    #[getter]
    fn peft_type(&self) -> &'static str {
        self.inner.config().as_adapter_config().peft_type().as_str()
    }

    #[getter]
    fn adapter_name(&self) -> &str {
        self.inner.adapter_name()
    }

    #[getter]
    fn config(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        config_to_py(py, self.inner.config())
    }

    /// Paths of the adapted modules relative to the model (`modules_to_save` not included).
    fn module_names(&self) -> Vec<String> {
        self.inner
            .module_names()
            .into_iter()
            .map(String::from)
            .collect()
    }

    /// A new dict: `state_dict` with every adapted weight (and bias) merged and
    /// `modules_to_save` entries replaced; values keep their array type and dtype, and
    /// `state_dict` itself is not modified.
    #[pyo3(signature = (state_dict, *, safe_merge=false))]
    fn merge_into<'py>(
        &self,
        py: Python<'py>,
        state_dict: &Bound<'py, PyDict>,
        safe_merge: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let mut keys: Vec<String> = self.inner.replaced_tensors().keys().cloned().collect();
        for m in self.inner.module_names() {
            keys.push(format!("{m}.weight"));
            keys.push(format!("{m}.bias"));
        }
        let base = pick(state_dict, keys)?;
        let merged = run(py, || self.inner.merge_into(&base, safe_merge))?;
        let out = state_dict.copy()?;
        for (key, tensor) in merged {
            let kind = ArrayKind::of(
                &state_dict
                    .get_item(&key)?
                    .ok_or_else(|| crate::errors::value_error(key.clone()))?,
            )?;
            out.set_item(key, kind.wrap(py, tensor)?)?;
        }
        Ok(out)
    }

    /// The adapted layer of `module_name`, with base weights taken from `state_dict`
    /// (`<module>.weight`, `<module>.bias`). Conv2d hyper-parameters are not in adapter files:
    /// pass them for Conv2d modules.
    #[pyo3(signature = (module_name, state_dict, *, stride=None, padding=None, dilation=None, groups=1))]
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        py: Python<'_>,
        module_name: &str,
        state_dict: &Bound<'_, PyDict>,
        stride: Option<&Bound<'_, PyAny>>,
        padding: Option<&Bound<'_, PyAny>>,
        dilation: Option<&Bound<'_, PyAny>>,
        groups: usize,
    ) -> PyResult<Py<PyAny>> {
        let mut kind = self.inner.module_kind(module_name).map_err(to_pyerr)?;
        let weight_ndim = match state_dict.get_item(format!("{module_name}.weight"))? {
            Some(w) => w.getattr("ndim")?.extract::<usize>()?,
            None => 0,
        };
        if matches!(kind, ModuleKind::Conv2d(_)) || weight_ndim == 4 {
            kind = ModuleKind::Conv2d(conv2d_params_or_default(
                py, stride, padding, dilation, groups,
            )?);
        }
        let weight_key = format!("{module_name}.weight");
        let array_kind = match state_dict.get_item(&weight_key)? {
            Some(w) => ArrayKind::of(&w)?,
            None => ArrayKind::Numpy,
        };
        let mut keys = vec![weight_key, format!("{module_name}.bias")];
        let needs_shapes = self.inner.needs_model_shapes();
        if needs_shapes {
            // VeRA without saved projections: their size comes from every adapted module.
            keys.extend(
                self.inner
                    .module_names()
                    .iter()
                    .map(|m| format!("{m}.weight")),
            );
        }
        let base = pick(state_dict, keys)?;
        let layer = run(py, || {
            let base_layer = self.inner.base_layer_from(module_name, kind, &base)?;
            if needs_shapes {
                let mut resolved = self.inner.clone();
                resolved.with_shared_from(&base)?;
                resolved.layer(module_name, base_layer)
            } else {
                self.inner.layer(module_name, base_layer)
            }
        })?;
        wrap_layer(py, layer, array_kind)
    }

    /// One-shot `layer(module_name, state_dict).forward(x)` for Linear, Conv1D and Embedding
    /// modules (a Conv2d's stride and padding are not in adapter files: use `layer`).
    fn forward<'py>(
        &self,
        py: Python<'py>,
        module_name: &str,
        x: &Bound<'py, PyAny>,
        state_dict: &Bound<'py, PyDict>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let is_conv = matches!(
            self.inner.module_kind(module_name).map_err(to_pyerr)?,
            ModuleKind::Conv2d(_)
        ) || state_dict
            .get_item(format!("{module_name}.weight"))?
            .map(|w| w.getattr("ndim").and_then(|n| n.extract::<usize>()))
            .transpose()?
            == Some(4);
        if is_conv {
            return Err(to_pyerr(PeftError::InvalidOperation(format!(
                "`{module_name}` is a Conv2d: its stride/padding are not stored in adapter files; \
                 use layer({module_name:?}, state_dict, stride=..., padding=...).forward(x)"
            ))));
        }
        let layer = self.layer(py, module_name, state_dict, None, None, None, 1)?;
        layer.bind(py).call_method1("forward", (x,))
    }

    /// The tensors under PEFT's file keys (`base_model.model.<module>.lora_A.weight`...), as
    /// numpy arrays or (`framework="torch"`) torch tensors.
    #[pyo3(signature = (framework="numpy"))]
    fn state_dict<'py>(&self, py: Python<'py>, framework: &str) -> PyResult<Bound<'py, PyDict>> {
        let kind = match framework {
            "numpy" => ArrayKind::Numpy,
            "torch" => ArrayKind::Torch,
            other => {
                return Err(crate::errors::value_error(format!(
                    "framework must be \"numpy\" or \"torch\", found {other:?}"
                )));
            }
        };
        let d = PyDict::new(py);
        for (k, t) in self.inner.to_state_dict() {
            d.set_item(k, kind.wrap(py, t)?)?;
        }
        Ok(d)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (atomically) into `path`,
    /// or `path/<adapter_name>` for a non-default adapter; returns the directory written.
    fn save_pretrained(&self, py: Python<'_>, path: PathBuf) -> PyResult<PathBuf> {
        run(py, || self.inner.save_pretrained(&path))
    }

    fn __repr__(&self) -> String {
        format!(
            "PeftAdapter(peft_type={:?}, adapter_name={:?}, modules={:?})",
            self.peft_type(),
            self.inner.adapter_name(),
            self.inner.module_names()
        )
    }
}
