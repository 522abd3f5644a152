//! Adapted-layer classes: one per module kind, all with the methods of `peft_rs.Adapter`.

use std::collections::BTreeMap;

use candle_core::Tensor;
use peft_rs::base::{BaseLayer, Conv2dParams, ModuleKind};
use peft_rs::config::ModuleSelector;
use peft_rs::{AdapterLayer, PeftConfig, PeftType};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::config::{PyAdaLoraConfig, PyIa3Config, PyLoraConfig, PyVeraConfig, config_to_py};
use crate::dlpack::{ArrayKind, tensor_from_py};
use crate::errors::{run, to_pyerr};

/// The state every layer class holds: the Rust layer and the array type its weights came in.
pub struct LayerState {
    pub layer: Box<dyn AdapterLayer>,
    pub kind: ArrayKind,
}

impl LayerState {
    fn forward<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let out_kind = ArrayKind::of(x)?;
        let x = tensor_from_py(x)?;
        let y = run(py, || self.layer.forward(&x))?;
        out_kind.wrap(py, y)
    }

    fn weights<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, t) in self.layer.weights() {
            d.set_item(name, self.kind.wrap(py, t)?)?;
        }
        Ok(d)
    }
}

/// Adapter tensors passed to a constructor: all of them, or none (then the layer is
/// initialised as the config says).
fn given_weights(
    named: &[(&str, Option<&Bound<'_, PyAny>>)],
) -> PyResult<Option<Vec<(String, Tensor)>>> {
    let given: Vec<_> = named
        .iter()
        .filter_map(|(n, t)| t.map(|t| (*n, t)))
        .collect();
    if given.is_empty() {
        return Ok(None);
    }
    given
        .into_iter()
        .map(|(n, t)| Ok((n.to_string(), tensor_from_py(t)?)))
        .collect::<PyResult<_>>()
        .map(Some)
}

fn build_layer(
    py: Python<'_>,
    module_name: &str,
    base: BaseLayer,
    config: PeftConfig,
    weights: Option<Vec<(String, Tensor)>>,
    seed: u64,
) -> PyResult<Box<dyn AdapterLayer>> {
    build_layer_with(
        py,
        module_name,
        base,
        config,
        weights,
        seed,
        &BTreeMap::new(),
    )
}

fn build_layer_with(
    py: Python<'_>,
    module_name: &str,
    base: BaseLayer,
    config: PeftConfig,
    weights: Option<Vec<(String, Tensor)>>,
    seed: u64,
    shared: &BTreeMap<String, Tensor>,
) -> PyResult<Box<dyn AdapterLayer>> {
    run(py, || match weights {
        Some(w) => config.build_layer(module_name, base, w, shared),
        None => config.init_layer(module_name, base, seed, shared),
    })
}

fn lora_config(config: Option<&PyLoraConfig>) -> PeftConfig {
    PeftConfig::Lora(config.map(|c| c.inner.clone()).unwrap_or_default())
}

/// IA³'s feed-forward flag comes from `feedforward_modules` matched against `module_name`; a
/// standalone layer may set it directly (`feedforward_modules` then selects every module or none).
fn ia3_config(config: Option<&PyIa3Config>, feedforward: Option<bool>) -> PeftConfig {
    let mut config = config.map(|c| c.inner.clone()).unwrap_or_default();
    if let Some(ff) = feedforward {
        config.feedforward_modules = ff.then(|| ModuleSelector::Regex(".*".into()));
    }
    PeftConfig::Ia3(config)
}

fn base_layer(
    kind: ModuleKind,
    weight: &Bound<'_, PyAny>,
    bias: Option<&Bound<'_, PyAny>>,
) -> PyResult<(BaseLayer, ArrayKind)> {
    let array_kind = ArrayKind::of(weight)?;
    let weight = tensor_from_py(weight)?;
    let bias = bias.map(tensor_from_py).transpose()?;
    Ok((
        BaseLayer::new(kind, weight, bias).map_err(to_pyerr)?,
        array_kind,
    ))
}

/// PyTorch conv arguments may be an int or a tuple; candle needs one value for both dimensions.
fn square(name: &str, v: &Bound<'_, PyAny>) -> PyResult<usize> {
    if let Ok(n) = v.extract::<usize>() {
        return Ok(n);
    }
    let pair: (usize, usize) = v.extract().map_err(|_| {
        crate::errors::type_error(format!("{name} must be an int or a pair of ints"))
    })?;
    if pair.0 != pair.1 {
        return Err(crate::errors::value_error(format!(
            "{name}={pair:?}: only equal values for both spatial dimensions are supported"
        )));
    }
    Ok(pair.0)
}

pub fn conv2d_params(
    stride: &Bound<'_, PyAny>,
    padding: &Bound<'_, PyAny>,
    dilation: &Bound<'_, PyAny>,
    groups: usize,
) -> PyResult<Conv2dParams> {
    Ok(Conv2dParams {
        stride: square("stride", stride)?,
        padding: square("padding", padding)?,
        dilation: square("dilation", dilation)?,
        groups,
    })
}

/// Conv2d hyper-parameters with PyTorch's defaults (stride 1, padding 0, dilation 1).
pub fn conv2d_params_or_default(
    py: Python<'_>,
    stride: Option<&Bound<'_, PyAny>>,
    padding: Option<&Bound<'_, PyAny>>,
    dilation: Option<&Bound<'_, PyAny>>,
    groups: usize,
) -> PyResult<Conv2dParams> {
    let one = 1usize.into_pyobject(py)?.into_any();
    let zero = 0usize.into_pyobject(py)?.into_any();
    conv2d_params(
        stride.unwrap_or(&one),
        padding.unwrap_or(&zero),
        dilation.unwrap_or(&one),
        groups,
    )
}

/// The Python object for an adapted layer, of the class matching its method and module kind.
pub fn wrap_layer(
    py: Python<'_>,
    layer: Box<dyn AdapterLayer>,
    kind: ArrayKind,
) -> PyResult<Py<PyAny>> {
    let method = layer.config().peft_type();
    let module_kind = layer.base().kind();
    let state = LayerState { layer, kind };
    Ok(match (method, module_kind) {
        (PeftType::Lora, ModuleKind::Linear | ModuleKind::Conv1D) => {
            Py::new(py, LoraLinear { state })?.into_any()
        }
        (PeftType::Lora, ModuleKind::Embedding) => Py::new(py, LoraEmbedding { state })?.into_any(),
        (PeftType::Lora, ModuleKind::Conv2d(_)) => Py::new(py, LoraConv2d { state })?.into_any(),
        (PeftType::AdaLora, _) => Py::new(py, AdaLoraLinear { state })?.into_any(),
        (PeftType::Vera, _) => Py::new(py, VeraLinear { state })?.into_any(),
        (PeftType::Ia3, ModuleKind::Conv2d(_)) => Py::new(py, IA3Conv2d { state })?.into_any(),
        (PeftType::Ia3, _) => Py::new(py, IA3Linear { state })?.into_any(),
    })
}

/// The methods shared by every layer class (the `peft_rs.Adapter` protocol).
macro_rules! adapter_class {
    ($cls:ident { $($constructor:tt)* }) => {
        #[pymethods]
        impl $cls {
            $($constructor)*

            /// The adapted layer's output (unmerged path unless merged); returns the input's type.
            fn forward<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
                self.state.forward(py, x)
            }

            fn __call__<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
                self.state.forward(py, x)
            }

            /// Folds the adapter into the base weight (`safe_merge` checks for NaN/inf first).
            #[pyo3(signature = (safe_merge=false))]
            fn merge(&mut self, py: Python<'_>, safe_merge: bool) -> PyResult<()> {
                let layer = &mut self.state.layer;
                run(py, || layer.merge(safe_merge))
            }

            fn unmerge(&mut self, py: Python<'_>) -> PyResult<()> {
                let layer = &mut self.state.layer;
                run(py, || layer.unmerge())
            }

            #[getter]
            fn merged(&self) -> bool {
                self.state.layer.is_merged()
            }

            /// The additive change to the base weight, in the base weight's layout.
            fn delta_weight<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                let layer = &self.state.layer;
                let d = run(py, || layer.delta_weight())?;
                self.state.kind.wrap(py, d)
            }

            /// The base weight as currently held (merged into while merged).
            #[getter]
            fn base_weight<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                self.state.kind.wrap(py, self.state.layer.base().weight().clone())
            }

            #[getter]
            fn base_bias<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
                self.state.layer.base().bias().map(|b| self.state.kind.wrap(py, b.clone())).transpose()
            }

            fn num_parameters(&self) -> usize {
                self.state.layer.num_parameters()
            }

            /// Trainable tensors by PEFT name (`"lora_A.weight"`...), shared with the layer.
            fn weights<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                self.state.weights(py)
            }

            #[getter]
            fn config(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
                let json = self.state.layer.config().to_json();
                let config = peft_rs::PeftConfig::from_json(json).map_err(to_pyerr)?;
                config_to_py(py, &config)
            }

            /// Training mode turns dropout on.
            #[pyo3(signature = (mode=true))]
            fn train(&mut self, mode: bool) {
                self.state.layer.set_training(mode);
            }

            fn eval(&mut self) {
                self.state.layer.set_training(false);
            }

            #[getter]
            fn training(&self) -> bool {
                self.state.layer.is_training()
            }

            fn __repr__(&self) -> String {
                let base = self.state.layer.base();
                format!(
                    "{}(kind={:?}, in_features={}, out_features={}, merged={})",
                    stringify!($cls),
                    base.kind(),
                    base.in_features(),
                    base.out_features(),
                    self.state.layer.is_merged()
                )
            }
        }
    };
}

