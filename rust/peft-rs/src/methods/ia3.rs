//! IA³ (PEFT `tuners/ia3`): a learned vector `l` rescales a layer's input (feed-forward modules)
//! or its output (all others, bias included). Merging multiplies the weight; there is no
//! additive delta.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::base::{BaseLayer, ModuleKind};
use crate::config::{CommonFields, ModuleSelector, check_extra_fields, parse_config};
use crate::error::{PeftError, Result};
use crate::init::Initializer;
use crate::kernels::linear::Extras;
use crate::matching::Selection;
use crate::merge::adapter_dtype;
use crate::method::{
    InferredBase, LayerAdapter, MergeRule, MethodConfig, MethodEntry, ParamSource, dims_with_rank,
};
use crate::module::Below;
use crate::params::{Params, take_params};

pub const PEFT_TYPE: &str = "IA3";

pub const ENTRY: MethodEntry = MethodEntry {
    peft_type: PEFT_TYPE,
    config_class: "IA3Config",
    from_json: |v| Ok(Arc::new(Ia3Config::from_json(v)?)),
};

pub const IA3_L: &str = "ia3_l";
pub const PARAM_NAMES: &[&str] = &[IA3_L];

/// PEFT's `IA3Config`, with PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ia3Config {
    #[serde(flatten)]
    pub common: CommonFields,
    pub target_modules: Option<ModuleSelector>,
    pub exclude_modules: Option<ModuleSelector>,
    /// Modules whose input (not output) is scaled. A list matches by plain string suffix (no dot
    /// boundary), as PEFT does; a string is a full-match regex.
    pub feedforward_modules: Option<ModuleSelector>,
    pub fan_in_fan_out: bool,
    pub modules_to_save: Option<Vec<String>>,
    pub init_ia3_weights: bool,
    #[serde(flatten, skip_serializing)]
    pub unsupported: Map<String, Value>,
}

impl Default for Ia3Config {
    fn default() -> Self {
        Self {
            common: CommonFields::default(),
            target_modules: None,
            exclude_modules: None,
            feedforward_modules: None,
            fan_in_fan_out: false,
            modules_to_save: None,
            init_ia3_weights: true,
            unsupported: Map::new(),
        }
    }
}

impl Ia3Config {
    /// Reads a config from PEFT's JSON form (`adapter_config.json` or `IA3Config.to_dict()`).
    pub fn from_json(value: Value) -> Result<Self> {
        parse_config(value, PEFT_TYPE)
    }

    pub fn selection(&self) -> Selection<'_> {
        Selection {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: self.exclude_modules.as_ref(),
            modules_to_save: self.modules_to_save.as_deref(),
            layers_to_transform: None,
            layers_pattern: None,
        }
    }

    /// Whether the module at `key` is a feed-forward module (its input is scaled).
    pub fn is_feedforward(&self, key: &str) -> Result<bool> {
        Ok(match &self.feedforward_modules {
            None => false,
            Some(ModuleSelector::Regex(p)) => {
                crate::matching::full_match("feedforward_modules", p, key)?
            }
            Some(ModuleSelector::Names(names)) => names.iter().any(|n| key.ends_with(n.as_str())),
        })
    }

    /// Checks every field; every constructor calls it, so a config in hand is valid.
    pub fn validate(&self) -> Result<()> {
        self.common.validate()?;
        check_extra_fields(&self.unsupported, &[])?;
        self.selection().validate()?;
        // Compiles a regex `feedforward_modules` now rather than at the first layer.
        self.is_feedforward("")?;
        if let (Some(ModuleSelector::Names(targets)), Some(ModuleSelector::Names(ff))) =
            (&self.target_modules, &self.feedforward_modules)
            && let Some(extra) = ff.iter().find(|f| !targets.contains(f))
        {
            return Err(PeftError::config(
                "feedforward_modules",
                format!("must be a subset of target_modules; {extra:?} is not in it"),
            ));
        }
        Ok(())
    }
}

impl MethodConfig for Ia3Config {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn validate(&self) -> Result<()> {
        Ia3Config::validate(self)
    }

    fn fields(&self) -> Value {
        serde_json::to_value(self).expect("Ia3Config serialises")
    }

    fn selection(&self) -> Selection<'_> {
        Ia3Config::selection(self)
    }

    fn param_names(&self) -> &'static [&'static str] {
        PARAM_NAMES
    }

    fn build(
        &self,
        module: &str,
        base: &BaseLayer,
        source: ParamSource,
        _shared: &BTreeMap<String, Tensor>,
    ) -> Result<Box<dyn LayerAdapter>> {
        Ok(Box::new(Ia3Adapter::new(
            module,
            base,
            self.clone(),
            source,
        )?))
    }

    fn for_targets(&self, kinds: &[ModuleKind]) -> Result<Option<Arc<dyn MethodConfig>>> {
        let mut config = self.clone();
        crate::methods::adapt_fan_in_fan_out(&mut config.fan_in_fan_out, kinds)?;
        Ok(Some(Arc::new(config)))
    }

    /// `ia3_l` gives one width only (the input's for feed-forward modules, the output's
    /// otherwise); the other is taken equal to it, so that only the vector's orientation and
    /// the config's `feedforward_modules` decide whether it fits.
    fn infer_base(
        &self,
        module: &str,
        tensors: &[(String, Tensor)],
        _shared: &BTreeMap<String, Tensor>,
    ) -> Result<Option<InferredBase>> {
        let l = dims_with_rank(module, tensors, IA3_L, &[2, 4])?;
        let n = l.iter().copied().max().unwrap_or(0);
        Ok(Some(if l.len() == 4 {
            InferredBase::conv2d(n, n, 1, 1)
        } else {
            InferredBase::linear(n, n, self.fan_in_fan_out)
        }))
    }
}

