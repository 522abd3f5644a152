//! `peft_rs.PeftModel`: a `Model` with named adapters, with PEFT's method names.

use std::path::PathBuf;

use peft_rs::model::PeftModel;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::config::{config_from_py, config_to_py};
use crate::dlpack::ArrayKind;
use crate::errors::{run, run_inference, to_pyerr, type_error};
use crate::model::{PyModel, input};

#[pyclass(name = "PeftModel", module = "peft_rs._core")]
pub struct PyPeftModel {
    /// `None` once `merge_and_unload` has handed the model back.
    inner: Option<PeftModel>,
}

fn names(obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(vec![s.to_str()?.to_string()]);
    }
    obj.extract::<Vec<String>>()
        .map_err(|_| type_error("adapter names must be a str or a list of str"))
}

impl PyPeftModel {
    pub(crate) fn get(&self) -> PyResult<&PeftModel> {
        self.inner.as_ref().ok_or_else(unloaded)
    }

    pub(crate) fn get_mut(&mut self) -> PyResult<&mut PeftModel> {
        self.inner.as_mut().ok_or_else(unloaded)
    }
}

fn unloaded() -> PyErr {
    to_pyerr(peft_rs::PeftError::InvalidOperation(
        "this PeftModel was unloaded by merge_and_unload; use the model it returned".into(),
    ))
}

#[pymethods]
impl PyPeftModel {
    /// `model` with the adapter saved in `path` (by PEFT or peft_rs) as `adapter_name`, active.
    /// The model is shared, not copied: as in PEFT, the base model object sees the adapters.
    #[staticmethod]
    #[pyo3(signature = (model, path, adapter_name="default"))]
    fn from_pretrained(
        py: Python<'_>,
        model: &PyModel,
        path: PathBuf,
        adapter_name: &str,
    ) -> PyResult<Self> {
        let base = model.inner.clone();
        let inner = run(py, || PeftModel::from_pretrained(base, &path, adapter_name))?;
        Ok(Self { inner: Some(inner) })
    }

    /// PEFT's `get_peft_model`: a new adapter initialised as `config` says.
    #[staticmethod]
    #[pyo3(signature = (model, config, adapter_name="default", seed=0))]
    fn get_peft_model(
        py: Python<'_>,
        model: &PyModel,
        config: &Bound<'_, PyAny>,
        adapter_name: &str,
        seed: u64,
    ) -> PyResult<Self> {
        let config = config_from_py(config)?;
        let mut inner = PeftModel::new(model.inner.clone());
        run(py, || inner.add_adapter(adapter_name, config, seed))?;
        Ok(Self { inner: Some(inner) })
    }

    /// Loads another adapter directory as `adapter_name` (inactive, as PEFT).
    fn load_adapter(&mut self, py: Python<'_>, path: PathBuf, adapter_name: &str) -> PyResult<()> {
        let inner = self.get_mut()?;
        run(py, || inner.load_adapter(&path, adapter_name))
    }

    /// A new adapter initialised as `config` says (inactive, as PEFT).
    #[pyo3(signature = (adapter_name, config, seed=0))]
    fn add_adapter(
        &mut self,
        py: Python<'_>,
        adapter_name: &str,
        config: &Bound<'_, PyAny>,
        seed: u64,
    ) -> PyResult<()> {
        let config = config_from_py(config)?;
        let inner = self.get_mut()?;
        run(py, || inner.add_adapter(adapter_name, config, seed))
    }

    /// PEFT's `add_weighted_adapter`: a new LoRA or IA³ adapter combining `adapters` with
    /// `weights` (inactive; nothing happens if `adapter_name` exists). `combination_type`: LoRA's
    /// (default "svd"); IA³ takes none. `seed` seeds DARE's masks. Returns `None`, or for
    /// "exact_svd" `{module: relative truncation error ‖ΔW − B A‖_F / ‖ΔW‖_F}` (`None` if
    /// `adapter_name` existed).
    #[pyo3(signature = (
        adapters, weights, adapter_name, combination_type=None, svd_rank=None, svd_clamp=None,
        svd_full_matrices=true, density=None, majority_sign_method="total", seed=0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn add_weighted_adapter(
        &mut self,
        py: Python<'_>,
        adapters: Vec<String>,
        weights: Vec<f64>,
        adapter_name: &str,
        combination_type: Option<&str>,
        svd_rank: Option<usize>,
        svd_clamp: Option<f64>,
        svd_full_matrices: bool,
        density: Option<f64>,
        majority_sign_method: &str,
        seed: u64,
    ) -> PyResult<Option<std::collections::BTreeMap<String, f64>>> {
        let (combination, options) = crate::arithmetic::combine_options(
            combination_type,
            svd_rank,
            svd_clamp,
            svd_full_matrices,
            density,
            majority_sign_method,
            seed,
        )?;
        let inner = self.get_mut()?;
        let names: Vec<&str> = adapters.iter().map(String::as_str).collect();
        let report = run(py, || {
            inner.add_weighted_adapter(&names, &weights, adapter_name, combination, &options)
        })?;
        Ok(report
            .filter(|_| combination == Some(peft_rs::arithmetic::Combination::ExactSvd))
            .map(|r| r.truncation_errors))
    }

