//! `peft_rs.PeftAdapter`: an adapter directory, independent of any model.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use peft_rs::base::{BaseLayer, Conv2dParams};
use peft_rs::peft_adapter::ModuleKinds;
use peft_rs::{BaseModule, PeftAdapter, PeftError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::config::{config_from_py, config_to_py};
use crate::dlpack::{ArrayKind, tensor_from_py};
use crate::errors::{run, to_pyerr};
use crate::layer::{PyAdaptedLayer, conv2d_params, parse_kind};

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

/// `module_types` (`{"lin0": "linear", ...}`, as `peft_rs.module_types` gives) as module kinds;
/// Conv2d modules get `conv` (their stride and padding do not matter to merging).
fn module_kinds(
    module_types: &HashMap<String, String>,
    conv: Conv2dParams,
) -> PyResult<ModuleKinds> {
    module_types
        .iter()
        .map(|(name, kind)| Ok((name.clone(), parse_kind(name, kind, conv)?)))
        .collect()
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
            let kind = parse_kind(&name, &module_types[&name], Conv2dParams::default())?;
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
        // Only the entries the adapter may keep are converted.
        let mut extra = HashMap::new();
        for (k, v) in state_dict.iter() {
            let key: String = k.extract()?;
            if PeftAdapter::may_keep(&peft_config, &key) {
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
        self.inner.config().peft_type()
    }

    #[getter]
    fn adapter_name(&self) -> &str {
        self.inner.adapter_name()
    }

    #[getter]
    fn config(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        config_to_py(py, self.inner.config())
    }

    /// The rank the config gives each adapted module (after `rank_pattern`); empty for methods
    /// without a rank (IA³, OFT, BOFT).
    fn module_ranks(&self) -> PyResult<std::collections::BTreeMap<String, usize>> {
        let config = self.inner.config();
        let mut ranks = std::collections::BTreeMap::new();
        for module in self.inner.module_names() {
            if let Some(r) = config.rank_for(module).map_err(to_pyerr)? {
                ranks.insert(module.to_string(), r);
            }
        }
        Ok(ranks)
    }

    /// Checks the tensors against each other and the config without a model (shape
    /// mismatches, ranks that differ from the config's): `[(module, problem), ...]`, each
    /// problem naming the key and the expected and found shapes; empty when nothing is wrong.
    fn check(&self, py: Python<'_>) -> Vec<(String, String)> {
        py.detach(|| {
            self.inner
                .check()
                .into_iter()
                .map(|p| (p.module, p.message))
                .collect()
        })
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
    /// `state_dict` itself is not modified. `module_types` is `peft_rs.module_types(model)`: the
    /// module kinds come from the model, never from the adapter's tensor shapes.
    #[pyo3(signature = (state_dict, module_types, *, safe_merge=false))]
    fn merge_into<'py>(
        &self,
        py: Python<'py>,
        state_dict: &Bound<'py, PyDict>,
        module_types: HashMap<String, String>,
        safe_merge: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let kinds = module_kinds(&module_types, Conv2dParams::default())?;
        let mut keys: Vec<String> = self.inner.replaced_tensors().keys().cloned().collect();
        for m in self.inner.module_names() {
            keys.push(format!("{m}.weight"));
            keys.push(format!("{m}.bias"));
        }
        let base = pick(state_dict, keys)?;
        let merged = run(py, || self.inner.merge_into(&base, &kinds, safe_merge))?;
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

    /// The `AdaptedLayer` of `module_name` holding this adapter (active), with base weights
    /// from `state_dict` (`<module>.weight`, `<module>.bias`) and the module's kind from
    /// `module_types`. Conv2d hyper-parameters are not in adapter files: pass them for Conv2d.
    #[pyo3(signature = (module_name, state_dict, module_types, *, stride=None, padding=None, dilation=None, groups=1))]
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        py: Python<'_>,
        module_name: &str,
        state_dict: &Bound<'_, PyDict>,
        module_types: HashMap<String, String>,
        stride: Option<&Bound<'_, PyAny>>,
        padding: Option<&Bound<'_, PyAny>>,
        dilation: Option<&Bound<'_, PyAny>>,
        groups: usize,
    ) -> PyResult<PyAdaptedLayer> {
        let kinds = module_kinds(
            &module_types,
            conv2d_params(stride, padding, dilation, groups)?,
        )?;
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
        let inner = run(py, || {
            let base_layer = self.inner.base_layer_from(module_name, &kinds, &base)?;
            if needs_shapes {
                let mut resolved = self.inner.clone();
                resolved.with_shared_from(&base, &kinds)?;
                resolved.layer(module_name, base_layer)
            } else {
                self.inner.layer(module_name, base_layer)
            }
        })?;
        Ok(PyAdaptedLayer { inner, array_kind })
    }

    /// One-shot `layer(module_name, state_dict, module_types).forward(x)` for Linear, Conv1D and
    /// Embedding modules (a Conv2d's stride and padding are not in adapter files: use `layer`).
    fn forward<'py>(
        &self,
        py: Python<'py>,
        module_name: &str,
        x: &Bound<'py, PyAny>,
        state_dict: &Bound<'py, PyDict>,
        module_types: HashMap<String, String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if module_types.get(module_name).map(String::as_str) == Some("conv2d") {
            return Err(to_pyerr(PeftError::InvalidOperation(format!(
                "`{module_name}` is a Conv2d: its stride/padding are not stored in adapter files; \
                 use layer({module_name:?}, state_dict, module_types, stride=..., padding=...).forward(x)"
            ))));
        }
        let layer = self.layer(
            py,
            module_name,
            state_dict,
            module_types,
            None,
            None,
            None,
            1,
        )?;
        layer.forward(py, x)
    }

    /// The tensors under PEFT's file keys (`base_model.model.<module>.lora_A.weight`...), as
    /// numpy arrays or (`framework="torch"`) torch tensors.
    #[pyo3(signature = (framework="numpy"))]
    fn state_dict<'py>(&self, py: Python<'py>, framework: &str) -> PyResult<Bound<'py, PyDict>> {
        let kind = ArrayKind::from_framework(framework)?;
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