/// LoRA on `nn.Linear` (weight `(out, in)`) or, with `fan_in_fan_out=True`, on transformers'
/// `Conv1D` (weight `(in, out)`).
#[pyclass(module = "peft_rs._core")]
pub struct LoraLinear {
    state: LayerState,
}

adapter_class!(LoraLinear {
    #[new]
    #[pyo3(signature = (weight, bias=None, *, config=None, lora_A=None, lora_B=None, lora_B_bias=None, lora_magnitude_vector=None, fan_in_fan_out=false, module_name="", seed=0))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        config: Option<PyRef<'_, PyLoraConfig>>,
        lora_A: Option<&Bound<'_, PyAny>>,
        lora_B: Option<&Bound<'_, PyAny>>,
        lora_B_bias: Option<&Bound<'_, PyAny>>,
        lora_magnitude_vector: Option<&Bound<'_, PyAny>>,
        fan_in_fan_out: bool,
        module_name: &str,
        seed: u64,
    ) -> PyResult<Self> {
        let kind = if fan_in_fan_out { ModuleKind::Conv1D } else { ModuleKind::Linear };
        let (base, array_kind) = base_layer(kind, weight, bias)?;
        let weights = given_weights(&[
            (peft_rs::adapters::lora::LORA_A, lora_A),
            (peft_rs::adapters::lora::LORA_B, lora_B),
            (peft_rs::adapters::lora::LORA_B_BIAS, lora_B_bias),
            (peft_rs::adapters::dora::LORA_MAGNITUDE, lora_magnitude_vector),
        ])?;
        let layer = build_layer(py, module_name, base, lora_config(config.as_deref()), weights, seed)?;
        Ok(Self { state: LayerState { layer, kind: array_kind } })
    }
});

