//! [`PeftAdapter`]: one adapter directory (config + tensors), independent of any model.
//!
//! Module paths are relative to the model (`"lin0"`, `"encoder.layer.0.attention.self.query"`);
//! base-model tensors are addressed by their `state_dict()` keys (`"lin0.weight"`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::base::{BaseLayer, ModuleKind};
use crate::config::{CONFIG_NAME, PeftConfig, config_to_file_json, read_config};
use crate::error::{PeftError, Result};
use crate::io::{MODEL_PREFIX, read_adapter_weights, write_atomic, write_safetensors};
use crate::matching::is_module_to_save;
use crate::method::{BiasMode, ParamSource};
use crate::module::AdaptedModule;

/// The kind of each module of a base model, by module path (what transformers' module classes
/// tell; adapter files cannot tell a Linear from a transposed Conv1D or an Embedding).
pub type ModuleKinds = HashMap<String, ModuleKind>;

pub const DEFAULT_ADAPTER_NAME: &str = "default";
/// Prefix of adapter-wide tensors in PEFT's files (VeRA's `base_model.vera_A`).
const SHARED_PREFIX: &str = "base_model.";

/// A base-model module offered to [`PeftAdapter::create`].
#[derive(Debug)]
pub struct BaseModule {
    pub name: String,
    pub layer: BaseLayer,
}

#[derive(Debug, Clone)]
pub struct PeftAdapter {
    adapter_name: String,
    config: PeftConfig,
    /// Adapted module → its tensors (names relative to the module), as stored in the file.
    layers: BTreeMap<String, Vec<(String, Tensor)>>,
    /// Base-model tensors the adapter replaces (`modules_to_save`, trained biases), keyed like
    /// the base model's `state_dict()`.
    replaced: BTreeMap<String, Tensor>,
    /// Adapter-wide tensors (VeRA's projections), saved as `base_model.<name>`; empty when the
    /// file leaves them out (they are then regenerated from the base model's shapes).
    shared: BTreeMap<String, Tensor>,
}

impl PeftAdapter {
    /// Loads `dir` (or `dir/<adapter_name>`, where PEFT saves non-default adapters).
    pub fn from_pretrained(dir: &Path, adapter_name: Option<&str>) -> Result<Self> {
        let name = adapter_name.unwrap_or(DEFAULT_ADAPTER_NAME);
        let sub = dir.join(name);
        let dir = if name != DEFAULT_ADAPTER_NAME && sub.join(CONFIG_NAME).is_file() {
            sub
        } else {
            dir.to_path_buf()
        };
        if !dir.is_dir() {
            return Err(PeftError::FileNotFound { path: dir });
        }
        let config = read_config(&dir.join(CONFIG_NAME))?;
        let tensors = read_adapter_weights(&dir)?;
        Self::from_state_dict(name, config, tensors)
    }