    /// Activates one adapter, or several (a list: they combine on every layer, in order).
    fn set_adapter(&mut self, adapter_name: &Bound<'_, PyAny>) -> PyResult<()> {
        let names = names(adapter_name)?;
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        self.get_mut()?.set_adapter(&refs).map_err(to_pyerr)
    }

    #[getter]
    fn active_adapters(&self) -> PyResult<Vec<String>> {
        Ok(self.get()?.active_adapters().to_vec())
    }

    /// The first active adapter (PEFT's `active_adapter`), or `None`.
    #[getter]
    fn active_adapter(&self) -> PyResult<Option<String>> {
        Ok(self.get()?.active_adapters().first().cloned())
    }

    /// Adapter name → config, in insertion order (PEFT's `peft_config`).
    #[getter]
    fn peft_config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let inner = self.get()?;
        let d = PyDict::new(py);
        for name in inner.adapter_names() {
            d.set_item(
                name,
                config_to_py(py, inner.config(name).map_err(to_pyerr)?)?,
            )?;
        }
        Ok(d)
    }

    /// The underlying model (sharing its layers with this PeftModel).
    #[getter]
    fn base_model(&self) -> PyResult<PyModel> {
        Ok(PyModel {
            inner: self.get()?.model().clone(),
        })
    }

    /// The model's output; with `adapter_names` (one per row, `"__base__"` for none), each row
    /// uses its own adapter.
    #[pyo3(signature = (input_ids, attention_mask=None, token_type_ids=None, adapter_names=None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        token_type_ids: Option<&Bound<'py, PyAny>>,
        adapter_names: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kind = ArrayKind::of(input_ids)?;
        let input = input(input_ids, attention_mask, token_type_ids)?;
        let inner = self.get()?;
        let out = run_inference(py, || match &adapter_names {
            Some(names) => inner.forward_mixed(&input, names),
            None => inner.forward(&input),
        })?;
        kind.wrap(py, out)
    }

    #[pyo3(signature = (input_ids, attention_mask=None, token_type_ids=None, adapter_names=None))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        token_type_ids: Option<&Bound<'py, PyAny>>,
        adapter_names: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.forward(py, input_ids, attention_mask, token_type_ids, adapter_names)
    }

    /// Greedy decoding; with `adapter_names`, each row decodes with its own adapter.
    #[pyo3(signature = (input_ids, max_new_tokens=20, attention_mask=None, adapter_names=None))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        max_new_tokens: usize,
        attention_mask: Option<&Bound<'py, PyAny>>,
        adapter_names: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kind = ArrayKind::of(input_ids)?;
        let input = input(input_ids, attention_mask, None)?;
        let inner = self.get()?;
        let out = run_inference(py, || {
            inner.generate(&input, max_new_tokens, adapter_names.as_deref())
        })?;
        kind.wrap(py, out)
    }

    /// A context manager: adapters disabled inside `with model.disable_adapter():`, enabled
    /// again on exit (merged adapters are unmerged on entry, as PEFT ends up doing).
    fn disable_adapter(slf: Py<Self>) -> DisabledAdapters {
        DisabledAdapters { model: slf }
    }

    fn enable_adapter_layers(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = self.get_mut()?;
        run(py, || inner.enable_adapters(true))
    }

    fn disable_adapter_layers(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = self.get_mut()?;
        run(py, || inner.enable_adapters(false))
    }

    #[pyo3(signature = (adapter_names=None, safe_merge=false))]
    fn merge_adapter(
        &mut self,
        py: Python<'_>,
        adapter_names: Option<Vec<String>>,
        safe_merge: bool,
    ) -> PyResult<()> {
        let inner = self.get_mut()?;
        run(py, || {
            let refs: Option<Vec<&str>> = adapter_names
                .as_ref()
                .map(|n| n.iter().map(String::as_str).collect());
            inner.merge_adapter(refs.as_deref(), safe_merge)
        })
    }

    fn unmerge_adapter(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = self.get_mut()?;
        run(py, || inner.unmerge_adapter())
    }

    fn delete_adapter(&mut self, adapter_name: &str) -> PyResult<()> {
        self.get_mut()?
            .delete_adapter(adapter_name)
            .map_err(to_pyerr)
    }

    /// Replaces `adapter_name`'s weights in place from `path` (same method and shapes); on any
    /// mismatch the old adapter is left as it was.
    fn hotswap_adapter(
        &mut self,
        py: Python<'_>,
        path: PathBuf,
        adapter_name: &str,
    ) -> PyResult<()> {
        let inner = self.get_mut()?;
        run(py, || inner.hotswap_adapter(&path, adapter_name))
    }

    /// The base model with the active adapters merged and every adapter removed. This PeftModel
    /// is unusable afterwards.
    #[pyo3(signature = (safe_merge=false))]
    fn merge_and_unload(&mut self, py: Python<'_>, safe_merge: bool) -> PyResult<PyModel> {
        let inner = self.inner.take().ok_or_else(unloaded)?;
        let model = run(py, || inner.merge_and_unload(safe_merge))?;
        Ok(PyModel { inner: model })
    }

    /// PEFT's layout: the default adapter in `path`, others in `path/<name>`.
    #[pyo3(signature = (path, selected_adapters=None))]
    fn save_pretrained(
        &self,
        py: Python<'_>,
        path: PathBuf,
        selected_adapters: Option<Vec<String>>,
    ) -> PyResult<Vec<PathBuf>> {
        let inner = self.get()?;
        run(py, || {
            let refs: Option<Vec<&str>> = selected_adapters
                .as_ref()
                .map(|n| n.iter().map(String::as_str).collect());
            inner.save_pretrained(&path, refs.as_deref())
        })
    }

    /// PEFT's `set_requires_grad`: freezes (`False`) or unfreezes the tensors of the named
    /// adapters. A `Trainer` made afterwards trains only unfrozen tensors.
    #[pyo3(signature = (adapter_names, requires_grad=true))]
    fn set_requires_grad(
        &self,
        adapter_names: &Bound<'_, PyAny>,
        requires_grad: bool,
    ) -> PyResult<()> {
        let inner = self.get()?;
        for name in names(adapter_names)? {
            inner
                .set_frozen(&name, None, !requires_grad)
                .map_err(to_pyerr)?;
        }
        Ok(())
    }

    /// The adapter's tensors as PEFT saves them (PEFT's `get_peft_model_state_dict`), numpy
    /// arrays or (`framework="torch"`) torch tensors.
    #[pyo3(signature = (adapter_name="default", framework="numpy"))]
    fn get_peft_model_state_dict<'py>(
        &self,
        py: Python<'py>,
        adapter_name: &str,
        framework: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let kind = ArrayKind::from_framework(framework)?;
        let adapter = self.get()?.adapter(adapter_name).map_err(to_pyerr)?;
        let d = PyDict::new(py);
        for (k, t) in adapter.to_state_dict() {
            d.set_item(k, kind.wrap(py, t)?)?;
        }
        Ok(d)
    }

    /// `(trainable, all)` parameter counts over the adapted layers (PEFT's
    /// `get_nb_trainable_parameters`, restricted to the layers peft-rs wraps).
    fn get_nb_trainable_parameters(&self) -> PyResult<(usize, usize)> {
        Ok(self.get()?.num_parameters())
    }

    fn print_trainable_parameters(&self) -> PyResult<()> {
        let (trainable, all) = self.get()?.num_parameters();
        let share = 100.0 * trainable as f64 / all.max(1) as f64;
        println!(
            "trainable params: {} || all params: {} || trainable%: {share:.4}",
            thousands(trainable),
            thousands(all)
        );
        Ok(())
    }

    fn __repr__(&self) -> String {
        match &self.inner {
            Some(m) => format!(
                "PeftModel({}, adapters={:?}, active={:?})",
                m.model().architecture(),
                m.adapter_names(),
                m.active_adapters()
            ),
            None => "PeftModel(unloaded)".into(),
        }
    }
}

/// `1234567` → `"1,234,567"` (Python's `{:,d}`).
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// What `PeftModel.disable_adapter()` returns.
#[pyclass(module = "peft_rs._core")]
pub struct DisabledAdapters {
    model: Py<PyPeftModel>,
}

#[pymethods]
impl DisabledAdapters {
    fn __enter__(&self, py: Python<'_>) -> PyResult<()> {
        self.model.borrow_mut(py).disable_adapter_layers(py)
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.model.borrow_mut(py).enable_adapter_layers(py)?;
        Ok(false)
    }
}
