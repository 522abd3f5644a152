//! `peft_rs.AdaptedLayer`: one module's base layer with any number of named adapters of any
//! method (the core's `AdaptedModule`), with PEFT's layer methods.

use candle_core::Tensor;
use peft_rs::base::{BaseLayer, Conv2dParams, ModuleKind};
use peft_rs::{AdaptedModule, ParamSource};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::config::{config_from_py, config_to_py};
use crate::dlpack::{ArrayKind, tensor_from_py};
use crate::errors::{run, run_inference, to_pyerr, type_error, value_error};

#[pyclass(name = "AdaptedLayer", module = "peft_rs._core")]
pub struct PyAdaptedLayer {
    pub inner: AdaptedModule,
    /// The array type the base weight came in: outputs that are not a function of an input
    /// (weights) are returned as it.
    pub array_kind: ArrayKind,
}

/// `"linear"`, `"conv1d"`, `"embedding"`, `"conv2d"` (what `peft_rs.module_types` gives).
pub fn parse_kind(module: &str, kind: &str, conv: Conv2dParams) -> PyResult<ModuleKind> {
    Ok(match kind {
        "linear" => ModuleKind::Linear,
        "conv1d" => ModuleKind::Conv1D,
        "embedding" => ModuleKind::Embedding,
        "conv2d" => ModuleKind::Conv2d(conv),
        other => {
            return Err(value_error(format!(
                "module {module:?}: unknown module type {other:?}; expected linear, conv1d, embedding or conv2d"
            )));
        }
    })
}

/// PyTorch conv arguments may be an int or a pair; candle takes one value for both dimensions.
fn square(name: &str, v: Option<&Bound<'_, PyAny>>, default: usize) -> PyResult<usize> {
    let Some(v) = v else {
        return Ok(default);
    };
    if let Ok(n) = v.extract::<usize>() {
        return Ok(n);
    }
    let pair: (usize, usize) = v
        .extract()
        .map_err(|_| type_error(format!("{name} must be an int or a pair of ints")))?;
    if pair.0 != pair.1 {
        return Err(value_error(format!(
            "{name}={pair:?}: only equal values for both spatial dimensions are supported"
        )));
    }
    Ok(pair.0)
}

/// Conv2d hyper-parameters with PyTorch's defaults (stride 1, padding 0, dilation 1).
pub fn conv2d_params(
    stride: Option<&Bound<'_, PyAny>>,
    padding: Option<&Bound<'_, PyAny>>,
    dilation: Option<&Bound<'_, PyAny>>,
    groups: usize,
) -> PyResult<Conv2dParams> {
    Ok(Conv2dParams {
        stride: square("stride", stride, 1)?,
        padding: square("padding", padding, 0)?,
        dilation: square("dilation", dilation, 1)?,
        groups,
    })
}

/// One adapter name, or a list of them.
fn names(obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(vec![s.to_str()?.to_string()]);
    }
    obj.extract::<Vec<String>>()
        .map_err(|_| type_error("adapter names must be a str or a list of str"))
}

fn warn(py: Python<'_>, message: &str) -> PyResult<()> {
    let warnings = py.import("warnings")?;
    warnings.call_method1(
        "warn",
        (message, py.get_type::<pyo3::exceptions::PyUserWarning>(), 2),
    )?;
    Ok(())
}

impl PyAdaptedLayer {
    fn wrap<'py>(&self, py: Python<'py>, t: Tensor) -> PyResult<Bound<'py, PyAny>> {
        self.array_kind.wrap(py, t)
    }

    /// The adapter `name`, or the only active one when `None`.
    fn resolve(&self, name: Option<&str>) -> PyResult<String> {
        match name {
            Some(n) => {
                self.inner.adapter(n).map_err(to_pyerr)?;
                Ok(n.to_string())
            }
            None => match self.inner.active_adapters() {
                [one] => Ok(one.clone()),
                active => Err(value_error(format!(
                    "name an adapter: {} are active",
                    if active.is_empty() {
                        "none".to_string()
                    } else {
                        format!("{active:?}")
                    }
                ))),
            },
        }
    }
}

