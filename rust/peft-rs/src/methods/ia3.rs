//! IA³ (PEFT `tuners/ia3`): a learned vector `l` rescales a layer's input (feed-forward modules)
//! or its output (all others, bias included). Merging multiplies the weight; there is no
//! additive delta.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::base::{BaseLayer, ModuleKind};
use crate::config::{
    AdapterConfig, CommonFields, ModuleSelector, PeftType, check_extra_fields, deserialize_fields,
    take_peft_type,
};
use crate::error::{PeftError, Result};
use crate::init::Initializer;
use crate::matching::Selection;
use crate::merge::{adapter_dtype, check_finite, check_merge_state};
use crate::params::Params;
use crate::traits::{Adapter, Mergeable};

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
    pub fn from_json(value: Value) -> Result<Self> {
        let mut value = value;
        take_peft_type(&mut value, PeftType::Ia3)?;
        let config: Self = deserialize_fields(value)?;
        config.validate()?;
        Ok(config)
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
}

impl AdapterConfig for Ia3Config {
    fn peft_type(&self) -> PeftType {
        PeftType::Ia3
    }

    fn validate(&self) -> Result<()> {
        self.common.validate()?;
        check_extra_fields(&self.unsupported, &[])?;
        self.selection().check_patterns()?;
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

    fn to_json(&self) -> Value {
        let mut value = serde_json::to_value(self).expect("Ia3Config serialises");
        if let Value::Object(map) = &mut value {
            map.insert("peft_type".into(), Value::from(PeftType::Ia3.as_str()));
        }
        value
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
        ModuleKind::Embedding => Err(PeftError::InvalidOperation(
            "IA³ does not support Embedding layers (as in PEFT)".into(),
        )),
    }
}

/// One module with an IA³ adapter.
#[derive(Debug, Clone)]
pub struct Ia3Layer {
    module: String,
    base: BaseLayer,
    params: Params,
    feedforward: bool,
    merged: bool,
    training: bool,
    config: Arc<Ia3Config>,
}

impl Ia3Layer {
    /// A fresh adapter: ones (the identity) with `init_ia3_weights`, N(0, 1) otherwise.
    pub fn new(module: &str, base: BaseLayer, config: Arc<Ia3Config>, seed: u64) -> Result<Self> {
        let feedforward = config.is_feedforward(module)?;
        let shape = expected_shape(&base, feedforward)?;
        let dtype = adapter_dtype(base.dtype());
        let l = if config.init_ia3_weights {
            Tensor::ones(shape, dtype, base.weight().device())?
        } else {
            Initializer::new(seed).normal(&shape, 1.0, dtype)?
        };
        Self::from_weights(module, base, config, vec![(IA3_L.to_string(), l)])
    }

    /// An adapter with the given `ia3_l` (cast to f32, or f64 for an f64 base).
    pub fn from_weights(
        module: &str,
        base: BaseLayer,
        config: Arc<Ia3Config>,
        weights: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        let feedforward = config.is_feedforward(module)?;
        let shape = expected_shape(&base, feedforward)?;
        let mut l = None;
        for (name, t) in weights {
            if name != IA3_L {
                return Err(PeftError::UnexpectedKey {
                    key: format!("{module}.{name}"),
                    context: "an IA³ layer has only ia3_l".into(),
                });
            }
            l = Some(t);
        }
        let l = l.ok_or_else(|| PeftError::MissingKey {
            key: format!("{module}.{IA3_L}"),
            context: "IA³ layer".into(),
        })?;
        if l.dims() != shape.as_slice() {
            let what = format!("{module}.{IA3_L} (feedforward={feedforward})");
            return Err(PeftError::shape(what, &shape, l.dims()));
        }
        let l = l
            .to_dtype(adapter_dtype(base.dtype()))?
            .to_device(base.weight().device())?;
        Ok(Self {
            module: module.to_string(),
            base,
            params: Params::new(vec![(IA3_L.to_string(), l)]),
            feedforward,
            merged: false,
            training: false,
            config,
        })
    }

    pub fn is_feedforward(&self) -> bool {
        self.feedforward
    }

    /// `ia3_l` shaped to broadcast against the layer's input (feed-forward) or output.
    fn scale_for_activations(&self, rank: usize) -> Result<Tensor> {
        let l = self.params.get(IA3_L)?;
        Ok(match self.base.kind() {
            ModuleKind::Conv2d(_) if rank == 3 => l.squeeze(0)?,
            ModuleKind::Conv2d(_) => l,
            _ => l.flatten_all()?,
        })
    }