/// LoRA on `nn.Embedding` (weight `(num_embeddings, embedding_dim)`); `forward` takes token ids.
#[pyclass(module = "peft_rs._core")]
pub struct LoraEmbedding {
    state: LayerState,
}

adapter_class!(LoraEmbedding {
    #[new]
    #[pyo3(signature = (weight, *, config=None, lora_embedding_A=None, lora_embedding_B=None, lora_magnitude_vector=None, module_name="", seed=0))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        weight: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, PyLoraConfig>>,
        lora_embedding_A: Option<&Bound<'_, PyAny>>,
        lora_embedding_B: Option<&Bound<'_, PyAny>>,
        lora_magnitude_vector: Option<&Bound<'_, PyAny>>,
        module_name: &str,
        seed: u64,
    ) -> PyResult<Self> {
        let (base, array_kind) = base_layer(ModuleKind::Embedding, weight, None)?;
        let weights = given_weights(&[
            (peft_rs::adapters::lora::LORA_EMBEDDING_A, lora_embedding_A),
            (peft_rs::adapters::lora::LORA_EMBEDDING_B, lora_embedding_B),
            (peft_rs::adapters::dora::LORA_MAGNITUDE, lora_magnitude_vector),
        ])?;
        let layer = build_layer(py, module_name, base, lora_config(config.as_deref()), weights, seed)?;
        Ok(Self { state: LayerState { layer, kind: array_kind } })
    }
});