    /// Builds an adapter from PEFT file keys (`base_model.model.<module>.<param>`). Every key
    /// must belong to a module the config targets, to `modules_to_save`, or to a saved bias
    /// (`bias="all"`/`"lora_only"`); anything else is an error naming the key.
    pub fn from_state_dict(
        adapter_name: &str,
        config: PeftConfig,
        tensors: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        let mut layers: BTreeMap<String, Vec<(String, Tensor)>> = BTreeMap::new();
        let mut replaced = BTreeMap::new();
        let mut shared = BTreeMap::new();
        let mut biases = Vec::new();
        for (key, tensor) in tensors {
            let unexpected = |context: &str| PeftError::UnexpectedKey {
                key: key.clone(),
                context: context.to_string(),
            };
            if let Some(name) = key
                .strip_prefix(SHARED_PREFIX)
                .filter(|n| config.shared_names().contains(n))
            {
                shared.insert(name.to_string(), tensor);
                continue;
            }
            let Some(rel) = key.strip_prefix(MODEL_PREFIX) else {
                return Err(unexpected(
                    "adapter tensors are named base_model.model.<module>.<param>",
                ));
            };
            if let Some((module, param)) = split_param(rel, config.param_names()) {
                if !config.selection().is_target(module)? {
                    return Err(unexpected(
                        "its module is not selected by the config's target_modules",
                    ));
                }
                layers
                    .entry(module.to_string())
                    .or_default()
                    .push((param.to_string(), tensor));
            } else if let Some(module) = rel
                .strip_suffix(".base_layer.weight")
                .filter(|m| config.selection().is_target(m).unwrap_or(false))
            {
                // PEFT saves the base weight of targeted embedding layers (its
                // `save_embedding_layers`, on by default when they are targeted); loading puts it
                // back into the model.
                replaced.insert(format!("{module}.weight"), tensor);
            } else if module_to_save_prefix(config.modules_to_save(), rel) {
                replaced.insert(rel.to_string(), tensor);
            } else if config.bias_mode() != BiasMode::None && rel.ends_with(".bias") {
                biases.push((rel.to_string(), tensor));
            } else {
                return Err(unexpected(
                    "not an adapter tensor, a modules_to_save tensor or a saved bias",
                ));
            }
        }
        for (rel, tensor) in biases {
            let key = match rel.strip_suffix(".base_layer.bias") {
                Some(module) if layers.contains_key(module) => format!("{module}.bias"),
                _ if config.bias_mode() == BiasMode::AdaptedOnly => {
                    return Err(PeftError::UnexpectedKey {
                        key: format!("{MODEL_PREFIX}{rel}"),
                        context: "bias=\"lora_only\" saves only biases of adapted modules".into(),
                    });
                }
                _ => rel,
            };
            replaced.insert(key, tensor);
        }
        if config.saves_shared()
            && let Some(name) = config
                .shared_names()
                .iter()
                .find(|n| !shared.contains_key(**n))
        {
            return Err(PeftError::MissingKey {
                key: format!("{SHARED_PREFIX}{name}"),
                context: "the config says the shared projections were saved".into(),
            });
        }
        Ok(Self {
            adapter_name: adapter_name.to_string(),
            config,
            layers,
            replaced,
            shared,
        })
    }

    /// A new adapter on every module of `modules` the config selects, initialised as the config
    /// says (`init_lora_weights`), with `modules_to_save` and trained biases copied from
    /// `state_dict`. Layer `i` is seeded with `seed + i`.
    pub fn create(
        adapter_name: &str,
        config: PeftConfig,
        modules: Vec<BaseModule>,
        state_dict: &HashMap<String, Tensor>,
        seed: u64,
    ) -> Result<Self> {
        if config.selection().is_all_linear() {
            return Err(PeftError::config(
                "target_modules",
                "\"all-linear\" leaves out the model's output head, which module types do not \
                 tell: use a PeftModel, or pass the list of module names",
            ));
        }
        let mut targets = Vec::new();
        for (i, module) in modules.into_iter().enumerate() {
            if config.selection().is_target(&module.name)? {
                targets.push((i, module));
            }
        }
        let kinds: Vec<ModuleKind> = targets.iter().map(|(_, m)| m.layer.kind()).collect();
        let config = match config.for_targets(&kinds)? {
            Some(adapted) => PeftConfig::new(adapted)?,
            None => config,
        };
        let shared = config.generate_shared(
            targets
                .iter()
                .map(|(_, m)| m.layer.out_features())
                .max()
                .unwrap_or(0),
            targets
                .iter()
                .map(|(_, m)| m.layer.in_features())
                .max()
                .unwrap_or(0),
        )?;
        let mut layers = BTreeMap::new();
        for (i, module) in targets {
            let source = ParamSource::Init {
                seed: seed.wrapping_add(i as u64),
            };
            let adapter = config.build(&module.name, &module.layer, source, &shared)?;
            layers.insert(module.name, adapter.params().entries().to_vec());
        }
        if layers.is_empty() {
            return Err(PeftError::config(
                "target_modules",
                "no module of the model matches",
            ));
        }
        let mut replaced = BTreeMap::new();
        for (key, tensor) in state_dict {
            let keep = module_to_save_prefix(config.modules_to_save(), key)
                || match (config.bias_mode(), key.strip_suffix(".bias")) {
                    (BiasMode::All, Some(_)) => true,
                    (BiasMode::AdaptedOnly, Some(module)) => layers.contains_key(module),
                    _ => key == "bias" && config.bias_mode() == BiasMode::All,
                };
            if keep {
                replaced.insert(key.clone(), tensor.clone());
            }
        }
        Ok(Self {
            adapter_name: adapter_name.to_string(),
            config,
            layers,
            replaced,
            shared,
        })
    }