    /// `ia3_l` shaped to multiply the base weight (in its own layout).
    fn scale_for_weight(&self) -> Result<Tensor> {
        let l = self.params.get(IA3_L)?;
        Ok(match self.base.kind() {
            // Linear `(out, in)` takes `(out, 1)` / `(1, in)` as is; Conv1D stores `(in, out)`.
            ModuleKind::Linear => l,
            ModuleKind::Conv1D => l.t()?,
            ModuleKind::Conv2d(_) if self.feedforward => l,
            ModuleKind::Conv2d(_) => l.transpose(0, 1)?,
            ModuleKind::Embedding => unreachable!("rejected when the layer is built"),
        })
    }

    /// The weight and bias with the scaling applied (`divide` for unmerge).
    fn rescaled_weights(&self, divide: bool) -> Result<(Tensor, Option<Tensor>)> {
        let apply = |t: &Tensor, l: &Tensor| -> Result<Tensor> {
            let t32 = t.to_dtype(l.dtype())?;
            let out = if divide {
                t32.broadcast_div(&(l + 1e-8)?)?
            } else {
                t32.broadcast_mul(l)?
            };
            Ok(out.to_dtype(t.dtype())?)
        };
        let weight = apply(self.base.weight(), &self.scale_for_weight()?)?;
        let bias = match self.base.bias() {
            Some(b) if !self.feedforward => {
                let l = self.params.get(IA3_L)?.reshape(b.dims())?;
                Some(apply(b, &l)?)
            }
            b => b.cloned(),
        };
        Ok((weight, bias))
    }
}

impl Adapter for Ia3Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.merged {
            return self.base.forward(x);
        }
        let dtype: DType = adapter_dtype(self.base.dtype());
        if self.feedforward {
            let l = self.scale_for_activations(x.rank())?;
            let scaled = x.to_dtype(dtype)?.broadcast_mul(&l)?.to_dtype(x.dtype())?;
            self.base.forward(&scaled)
        } else {
            let y = self.base.forward(x)?;
            let l = self.scale_for_activations(y.rank())?;
            Ok(y.to_dtype(dtype)?.broadcast_mul(&l)?.to_dtype(y.dtype())?)
        }
    }

    fn weights(&self) -> Vec<(String, Tensor)> {
        self.params.entries().to_vec()
    }

    fn config(&self) -> &dyn AdapterConfig {
        &*self.config
    }

    fn base(&self) -> &BaseLayer {
        &self.base
    }
}

impl Mergeable for Ia3Layer {
    fn merge(&mut self, safe_merge: bool) -> Result<()> {
        check_merge_state(&self.module, self.merged, true)?;
        let (weight, bias) = self.rescaled_weights(false)?;
        if safe_merge {
            check_finite(&self.module, &weight)?;
            if let Some(b) = &bias {
                check_finite(&self.module, b)?;
            }
        }
        self.base.set_weights(weight, bias);
        self.merged = true;
        Ok(())
    }

    /// Divides by `ia3_l + 1e-8`, as PEFT does (inexact where `ia3_l` is near zero).
    fn unmerge(&mut self) -> Result<()> {
        check_merge_state(&self.module, self.merged, false)?;
        let (weight, bias) = self.rescaled_weights(true)?;
        self.base.set_weights(weight, bias);
        self.merged = false;
        Ok(())
    }

    fn is_merged(&self) -> bool {
        self.merged
    }
}

crate::params::impl_trainable!(Ia3Layer);

/// Checks a saved IA³ layer: exactly `ia3_l`, shaped for the module's feed-forward setting.
pub fn check_saved_layer(
    config: &Ia3Config,
    module: &str,
    tensors: &[(String, Tensor)],
) -> Result<ModuleKind> {
    let key = |name: &str| format!("{}{module}.{name}", crate::io::MODEL_PREFIX);
    if let Some((name, _)) = tensors.iter().find(|(n, _)| n != IA3_L) {
        return Err(PeftError::UnexpectedKey {
            key: key(name),
            context: "an IA³ layer has only ia3_l".into(),
        });
    }
    let l = tensors
        .first()
        .map(|(_, t)| t)
        .ok_or_else(|| PeftError::MissingKey {
            key: key(IA3_L),
            context: "IA³ layer".into(),
        })?;
    let feedforward = config.is_feedforward(module)?;
    let d = l.dims();
    let ok = match d {
        [1, _, 1, 1] => true,
        [1, _] => feedforward,
        [_, 1] => !feedforward,
        _ => false,
    };
    if !ok {
        let n = d.iter().copied().max().unwrap_or(0);
        let expected = match (d.len(), feedforward) {
            (4, _) => vec![1, n, 1, 1],
            (_, true) => vec![1, n],
            (_, false) => vec![n, 1],
        };
        let what = format!("{} (feedforward={feedforward})", key(IA3_L));
        return Err(PeftError::shape(what, &expected, d));
    }
    Ok(if d.len() == 4 {
        ModuleKind::Conv2d(Default::default())
    } else if config.fan_in_fan_out {
        ModuleKind::Conv1D
    } else {
        ModuleKind::Linear
    })
}