/// LoRA on `nn.Conv2d` (weight `(out, in / groups, kh, kw)`).
#[pyclass(module = "peft_rs._core")]
pub struct LoraConv2d {
    state: LayerState,
}

adapter_class!(LoraConv2d {
    #[new]
    #[pyo3(signature = (weight, bias=None, *, stride=None, padding=None, dilation=None, groups=1, config=None, lora_A=None, lora_B=None, lora_B_bias=None, lora_magnitude_vector=None, module_name="", seed=0))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        stride: Option<&Bound<'_, PyAny>>,
        padding: Option<&Bound<'_, PyAny>>,
        dilation: Option<&Bound<'_, PyAny>>,
        groups: usize,
        config: Option<PyRef<'_, PyLoraConfig>>,
        lora_A: Option<&Bound<'_, PyAny>>,
        lora_B: Option<&Bound<'_, PyAny>>,
        lora_B_bias: Option<&Bound<'_, PyAny>>,
        lora_magnitude_vector: Option<&Bound<'_, PyAny>>,
        module_name: &str,
        seed: u64,
    ) -> PyResult<Self> {
        let params = conv2d_params_or_default(py, stride, padding, dilation, groups)?;
        let (base, array_kind) = base_layer(ModuleKind::Conv2d(params), weight, bias)?;
        let weights = given_weights(&[
            (peft_rs::adapters::lora::LORA_A, lora_A),
            (peft_rs::adapters::lora::LORA_B, lora_B),
            (peft_rs::adapters::lora::LORA_B_BIAS, lora_B_bias),
            (peft_rs::adapters::dora::LORA_MAGNITUDE, lora_magnitude_vector),
        ])?;
        let layer = build_layer(py, module_name, base, lora_config(config.as_deref()), weights, seed)?;
        Ok(Self { state: LayerState { layer, kind: array_kind } })
    }
});

/// IA³ on `nn.Linear` or (with `fan_in_fan_out=True`) transformers' `Conv1D`. The input is scaled
/// when the module is feed-forward (`feedforward=True`, or `config.feedforward_modules` matching
/// `module_name`), the output otherwise.
#[pyclass(module = "peft_rs._core")]
pub struct IA3Linear {
    state: LayerState,
}

adapter_class!(IA3Linear {
    #[new]
    #[pyo3(signature = (weight, bias=None, *, config=None, ia3_l=None, feedforward=None, fan_in_fan_out=false, module_name="", seed=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        config: Option<PyRef<'_, PyIa3Config>>,
        ia3_l: Option<&Bound<'_, PyAny>>,
        feedforward: Option<bool>,
        fan_in_fan_out: bool,
        module_name: &str,
        seed: u64,
    ) -> PyResult<Self> {
        let kind = if fan_in_fan_out { ModuleKind::Conv1D } else { ModuleKind::Linear };
        let (base, array_kind) = base_layer(kind, weight, bias)?;
        let weights = given_weights(&[(peft_rs::adapters::ia3::IA3_L, ia3_l)])?;
        let config = ia3_config(config.as_deref(), feedforward);
        let layer = build_layer(py, module_name, base, config, weights, seed)?;
        Ok(Self { state: LayerState { layer, kind: array_kind } })
    }
});

/// IA³ on `nn.Conv2d`.
#[pyclass(module = "peft_rs._core")]
pub struct IA3Conv2d {
    state: LayerState,
}

adapter_class!(IA3Conv2d {
    #[new]
    #[pyo3(signature = (weight, bias=None, *, stride=None, padding=None, dilation=None, groups=1, config=None, ia3_l=None, feedforward=None, module_name="", seed=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        stride: Option<&Bound<'_, PyAny>>,
        padding: Option<&Bound<'_, PyAny>>,
        dilation: Option<&Bound<'_, PyAny>>,
        groups: usize,
        config: Option<PyRef<'_, PyIa3Config>>,
        ia3_l: Option<&Bound<'_, PyAny>>,
        feedforward: Option<bool>,
        module_name: &str,
        seed: u64,
    ) -> PyResult<Self> {
        let params = conv2d_params_or_default(py, stride, padding, dilation, groups)?;
        let (base, array_kind) = base_layer(ModuleKind::Conv2d(params), weight, bias)?;
        let weights = given_weights(&[(peft_rs::adapters::ia3::IA3_L, ia3_l)])?;
        let config = ia3_config(config.as_deref(), feedforward);
        let layer = build_layer(py, module_name, base, config, weights, seed)?;
        Ok(Self { state: LayerState { layer, kind: array_kind } })
    }
});

