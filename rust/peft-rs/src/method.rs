//! What a PEFT method is to the rest of the crate: a config ([`MethodConfig`]) that builds, for
//! one module, the method's adapter ([`LayerAdapter`]): its named tensors, its part of the
//! forward and its [`MergeRule`]. Everything else (several named adapters per module, activation,
//! merge/unmerge/safe-merge, files, target matching) is written once, in [`crate::module`],
//! [`crate::merge`] and [`crate::peft_adapter`].
//!
//! Adding a method is one file that implements these two traits plus one line in
//! [`crate::registry`].

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::base::{BaseLayer, ModuleKind};
use crate::config::PEFT_VERSION;
use crate::error::Result;
use crate::linalg::BlockFactors;
use crate::matching::Selection;
use crate::module::Below;
use crate::params::Params;

/// Which base-model biases are trained and saved with the adapter (PEFT's `bias`: `"none"`,
/// `"all"`, or the method's own `"lora_only"` / `"oft_only"` / `"boft_only"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BiasMode {
    #[default]
    None,
    All,
    /// Only the biases of adapted modules.
    AdaptedOnly,
}

/// Where a new adapter's tensors come from.
#[derive(Debug, Clone)]
pub enum ParamSource {
    /// Initialised as the config says (PEFT's `init_*` options), from this seed.
    Init { seed: u64 },
    /// Given tensors (a file, or the user), named as in [`MethodConfig::param_names`]. Every
    /// expected tensor must be there with its exact shape, and nothing else.
    Given(Vec<(String, Tensor)>),
}

/// A method's config: PEFT's fields, defaults and JSON form, plus what the shared machinery
/// asks of a method. Valid by construction: every constructor validates.
pub trait MethodConfig: std::fmt::Debug + Send + Sync {
    /// PEFT's `peft_type` (`"LORA"`).
    fn peft_type(&self) -> &'static str;

    /// Checks every field, naming the offending one ([`crate::PeftError::InvalidConfig`]).
    /// Parsing validates, and so does every path that builds adapters from a config
    /// ([`crate::AdaptedModule::add`], [`crate::PeftAdapter::create`]), so a struct literal with
    /// invalid fields cannot reach the math.
    fn validate(&self) -> Result<()>;

    /// The config's fields as PEFT's `to_dict()` names them; [`MethodConfig::to_json`] adds
    /// `peft_type` and `peft_version`.
    fn fields(&self) -> Value;

    /// The JSON object PEFT's `to_dict()` gives (unsorted; files are written sorted). PEFT
    /// always records its version and reads it back (a null one fails to load for OFT), so a
    /// config without one names the PEFT release whose format and numbers peft-rs follows.
    fn to_json(&self) -> Value {
        let mut value = self.fields();
        if let Value::Object(map) = &mut value {
            map.insert("peft_type".into(), Value::from(self.peft_type()));
            if map.get("peft_version").is_none_or(Value::is_null) {
                map.insert("peft_version".into(), Value::from(PEFT_VERSION));
            }
        }
        value
    }

    /// Which modules get an adapter.
    fn selection(&self) -> Selection<'_>;

    fn modules_to_save(&self) -> &[String] {
        self.selection().modules_to_save.unwrap_or_default()
    }

    fn bias_mode(&self) -> BiasMode {
        BiasMode::None
    }