    /// Whether a base `state_dict()` entry can be kept by an adapter of `config` (a
    /// `modules_to_save` tensor, or a bias the config trains): what [`PeftAdapter::create`]
    /// needs of the state dict.
    pub fn may_keep(config: &PeftConfig, key: &str) -> bool {
        module_to_save_prefix(config.modules_to_save(), key)
            || (config.bias_mode() != BiasMode::None && (key == "bias" || key.ends_with(".bias")))
    }

    pub fn adapter_name(&self) -> &str {
        &self.adapter_name
    }

    pub fn config(&self) -> &PeftConfig {
        &self.config
    }

    /// Paths of the adapted modules (not `modules_to_save`).
    pub fn module_names(&self) -> Vec<&str> {
        self.layers.keys().map(String::as_str).collect()
    }

    /// An adapter from its parts (what [`crate::model::PeftModel`] saves).
    pub(crate) fn from_parts(
        adapter_name: &str,
        config: PeftConfig,
        layers: BTreeMap<String, Vec<(String, Tensor)>>,
        replaced: BTreeMap<String, Tensor>,
        shared: BTreeMap<String, Tensor>,
    ) -> Self {
        Self {
            adapter_name: adapter_name.to_string(),
            config,
            layers,
            replaced,
            shared,
        }
    }

    /// Adapter-wide tensors (VeRA's projections); empty when the file left them out.
    pub fn shared(&self) -> &BTreeMap<String, Tensor> {
        &self.shared
    }

    /// The tensors of `module`'s adapter, named relative to the module.
    pub fn tensors(&self, module: &str) -> Result<&[(String, Tensor)]> {
        Ok(self.layer_tensors(module)?)
    }

    fn layer_tensors(&self, module: &str) -> Result<&Vec<(String, Tensor)>> {
        self.layers
            .get(module)
            .ok_or_else(|| PeftError::MissingKey {
                key: module.to_string(),
                context: format!("adapted modules are {:?}", self.module_names()),
            })
    }

    /// The adapted module for `module` on its base layer, holding this adapter (active) under
    /// the adapter's name. For a VeRA file saved without its projections, call
    /// [`PeftAdapter::with_shared_from`] first.
    pub fn layer(&self, module: &str, base: BaseLayer) -> Result<AdaptedModule> {
        let mut layer = AdaptedModule::new(module, base);
        let tensors = self.layer_tensors(module)?.clone();
        layer.add(
            &self.adapter_name,
            &*self.config,
            ParamSource::Given(tensors),
            &self.shared,
        )?;
        layer.set_active(&[&self.adapter_name])?;
        Ok(layer)
    }

    /// Whether the adapter-wide tensors must be regenerated from the base model's shapes
    /// (a VeRA file saved with `save_projection=false`).
    pub fn needs_model_shapes(&self) -> bool {
        self.shared.is_empty() && !self.config.shared_names().is_empty()
    }

    /// Regenerates missing adapter-wide tensors from the shapes of every adapted module's weight
    /// in `state_dict` (PEFT sizes them to the largest targeted layer).
    pub fn with_shared_from(
        &mut self,
        state_dict: &HashMap<String, Tensor>,
        kinds: &ModuleKinds,
    ) -> Result<()> {
        if !self.needs_model_shapes() {
            return Ok(());
        }
        let (mut out_max, mut in_max) = (0, 0);
        for module in self.layers.keys() {
            let base = self.base_layer_from(module, kinds, state_dict)?;
            out_max = out_max.max(base.out_features());
            in_max = in_max.max(base.in_features());
        }
        self.shared = self.config.generate_shared(out_max, in_max)?;
        Ok(())
    }