/// Shape of `ia3_l` on `base`: `(1, in)` / `(1, in, 1, 1)` when the input is scaled,
/// `(out, 1)` / `(1, out, 1, 1)` when the output is.
fn expected_shape(base: &BaseLayer, feedforward: bool) -> Result<Vec<usize>> {
    let n = if feedforward {
        base.in_features()
    } else {
        base.out_features()
    };
    match base.kind() {
        ModuleKind::Linear | ModuleKind::Conv1D if feedforward => Ok(vec![1, n]),
        ModuleKind::Linear | ModuleKind::Conv1D => Ok(vec![n, 1]),
        ModuleKind::Conv2d(_) => Ok(vec![1, n, 1, 1]),
        kind @ ModuleKind::Embedding => Err(PeftError::InvalidOperation(format!(
            "IA³ does not support {kind:?} layers (as in PEFT)"
        ))),
    }
}

/// An IA³ adapter on one module.
#[derive(Debug)]
pub struct Ia3Adapter {
    config: Arc<Ia3Config>,
    params: Params,
    kind: ModuleKind,
    feedforward: bool,
}

impl Ia3Adapter {
    /// The adapter for `module` on `base`: the given `ia3_l`, or a fresh one: ones (the
    /// identity) with `init_ia3_weights`, N(0, 1) otherwise.
    pub fn new(
        module: &str,
        base: &BaseLayer,
        config: Ia3Config,
        source: ParamSource,
    ) -> Result<Self> {
        let feedforward = config.is_feedforward(module)?;
        let shape = expected_shape(base, feedforward)?;
        let dtype = adapter_dtype(base.dtype());
        let given = match source {
            ParamSource::Given(tensors) => tensors,
            ParamSource::Init { seed } => {
                let l = if config.init_ia3_weights {
                    Tensor::ones(shape.as_slice(), dtype, base.device())?
                } else {
                    Initializer::new(seed).normal(&shape, 1.0, dtype)?
                };
                vec![(IA3_L.to_string(), l)]
            }
        };
        let what = format!("IA³ {:?} feedforward={feedforward}", base.kind());
        let expected = [(IA3_L, shape)];
        let params = take_params(module, &what, given, &expected, dtype, base.device())?;
        Ok(Self {
            config: Arc::new(config),
            params,
            kind: base.kind(),
            feedforward,
        })
    }

    pub fn is_feedforward(&self) -> bool {
        self.feedforward
    }

    /// `ia3_l` shaped to broadcast against the layer's input (feed-forward) or output of this
    /// rank.
    fn scale_for_activations(&self, rank: usize) -> Result<Tensor> {
        let l = self.params.get(IA3_L)?;
        Ok(match self.kind {
            ModuleKind::Conv2d(_) if rank == 3 => l.squeeze(0)?,
            ModuleKind::Conv2d(_) => l,
            _ => l.flatten_all()?,
        })
    }

    /// `ia3_l` shaped to multiply the base weight in its own layout.
    fn scale_for_weight(&self) -> Result<Tensor> {
        let l = self.params.get(IA3_L)?;
        Ok(match self.kind {
            // Linear `(out, in)` takes `(out, 1)` / `(1, in)` as is; Conv1D stores `(in, out)`.
            ModuleKind::Linear => l,
            ModuleKind::Conv1D => l.t()?,
            ModuleKind::Conv2d(_) if self.feedforward => l,
            ModuleKind::Conv2d(_) => l.transpose(0, 1)?,
            kind @ ModuleKind::Embedding => {
                return Err(PeftError::InvalidOperation(format!(
                    "IA³ does not support {kind:?} layers (as in PEFT)"
                )));
            }
        })
    }
}

impl LayerAdapter for Ia3Adapter {
    fn config(&self) -> &dyn MethodConfig {
        &*self.config
    }

    fn params(&self) -> &Params {
        &self.params
    }

    fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }

    /// PEFT's forward: the scaling is computed in `ia3_l`'s dtype and the result cast back to
    /// the dtype of the tensor it scaled.
    fn forward(&self, x: &Tensor, below: &Below<'_>) -> Result<Tensor> {
        let fused = below.fused(x, 0.0, || {
            let l = Some(self.params.get(IA3_L)?.flatten_all()?);
            Ok(if self.feedforward {
                Extras {
                    in_scale: l,
                    ..Extras::default()
                }
            } else {
                Extras {
                    out_scale: l,
                    ..Extras::default()
                }
            })
        })?;
        if let Some(y) = fused {
            return Ok(y);
        }
        if self.feedforward {
            let l = self.scale_for_activations(x.rank())?;
            let scaled = x
                .to_dtype(l.dtype())?
                .broadcast_mul(&l)?
                .to_dtype(x.dtype())?;
            below.forward(&scaled)
        } else {
            let y = below.forward(x)?;
            let l = self.scale_for_activations(y.rank())?;
            Ok(y.to_dtype(l.dtype())?
                .broadcast_mul(&l)?
                .to_dtype(y.dtype())?)
        }
    }

    /// The weight is scaled along its inputs (feed-forward) or outputs; the bias along with the
    /// outputs only.
    fn merge_rule(&self, _base: &BaseLayer) -> Result<MergeRule> {
        Ok(MergeRule::Scale {
            weight: self.scale_for_weight()?,
            bias: if self.feedforward {
                None
            } else {
                Some(self.params.get(IA3_L)?)
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::module::AdaptedModule;

    fn max_diff(a: &Tensor, b: &[f32]) -> f32 {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// A transformers `Conv1D(nf=1, nx=5)` (weight `(5, 1)`): its shapes alone cannot tell it
    /// from a Linear; the kind comes from the base. Expected numbers from PEFT 0.21.2:
    /// ```python
    /// m = nn.Module(); m.c = Conv1D(1, 5)
    /// m.c.weight.data = torch.tensor([[0.5], [-1.0], [0.25], [2.0], [-0.75]]); m.c.bias.data = torch.tensor([0.3])
    /// x = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0], [-2.0, 0.0, 1.5, 1.0, -0.5]])
    /// # non-feedforward: ia3_l = [[1.5]]
    /// p = get_peft_model(m, IA3Config(target_modules=["c"], feedforward_modules=[]))
    /// p.base_model.model.c.ia3_l["default"].data = torch.tensor([[1.5]])
    /// p.base_model.model.c(x); p.merge_and_unload().c.weight, .bias
    /// # feedforward: ia3_l = [[0.5, 2.0, -1.0, 1.5, 0.25]], feedforward_modules=["c"]
    /// ```
    #[test]
    fn conv1d_with_one_output_feature() {
        let dev = Device::Cpu;
        let weight = Tensor::new(&[[0.5f32], [-1.0], [0.25], [2.0], [-0.75]], &dev).unwrap();
        let bias = Tensor::new(&[0.3f32], &dev).unwrap();
        let x = Tensor::new(
            &[[1.0f32, 2.0, -1.0, 0.5, 3.0], [-2.0, 0.0, 1.5, 1.0, -0.5]],
            &dev,
        )
        .unwrap();
        let cases = [
            Case {
                feedforward: false,
                l: Tensor::new(&[[1.5f32]], &dev).unwrap(),
                output: [-4.05, 3.075],
                merged_weight: [0.75, -1.5, 0.375, 3.0, -1.125],
                merged_bias: 0.45,
            },
            Case {
                feedforward: true,
                l: Tensor::new(&[[0.5f32, 2.0, -1.0, 1.5, 0.25]], &dev).unwrap(),
                output: [-2.2625, 2.51875],
                merged_weight: [0.25, -2.0, -0.25, 3.0, -0.1875],
                merged_bias: 0.3,
            },
        ];
        for case in cases {
            let ff = case.feedforward;
            let config = Ia3Config {
                target_modules: Some(ModuleSelector::Names(vec!["c".into()])),
                feedforward_modules: Some(ModuleSelector::Names(if ff {
                    vec!["c".into()]
                } else {
                    vec![]
                })),
                fan_in_fan_out: true,
                ..Default::default()
            };
            let base =
                BaseLayer::new(ModuleKind::Conv1D, weight.clone(), Some(bias.clone())).unwrap();
            let mut layer = AdaptedModule::new("c", base);
            let given = ParamSource::Given(vec![(IA3_L.to_string(), case.l)]);
            layer.add("a", &config, given, &BTreeMap::new()).unwrap();
            layer.set_active(&["a"]).unwrap();
            let y = layer.forward(&x).unwrap();
            assert!(max_diff(&y, &case.output) < 1e-5, "forward ff={ff}: {y}");
            layer.merge(None, true).unwrap();
            let w = layer.base().weight().unwrap();
            assert_eq!(w.dtype(), DType::F32);
            assert!(max_diff(&w, &case.merged_weight) < 1e-6, "weight ff={ff}");
            let b = layer.base().bias().unwrap();
            assert!(max_diff(b, &[case.merged_bias]) < 1e-6, "bias ff={ff}");
            let merged_y = layer.forward(&x).unwrap();
            assert!(max_diff(&merged_y, &case.output) < 1e-5, "merged ff={ff}");
        }
    }

    struct Case {
        feedforward: bool,
        l: Tensor,
        output: [f32; 2],
        merged_weight: [f32; 5],
        merged_bias: f32,
    }
}