    /// Every tensor name a module's adapter can have (file key `<module>.<name>`).
    fn param_names(&self) -> &'static [&'static str];

    /// The rank the config gives `module` (after `rank_pattern`), for methods that have one.
    fn rank_for(&self, _module: &str) -> Result<Option<usize>> {
        Ok(None)
    }

    /// The method's adapter for `module`, whose base layer is `base`. Errors name the tensor and
    /// say what was expected and found; a module kind the method does not support is an error.
    fn build(
        &self,
        module: &str,
        base: &BaseLayer,
        source: ParamSource,
        shared: &BTreeMap<String, Tensor>,
    ) -> Result<Box<dyn LayerAdapter>>;

    /// The config PEFT saves after creating an adapter on modules of these kinds, when it
    /// differs (PEFT rewrites `fan_in_fan_out` from the targeted layer types, for example); an
    /// error if the method cannot adapt one of them.
    fn for_targets(&self, _kinds: &[ModuleKind]) -> Result<Option<Arc<dyn MethodConfig>>> {
        Ok(None)
    }

    /// The tensors PEFT saves for `module`, from the tensors its adapter holds: the identity,
    /// except for AdaLoRA, whose files keep only the ranks `rank_pattern` kept.
    fn tensors_to_save(
        &self,
        _module: &str,
        tensors: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>> {
        Ok(tensors)
    }

    /// Names of adapter-wide tensors, saved as `base_model.<name>` (VeRA's projections).
    fn shared_names(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether the adapter-wide tensors are written to the file.
    fn saves_shared(&self) -> bool {
        false
    }

    /// The adapter-wide tensors for targeted layers of at most `out_max` outputs and `in_max`
    /// inputs.
    fn generate_shared(&self, _out_max: usize, _in_max: usize) -> Result<BTreeMap<String, Tensor>> {
        Ok(BTreeMap::new())
    }

    /// The base layer that `module`'s tensors (`tensors`, named relative to the module, as in
    /// [`MethodConfig::param_names`]) and the adapter-wide `shared` tensors imply, for checking
    /// an adapter without its model ([`crate::PeftAdapter::check`]): [`MethodConfig::build`] on a
    /// base of that shape then checks every tensor against every other and against the config.
    /// Read as few tensors as pinning the shape takes, so that `build`, not this, names the
    /// inconsistent one. `Ok(None)` (the default): the method cannot tell. An error: the tensors
    /// needed to tell are missing or of the wrong rank (name the key).
    fn infer_base(
        &self,
        _module: &str,
        _tensors: &[(String, Tensor)],
        _shared: &BTreeMap<String, Tensor>,
    ) -> Result<Option<InferredBase>> {
        Ok(None)
    }
}

/// A base layer as far as an adapter's tensors tell it ([`MethodConfig::infer_base`]): its kind
/// and weight shape in PyTorch's layout. A transformers `Conv1D` cannot be told from an
/// `nn.Linear` by shapes (a config's `fan_in_fan_out` tells it); a Conv2d's stride, padding and
/// dilation never show, and its groups are taken to be 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferredBase {
    pub kind: ModuleKind,
    pub dims: Vec<usize>,
}

impl InferredBase {
    /// `out` outputs, `inp` inputs: a Conv1D `(in, out)` when `fan_in_fan_out`, else a Linear
    /// `(out, in)`.
    pub fn linear(out: usize, inp: usize, fan_in_fan_out: bool) -> Self {
        if fan_in_fan_out {
            Self {
                kind: ModuleKind::Conv1D,
                dims: vec![inp, out],
            }
        } else {
            Self {
                kind: ModuleKind::Linear,
                dims: vec![out, inp],
            }
        }
    }

    pub fn embedding(num_embeddings: usize, embedding_dim: usize) -> Self {
        Self {
            kind: ModuleKind::Embedding,
            dims: vec![num_embeddings, embedding_dim],
        }
    }

    /// A Conv2d of weight `(out, in, kh, kw)`, ungrouped, with default stride and padding.
    pub fn conv2d(out: usize, inp: usize, kh: usize, kw: usize) -> Self {
        Self {
            kind: ModuleKind::Conv2d(crate::base::Conv2dParams::default()),
            dims: vec![out, inp, kh, kw],
        }
    }
}

/// The shape of the tensor `name` among one module's tensors, if it is there.
pub fn dims_of<'a>(tensors: &'a [(String, Tensor)], name: &str) -> Option<&'a [usize]> {
    tensors
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t.dims())
}

/// The shape of `name` if it is there with `rank` dimensions; an error naming `module`'s key
/// otherwise ([`MethodConfig::infer_base`]).
pub fn dims_with_rank<'a>(
    module: &str,
    tensors: &'a [(String, Tensor)],
    name: &str,
    rank: &[usize],
) -> Result<&'a [usize]> {
    let key = crate::params::file_key(module, name);
    let dims = dims_of(tensors, name).ok_or_else(|| crate::error::PeftError::MissingKey {
        key: key.clone(),
        context: "needed to tell the base layer's shape".into(),
    })?;
    if !rank.contains(&dims.len()) {
        return Err(crate::error::PeftError::InvalidOperation(format!(
            "{key} must have {} dimensions, found shape {dims:?}",
            rank.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(" or ")
        )));
    }
    Ok(dims)
}