/// AdaLoRA on `nn.Linear` or (with `fan_in_fan_out=True`) transformers' `Conv1D`; the module's rank
/// comes from `config.rank_pattern` (`init_r` if absent).
#[pyclass(module = "peft_rs._core")]
pub struct AdaLoraLinear {
    state: LayerState,
}

adapter_class!(AdaLoraLinear {
    #[new]
    #[pyo3(signature = (weight, bias=None, *, config, lora_A=None, lora_B=None, lora_E=None, fan_in_fan_out=false, module_name="", seed=0))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        config: PyRef<'_, PyAdaLoraConfig>,
        lora_A: Option<&Bound<'_, PyAny>>,
        lora_B: Option<&Bound<'_, PyAny>>,
        lora_E: Option<&Bound<'_, PyAny>>,
        fan_in_fan_out: bool,
        module_name: &str,
        seed: u64,
    ) -> PyResult<Self> {
        let kind = if fan_in_fan_out { ModuleKind::Conv1D } else { ModuleKind::Linear };
        let (base, array_kind) = base_layer(kind, weight, bias)?;
        let weights = given_weights(&[
            (peft_rs::adapters::adalora::ADALORA_A, lora_A),
            (peft_rs::adapters::adalora::ADALORA_B, lora_B),
            (peft_rs::adapters::adalora::ADALORA_E, lora_E),
        ])?;
        let layer = build_layer(py, module_name, base, config.peft_config(), weights, seed)?;
        Ok(Self { state: LayerState { layer, kind: array_kind } })
    }
});

/// VeRA on `nn.Linear` or (with `fan_in_fan_out=True`) transformers' `Conv1D`. The shared
/// projections are given, or generated from `config.projection_prng_key` at this layer's size.
#[pyclass(module = "peft_rs._core")]
pub struct VeraLinear {
    state: LayerState,
}

adapter_class!(VeraLinear {
    #[new]
    #[pyo3(signature = (weight, bias=None, *, config=None, vera_A=None, vera_B=None, vera_lambda_b=None, vera_lambda_d=None, fan_in_fan_out=false, module_name="", seed=0))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        config: Option<PyRef<'_, PyVeraConfig>>,
        vera_A: Option<&Bound<'_, PyAny>>,
        vera_B: Option<&Bound<'_, PyAny>>,
        vera_lambda_b: Option<&Bound<'_, PyAny>>,
        vera_lambda_d: Option<&Bound<'_, PyAny>>,
        fan_in_fan_out: bool,
        module_name: &str,
        seed: u64,
    ) -> PyResult<Self> {
        let kind = if fan_in_fan_out { ModuleKind::Conv1D } else { ModuleKind::Linear };
        let (base, array_kind) = base_layer(kind, weight, bias)?;
        let config = config.map(|c| c.inner.clone()).unwrap_or_default();
        let shared = match (vera_A, vera_B) {
            (Some(a), Some(b)) => BTreeMap::from([
                (peft_rs::adapters::vera::VERA_A.to_string(), tensor_from_py(a)?),
                (peft_rs::adapters::vera::VERA_B.to_string(), tensor_from_py(b)?),
            ]),
            (None, None) => config.generate_projections(base.out_features(), base.in_features()).map_err(to_pyerr)?,
            _ => return Err(crate::errors::value_error("pass both vera_A and vera_B, or neither")),
        };
        let weights = given_weights(&[
            (peft_rs::adapters::vera::VERA_LAMBDA_B, vera_lambda_b),
            (peft_rs::adapters::vera::VERA_LAMBDA_D, vera_lambda_d),
        ])?;
        let layer = build_layer_with(py, module_name, base, PeftConfig::Vera(config), weights, seed, &shared)?;
        Ok(Self { state: LayerState { layer, kind: array_kind } })
    }
});