#[pymethods]
impl PyAdaptedLayer {
    /// A base layer (PyTorch layouts: Linear `(out, in)`, transformers Conv1D `(in, out)`,
    /// Embedding `(num, dim)`, Conv2d `(out, in/groups, kh, kw)`) to add adapters to.
    /// `module_name` is the module's path in its model: per-module config entries
    /// (`rank_pattern`, IA³'s `feedforward_modules`...) are matched against it.
    #[new]
    #[pyo3(signature = (weight, bias=None, *, kind="linear", stride=None, padding=None, dilation=None, groups=1, module_name=""))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        kind: &str,
        stride: Option<&Bound<'_, PyAny>>,
        padding: Option<&Bound<'_, PyAny>>,
        dilation: Option<&Bound<'_, PyAny>>,
        groups: usize,
        module_name: &str,
    ) -> PyResult<Self> {
        let conv = conv2d_params(stride, padding, dilation, groups)?;
        let kind = parse_kind(module_name, kind, conv)?;
        let array_kind = ArrayKind::of(weight)?;
        let weight = tensor_from_py(weight)?;
        let bias = bias.map(tensor_from_py).transpose()?;
        let base = BaseLayer::new(kind, weight, bias).map_err(to_pyerr)?;
        Ok(Self {
            inner: AdaptedModule::new(module_name, base),
            array_kind,
        })
    }

    /// Adds an adapter of `config`'s method: with `weights` (PEFT's tensor names relative to the
    /// module, e.g. `{"lora_A.weight": a, "lora_B.weight": b}`), or initialised as the config
    /// says from `seed`. The first adapter is active; later ones are added inactive (as PEFT).
    #[pyo3(signature = (adapter_name, config, *, weights=None, seed=0))]
    fn add_adapter(
        &mut self,
        py: Python<'_>,
        adapter_name: &str,
        config: &Bound<'_, PyAny>,
        weights: Option<&Bound<'_, PyDict>>,
        seed: u64,
    ) -> PyResult<()> {
        let config = config_from_py(config)?;
        let source = match weights {
            Some(d) => ParamSource::Given(
                d.iter()
                    .map(|(k, v)| Ok((k.extract::<String>()?, tensor_from_py(&v)?)))
                    .collect::<PyResult<_>>()?,
            ),
            None => ParamSource::Init { seed },
        };
        let inner = &mut self.inner;
        run(py, || {
            inner.add(adapter_name, &*config, source, &Default::default())
        })
    }

    /// Activates one adapter or several (a list; several combine in order).
    fn set_adapter(&mut self, py: Python<'_>, adapter_names: &Bound<'_, PyAny>) -> PyResult<()> {
        let names = names(adapter_names)?;
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let unmerged = self.inner.set_active(&refs).map_err(to_pyerr)?;
        if !unmerged.is_empty() {
            warn(
                py,
                "Adapter cannot be set when the model is merged. Unmerging the model first.",
            )?;
        }
        Ok(())
    }

    /// Removes an adapter (an unknown name is an error listing the known ones).
    fn delete_adapter(&mut self, adapter_name: &str) -> PyResult<()> {
        self.inner.delete(adapter_name).map_err(to_pyerr)
    }

    /// `False` makes the forward the base layer's (merged adapters are unmerged first).
    fn enable_adapters(&mut self, py: Python<'_>, enabled: bool) -> PyResult<()> {
        let inner = &mut self.inner;
        run(py, || inner.enable_adapters(enabled)).map(|_| ())
    }

    #[getter]
    fn adapter_names(&self) -> Vec<String> {
        self.inner
            .adapter_names()
            .into_iter()
            .map(String::from)
            .collect()
    }

    #[getter]
    fn active_adapters(&self) -> Vec<String> {
        self.inner.active_adapters().to_vec()
    }

    #[getter]
    fn merged_adapters(&self) -> Vec<String> {
        self.inner
            .merged_adapters()
            .into_iter()
            .map(String::from)
            .collect()
    }

    /// Whether any adapter is merged.
    #[getter]
    fn merged(&self) -> bool {
        self.inner.is_merged()
    }

    #[getter]
    fn disable_adapters(&self) -> bool {
        !self.inner.adapters_enabled()
    }

    /// The layer's output for `x` (any leading batch dims); returns `x`'s array type.
    pub fn forward<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let out_kind = ArrayKind::of(x)?;
        let x = tensor_from_py(x)?;
        let inner = &self.inner;
        let y = run_inference(py, || inner.forward(&x))?;
        out_kind.wrap(py, y)
    }

    fn __call__<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.forward(py, x)
    }

    /// Gradients of `sum(forward(x) * grad_output)` (a vector-Jacobian product): with respect
    /// to `x` (float inputs; `None` for token ids) and to every tensor of the active adapters,
    /// keyed `"<adapter>.<name>"`. Frozen tensors get none. Returns `x`'s array type.
    fn gradients<'py>(
        &mut self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        grad_output: &Bound<'py, PyAny>,
    ) -> PyResult<(Option<Bound<'py, PyAny>>, Bound<'py, PyDict>)> {
        let kind = ArrayKind::of(x)?;
        let x = tensor_from_py(x)?;
        let grad_output = tensor_from_py(grad_output)?;
        let inner = &mut self.inner;
        let (grad_x, grads) = run(py, || inner.gradients(&x, &grad_output))?;
        let d = PyDict::new(py);
        for (k, g) in grads {
            d.set_item(k, kind.wrap(py, g)?)?;
        }
        let grad_x = grad_x.map(|g| kind.wrap(py, g)).transpose()?;
        Ok((grad_x, d))
    }

    /// Folds adapters into the base weight: `adapter_names`, or the active ones. Merged adapters
    /// are skipped with a warning (as PEFT); `safe_merge` checks for NaN/inf before writing.
    #[pyo3(signature = (adapter_names=None, safe_merge=false))]
    fn merge(
        &mut self,
        py: Python<'_>,
        adapter_names: Option<&Bound<'_, PyAny>>,
        safe_merge: bool,
    ) -> PyResult<()> {
        let names = match adapter_names {
            Some(n) if n.is_instance_of::<PyString>() => {
                return Err(type_error(format!(
                    "adapter_names should be a list of strings, got {}.",
                    n.repr()?
                )));
            }
            Some(n) => Some(names(n)?),
            None => None,
        };
        let inner = &mut self.inner;
        let outcome = run(py, || {
            let refs: Option<Vec<&str>> = names
                .as_ref()
                .map(|n| n.iter().map(String::as_str).collect());
            inner.merge(refs.as_deref(), safe_merge)
        })?;
        if !outcome.already_merged.is_empty() {
            let merged = self.inner.merged_adapters().join(",");
            let message = if outcome.merged.is_empty() {
                "All adapters are already merged, nothing to do.".to_string()
            } else {
                format!(
                    "Already following adapters were merged {merged}. You are now additionally merging {}.",
                    outcome.merged.join(",")
                )
            };
            warn(py, &message)?;
        }
        Ok(())
    }

    /// Undoes every merge, last merged first.
    fn unmerge(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        if run(py, || inner.unmerge())?.is_empty() {
            warn(py, "Already unmerged. Nothing to do.")?;
        }
        Ok(())
    }

    /// The weight this layer would have with `adapter_names` (default: the active ones) merged
    /// on top of its current weight; nothing is written.
    #[pyo3(signature = (adapter_names=None))]
    fn merged_weight<'py>(
        &self,
        py: Python<'py>,
        adapter_names: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let names = match adapter_names {
            Some(n) => names(n)?,
            None => self.inner.active_adapters().to_vec(),
        };
        let inner = &self.inner;
        let (w, _) = run(py, || {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            inner.merged_weights(&refs)
        })?;
        self.wrap(py, w)
    }

    /// The base weight as currently held (with merged adapters folded in).
    #[getter]
    fn base_weight<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.wrap(py, self.inner.base().weight().map_err(to_pyerr)?)
    }

    #[getter]
    fn base_bias<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.inner
            .base()
            .bias()
            .map(|b| self.wrap(py, b.clone()))
            .transpose()
    }

    /// An adapter's tensors by PEFT name (`"lora_A.weight"`...), shared with the layer (writing
    /// into them changes the adapter). Default: the only active adapter.
    #[pyo3(signature = (adapter_name=None))]
    fn weights<'py>(
        &self,
        py: Python<'py>,
        adapter_name: Option<&str>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let name = self.resolve(adapter_name)?;
        let d = PyDict::new(py);
        for (n, t) in self
            .inner
            .adapter(&name)
            .map_err(to_pyerr)?
            .params()
            .entries()
        {
            d.set_item(n, self.wrap(py, t.clone())?)?;
        }
        Ok(d)
    }

    /// Number of adapter parameters: of one adapter, or of all when `adapter_name` is `None`.
    #[pyo3(signature = (adapter_name=None))]
    fn num_parameters(&self, adapter_name: Option<&str>) -> PyResult<usize> {
        let count = |name: &str| -> PyResult<usize> {
            Ok(self
                .inner
                .adapter(name)
                .map_err(to_pyerr)?
                .params()
                .num_elements())
        };
        match adapter_name {
            Some(n) => count(n),
            None => self.inner.adapter_names().into_iter().map(count).sum(),
        }
    }

    /// An adapter's config (default: the only active adapter).
    #[pyo3(signature = (adapter_name=None))]
    fn config(&self, py: Python<'_>, adapter_name: Option<&str>) -> PyResult<Py<PyAny>> {
        let name = self.resolve(adapter_name)?;
        let adapter = self.inner.adapter(&name).map_err(to_pyerr)?;
        let config =
            peft_rs::PeftConfig::from_json(adapter.config().to_json()).map_err(to_pyerr)?;
        config_to_py(py, &config)
    }

    /// Training mode turns on dropout and the methods' other training-only behaviour.
    #[pyo3(signature = (mode=true))]
    fn train(&mut self, mode: bool) {
        self.inner.set_training(mode);
    }

    fn eval(&mut self) {
        self.inner.set_training(false);
    }

    #[getter]
    fn training(&self) -> bool {
        self.inner.is_training()
    }

    fn __repr__(&self) -> String {
        let base = self.inner.base();
        format!(
            "AdaptedLayer(module={:?}, kind={:?}, in_features={}, out_features={}, adapters={:?}, active={:?}, merged={:?})",
            self.inner.name(),
            base.kind(),
            base.in_features(),
            base.out_features(),
            self.inner.adapter_names(),
            self.inner.active_adapters(),
            self.inner.merged_adapters()
        )
    }
}