/// One method's adapter on one module: its tensors and its math. It never owns the base layer:
/// the [`crate::module::AdaptedModule`] that holds it does.
pub trait LayerAdapter: std::fmt::Debug + Send + Sync {
    fn config(&self) -> &dyn MethodConfig;

    /// The trainable tensors, named as in PEFT's files relative to the module.
    fn params(&self) -> &Params;
    fn params_mut(&mut self) -> &mut Params;

    /// This adapter's layer function: `below` is the layer without it (the base layer with
    /// the active adapters beneath this one applied). LoRA returns `below(x) + s·BA x`, IA³
    /// scales `below`'s input or output, OFT rotates `below`'s input.
    fn forward(&self, x: &Tensor, below: &Below<'_>) -> Result<Tensor>;

    /// How merging folds this adapter into a weight of `base`'s shape and kind.
    fn merge_rule(&self, base: &BaseLayer) -> Result<MergeRule>;

    /// For a method whose forward is `below(x) + term(x)`, with `term` independent of the layer
    /// below: `term(x)`, in the dtype the sum is taken in (`forward` must equal
    /// `(below(x) as term's dtype + term(x)) as below(x)'s dtype`). A mixed batch then computes
    /// the base output once for every row, as PEFT does for LoRA; `None` (the default) runs the
    /// adapter's rows through [`LayerAdapter::forward`]. Mixed batches are for inference, so
    /// the term has no dropout.
    fn additive_term(&self, _x: &Tensor, _base: &BaseLayer) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// How an adapter folds into the base weight, in the base weight's own layout unless said
/// otherwise. [`crate::merge`] applies and undoes every rule, with PEFT's dtype handling and the
/// NaN/inf check of `safe_merge`.
#[derive(Debug, Clone)]
pub enum MergeRule {
    /// `W += delta`, `b += bias` (LoRA, AdaLoRA, VeRA, LoHa, LoKr); undone by subtracting.
    Add { delta: Tensor, bias: Option<Tensor> },
    /// `W += scale · left·right` for a Linear weight (`left (out, r)`, `right (r, in)`),
    /// `b += bias` (LoRA, AdaLoRA, VeRA): [`MergeRule::Add`] with `ΔW` kept as its factors, so
    /// that an f32 weight takes it in one GEMM accumulating into it (no `ΔW` buffer, no pass
    /// adding it). Undone by subtracting.
    AddProduct {
        left: Tensor,
        right: Tensor,
        scale: f64,
        bias: Option<Tensor>,
    },
    /// `W *= weight` (broadcast: rows or columns), `b *= bias` (IA³); undone by dividing by
    /// `scale + 1e-8`, as PEFT does.
    Scale {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// A linear transform of the layer's input (`x → x·R`) or output (`y → y·R`) features,
    /// then output rows scaled by `out_scale` (OFT, BOFT). In the `(out, in)` view of the
    /// weight ([`BaseLayer::to_out_in`]): input `W ← diag(s)·(W·Rᵀ)`, output `W ← Rᵀ·W`;
    /// undone with `inverse` in place of `R`. The bias is unchanged. `R` is kept as its
    /// block-diagonal factors: the merge never forms it.
    Transform {
        matrix: BlockFactors,
        inverse: BlockFactors,
        side: Side,
        out_scale: Option<Tensor>,
    },
    /// The module replaced by a trained copy (`modules_to_save`); undone by restoring the weights
    /// it replaced.
    Replace {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// DoRA: `W ← (m / ‖W + delta‖) (W + delta)` per output feature; undone with the norm taken
    /// at merge time. `bias` as in [`MergeRule::Add`].
    Magnitude {
        delta: Tensor,
        magnitude: Tensor,
        bias: Option<Tensor>,
    },
}

/// Which features a [`MergeRule::Transform`] acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Input,
    Output,
}

/// One method in the registry ([`crate::registry::METHODS`]).
#[derive(Debug, Clone, Copy)]
pub struct MethodEntry {
    /// PEFT's `peft_type`.
    pub peft_type: &'static str,
    /// PEFT's config class name, also the Python class name (`"LoraConfig"`).
    pub config_class: &'static str,
    /// Parses PEFT's JSON form (with or without `peft_type`) and validates it.
    pub from_json: fn(Value) -> Result<Arc<dyn MethodConfig>>,
}