    /// Base-model tensors this adapter replaces outright, keyed like the base `state_dict()`.
    pub fn replaced_tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.replaced
    }

    /// The base layer of `module` taken from a `state_dict()`-keyed map (`<module>.weight`,
    /// `<module>.bias`), with biases the adapter replaces already swapped in.
    pub fn base_layer_from(
        &self,
        module: &str,
        kinds: &ModuleKinds,
        state_dict: &HashMap<String, Tensor>,
    ) -> Result<BaseLayer> {
        let kind = *kinds.get(module).ok_or_else(|| PeftError::MissingKey {
            key: module.to_string(),
            context:
                "the adapter targets this module, but the model's module types have no entry for it"
                    .into(),
        })?;
        let weight_key = format!("{module}.weight");
        let bias_key = format!("{module}.bias");
        let weight = self
            .replaced
            .get(&weight_key)
            .or_else(|| state_dict.get(&weight_key))
            .ok_or_else(|| PeftError::MissingKey {
                key: weight_key.clone(),
                context: "base state dict".into(),
            })?;
        let bias = self
            .replaced
            .get(&bias_key)
            .or_else(|| state_dict.get(&bias_key));
        let bias = match (bias, state_dict.get(&bias_key)) {
            (Some(b), Some(orig)) => Some(b.to_dtype(orig.dtype())?),
            (b, _) => b.cloned(),
        };
        BaseLayer::new(kind, weight.clone(), bias)
    }

    /// Merges the adapter into a base `state_dict()`: returns every entry that changes (merged
    /// weights and biases, `modules_to_save` and saved biases), in the given entries' dtypes.
    pub fn merge_into(
        &self,
        state_dict: &HashMap<String, Tensor>,
        kinds: &ModuleKinds,
        safe_merge: bool,
    ) -> Result<BTreeMap<String, Tensor>> {
        if self.needs_model_shapes() {
            let mut resolved = self.clone();
            resolved.with_shared_from(state_dict, kinds)?;
            return resolved.merge_into(state_dict, kinds, safe_merge);
        }
        let mut out = BTreeMap::new();
        for (key, tensor) in &self.replaced {
            let original = state_dict.get(key).ok_or_else(|| PeftError::MissingKey {
                key: key.clone(),
                context: "the adapter replaces it, but the base state dict lacks it".into(),
            })?;
            if original.dims() != tensor.dims() {
                return Err(PeftError::shape(
                    key.clone(),
                    original.dims(),
                    tensor.dims(),
                ));
            }
            out.insert(key.clone(), tensor.to_dtype(original.dtype())?);
        }
        for module in self.layers.keys() {
            let base = self.base_layer_from(module, kinds, state_dict)?;
            let mut layer = self.layer(module, base)?;
            layer.merge(None, safe_merge)?;
            out.insert(format!("{module}.weight"), layer.base().weight()?);
            if let Some(bias) = layer.base().bias() {
                out.insert(format!("{module}.bias"), bias.clone());
            }
        }
        Ok(out)
    }

    /// Checks the tensors against each other and against the config without a model: for each
    /// adapted module, the base layer its tensors imply ([`MethodConfig::infer_base`]) is built
    /// as a shape only (a broadcast scalar, never allocated), and the method's adapter is built
    /// on it from the module's tensors, exactly as loading onto a model would. Every error that
    /// build reports (it names the key, the expected and the found shape; a rank that differs
    /// from the config's `r` / `rank_pattern` shows there) is one problem of that module. Empty
    /// when nothing is wrong or the method cannot tell. Never fails.
    ///
    /// What shapes cannot tell is not checked: a tensor consistent with a base of another width
    /// than the model's, or the model's module kinds (Linear and Conv1D look alike).
    ///
    /// [`MethodConfig::infer_base`]: crate::method::MethodConfig::infer_base
    pub fn check(&self) -> Vec<ShapeProblem> {
        let mut problems = Vec::new();
        let mut bases = Vec::new();
        for (module, tensors) in &self.layers {
            let problem = |message: String| ShapeProblem {
                module: module.clone(),
                message,
            };
            let inferred = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.config.infer_base(module, tensors, &self.shared)
            }));
            match inferred {
                Ok(Ok(Some(base))) if base.dims.contains(&0) => problems.push(problem(format!(
                    "the tensors imply an empty base weight of shape {:?} ({:?})",
                    base.dims, base.kind
                ))),
                Ok(Ok(Some(base))) => match shape_only_base(base.kind, &base.dims) {
                    Ok(layer) => bases.push((module, tensors, layer)),
                    Err(e) => problems.push(problem(e.to_string())),
                },
                Ok(Ok(None)) => {}
                Ok(Err(e)) => problems.push(problem(e.to_string())),
                Err(_) => problems.push(problem("the tensors' shapes could not be read".into())),
            }
        }
        // A VeRA file without its projections: regenerated to the widest inferred layer, as
        // loading does from the model's.
        let generated;
        let shared = if self.needs_model_shapes() && !bases.is_empty() {
            let out_max = bases.iter().map(|b| b.2.out_features()).max().unwrap_or(0);
            let in_max = bases.iter().map(|b| b.2.in_features()).max().unwrap_or(0);
            match self.config.generate_shared(out_max, in_max) {
                Ok(g) => {
                    generated = g;
                    &generated
                }
                Err(e) => {
                    problems.push(ShapeProblem {
                        module: String::new(),
                        message: format!("the shared tensors cannot be regenerated: {e}"),
                    });
                    return problems;
                }
            }
        } else {
            &self.shared
        };
        for (module, tensors, base) in bases {
            let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let source = ParamSource::Given(tensors.clone());
                self.config.build(module, &base, source, shared).map(drop)
            }));
            let message = match built {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!(
                    "building the adapter on the {:?} base of shape {:?} its tensors imply failed",
                    base.kind(),
                    base.weight_dims()
                ),
            };
            problems.push(ShapeProblem {
                module: module.clone(),
                message,
            });
        }
        problems
    }

    /// The tensors under PEFT's file keys.
    pub fn to_state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .layers
            .iter()
            .flat_map(|(module, tensors)| {
                tensors
                    .iter()
                    .map(move |(n, t)| (format!("{MODEL_PREFIX}{module}.{n}"), t.clone()))
            })
            .collect();
        for (key, tensor) in &self.replaced {
            // An adapted module's own tensors live under its wrapped base layer.
            let file_key = match key.rsplit_once('.') {
                Some((module, param)) if self.layers.contains_key(module) => {
                    format!("{MODEL_PREFIX}{module}.base_layer.{param}")
                }
                _ => format!("{MODEL_PREFIX}{key}"),
            };
            out.push((file_key, tensor.clone()));
        }
        if self.config.saves_shared() {
            out.extend(
                self.shared
                    .iter()
                    .map(|(name, t)| (format!("{SHARED_PREFIX}{name}"), t.clone())),
            );
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir` (into
    /// `dir/<name>` for a non-default adapter, as PEFT does). Returns the directory written.
    pub fn save_pretrained(&self, dir: &Path) -> Result<PathBuf> {
        let dir = if self.adapter_name == DEFAULT_ADAPTER_NAME {
            dir.to_path_buf()
        } else {
            dir.join(&self.adapter_name)
        };
        std::fs::create_dir_all(&dir).map_err(|e| PeftError::io(&dir, e))?;
        write_safetensors(&dir.join(crate::io::WEIGHTS_NAME), &self.to_state_dict())?;
        let json = config_to_file_json(&*self.config);
        write_atomic(&dir.join(CONFIG_NAME), json.as_bytes())?;
        Ok(dir)
    }
}

/// One problem [`PeftAdapter::check`] found: the module (empty for the adapter-wide tensors) and
/// what is wrong, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeProblem {
    pub module: String,
    pub message: String,
}

/// A base layer of `kind` whose weight has shape `dims` but no storage of that size: a scalar
/// zero broadcast (all strides zero), for building adapters to check their shapes.
fn shape_only_base(kind: ModuleKind, dims: &[usize]) -> Result<BaseLayer> {
    let weight = Tensor::zeros((), DType::F32, &Device::Cpu)?.broadcast_as(dims)?;
    BaseLayer::new(kind, weight, None)
}

/// Splits `"<module>.<param>"` where `param` is one of `names`.
fn split_param<'a>(key: &'a str, names: &[&str]) -> Option<(&'a str, &'a str)> {
    names.iter().find_map(|name| {
        let module = key.strip_suffix(name)?.strip_suffix('.')?;
        (!module.is_empty()).then(|| (module, &key[module.len() + 1..]))
    })
}

/// Whether a `state_dict()` key lies inside a module wrapped by `modules_to_save`.
fn module_to_save_prefix(modules_to_save: &[String], key: &str) -> bool {
    key.match_indices('.')
        .any(|(i, _)| is_module_to_save(modules_to_save, &key[..i]))
}
