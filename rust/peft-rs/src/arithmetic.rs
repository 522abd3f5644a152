//! Adapter arithmetic: PEFT's `LoraModel.add_weighted_adapter` (`tuners/lora/model.py` and
//! `utils/merge_utils.py`), over adapter files or a [`crate::model::PeftModel`]'s adapters.
//!
//! What PEFT does, and so what this does:
//! - `cat`: `A = cat(wᵢ sᵢ Aᵢ)`, `B = cat(Bᵢ)`, so `B A = Σ wᵢ sᵢ Bᵢ Aᵢ` exactly; rank `Σ rᵢ`.
//! - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: A and B are combined
//!   **separately** with weights `sign(wᵢsᵢ)·sqrt|wᵢsᵢ|` (A) and `sqrt|wᵢsᵢ|` (B), so for several
//!   adapters `B A` holds cross terms `Bᵢ Aⱼ` (PEFT's known limitation); all ranks must be equal.
//! - `svd` and the `*_svd` types: the per-adapter deltas `Δᵢ = sᵢ Bᵢ Aᵢ` are combined with the
//!   weights `wᵢ` (scaling applied once, as in peft 0.21.2), then truncated to `svd_rank` (default
//!   the largest rank) by an SVD: `B = U Σ`, `A = Vᴴ`, optionally clamped at a quantile.
//! - The new config is the first adapter's with `r = lora_alpha = new rank` (scaling 1), the
//!   union of the target modules and no rank/alpha patterns. PEFT keeps the first adapter's
//!   `use_rslora`, which makes the new scaling `sqrt(r)` instead of 1; that is kept too.
//!
//! [`Combination::Exact`] (not in PEFT) is `cat` without that quirk: the merged ΔW is exactly
//! `Σ wᵢ ΔWᵢ` whatever the sources' scalings.
//!
//! [`Combination::ExactSvd`] (`"exact_svd"`, not in PEFT) is the best rank-`k` approximation of
//! that exact sum (Eckart–Young), with `k = svd_rank` (default the largest source rank), and
//! reports how much it drops. It never forms ΔW: `Σ wᵢ sᵢ Bᵢ Aᵢ = B_cat A_cat` with
//! `R = Σ rᵢ` columns/rows, so with thin Householder QRs `B_cat = Q_B R_B`, `A_catᵀ = Q_A R_A`
//! (in f64) the SVD of the small core `R_B R_Aᵀ = U_c Σ V_cᵀ` gives the exact SVD
//! `ΔW = (Q_B U_c) Σ (Q_A V_c)ᵀ` in `O((out + in) R²)` ([`Svd::factored`]). The result is
//! `B = U_k Σ_k`, `A = V_kᵀ` (signs as below), with the config of `exact` (`r = lora_alpha = k`,
//! scaling 1 whatever rsLoRA). [`CombineReport::truncation_errors`] holds, per module, the
//! relative Frobenius error `‖ΔW − B A‖_F / ‖ΔW‖_F = sqrt(Σ_{i>k} σᵢ²) / sqrt(Σ σᵢ²)` (0 for a
//! zero ΔW), exact from the core's singular values. `svd_rank` above `R = Σ rᵢ` (the sum of the
//! sources' ranks) is an error (there are at most `R` components: use `exact` for all of them); a
//! module held by fewer sources keeps all its components (error 0), zero-padded to `k`.
//! `svd_clamp` is rejected (it breaks the approximation); `svd_full_matrices` and `density` are
//! ignored. Linear, Conv1D, Conv2d (non-grouped; sources of one kernel shape) and Embedding LoRA
//! are supported, as for `exact`; one source may be given (rank reduction of one adapter).
//!
//! PEFT's plain `svd` uses the same factored SVD (its ΔW is also `Σ wᵢ sᵢ Bᵢ Aᵢ`): same singular
//! triplets and signs, hence the same factors up to rounding, when the rank does not exceed the
//! number of components (else, and for the pruning `*_svd` types, the dense Jacobi SVD of ΔW).
//!
//! Differences from PEFT, each an error rather than a different result: adapters and weights of
//! different lengths (PEFT's `zip` drops the extra ones), DoRA / `lora_bias` sources (PEFT leaves
//! the new magnitude/bias at their initial values), `modules_to_save` or trained biases, grouped
//! Conv2d, and an SVD rank above `min(out, in)` with `svd_full_matrices` (PEFT's factors then do
//! not fit together). Ranks below the new rank (a layer's `rank_pattern`, a small SVD) are padded
//! with zeros, which leaves ΔW unchanged and keeps the saved file loadable.
//!
//! SVD signs: `torch.linalg.svd` (LAPACK) leaves the sign of each singular pair unspecified. The
//! product `B A` does not depend on it, but `svd_clamp`'s quantile does; here each pair is signed
//! so that the largest entry (in magnitude) of its left singular vector is positive.
//!
//! DARE masks come from PyTorch's CPU generator (`mt19937`) seeded with [`CombineOptions::seed`],
//! drawn as `torch.bernoulli` draws them, in PEFT's order (module by module; A tensors of every
//! adapter then B tensors, or one delta per adapter for the `*_svd` types). They equal PEFT's when
//! PEFT's `bernoulli` draws from a generator seeded with the same seed and used for nothing else
//! (PEFT itself draws from the global generator, after the new adapter's initialisation).
//! Adapter files have no module order: their modules are taken in sorted order.
//!
//! IA³ ([`combine_ia3`], PEFT's `IA3Model.add_weighted_adapter`): the new vector of each module
//! is `Σ wᵢ lᵢ` over the sources that hold it; its config is the first source's with the union
//! of the `target_modules` and of the `feedforward_modules`. [`combine_adapters`] picks LoRA or
//! IA³ by the sources' `peft_type`.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::config::{ModuleSelector, PeftConfig};
use crate::error::{PeftError, Result};
use crate::method::MethodConfig;
use crate::methods::ia3::{IA3_L, Ia3Config};
use crate::methods::lora::{LORA_A, LORA_B, LORA_EMBEDDING_A, LORA_EMBEDDING_B, LoraConfig};
use crate::peft_adapter::PeftAdapter;
use crate::rng::TorchGenerator;

/// PEFT's `combination_type`, plus [`Combination::Exact`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    Svd,
    Linear,
    Cat,
    Ties,
    TiesSvd,
    DareLinear,
    DareTies,
    DareLinearSvd,
    DareTiesSvd,
    MagnitudePrune,
    MagnitudePruneSvd,
    /// `cat` with scaling 1 whatever the first adapter's `use_rslora`: ΔW = Σ wᵢ ΔWᵢ exactly.
    Exact,
    /// The best rank-`svd_rank` approximation of `exact`'s ΔW, with its truncation error
    /// reported ([`CombineReport`]).
    ExactSvd,
}

const COMBINATIONS: &[(&str, Combination)] = &[
    ("svd", Combination::Svd),
    ("linear", Combination::Linear),
    ("cat", Combination::Cat),
    ("ties", Combination::Ties),
    ("ties_svd", Combination::TiesSvd),
    ("dare_linear", Combination::DareLinear),
    ("dare_ties", Combination::DareTies),
    ("dare_linear_svd", Combination::DareLinearSvd),
    ("dare_ties_svd", Combination::DareTiesSvd),
    ("magnitude_prune", Combination::MagnitudePrune),
    ("magnitude_prune_svd", Combination::MagnitudePruneSvd),
    ("exact", Combination::Exact),
    ("exact_svd", Combination::ExactSvd),
];

/// How the task tensors (A's, B's or deltas) of one module are merged (`merge_utils.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskMerge {
    Sum,
    MagnitudePrune,
    Ties,
    DareLinear,
    DareTies,
}

impl Combination {
    /// PEFT's name (`"svd"`, `"dare_ties"`...), or `"exact"` / `"exact_svd"`.
    pub fn from_name(name: &str) -> Result<Self> {
        COMBINATIONS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
            .ok_or_else(|| {
                PeftError::config(
                    "combination_type",
                    format!("Invalid combination_type: {name}"),
                )
            })
    }

    pub fn name(self) -> &'static str {
        COMBINATIONS
            .iter()
            .find(|(_, c)| *c == self)
            .map_or("?", |(n, _)| n)
    }

    fn uses_svd(self) -> bool {
        self.name().ends_with("svd")
    }

    fn task_merge(self) -> TaskMerge {
        match self {
            Self::Ties | Self::TiesSvd => TaskMerge::Ties,
            Self::DareLinear | Self::DareLinearSvd => TaskMerge::DareLinear,
            Self::DareTies | Self::DareTiesSvd => TaskMerge::DareTies,
            Self::MagnitudePrune | Self::MagnitudePruneSvd => TaskMerge::MagnitudePrune,
            Self::Svd | Self::Linear | Self::Cat | Self::Exact | Self::ExactSvd => TaskMerge::Sum,
        }
    }
}

/// `majority_sign_method` of the TIES types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// The sign of the sum of the (pruned) task tensors.
    #[default]
    Total,
    /// The sign held by most task tensors.
    Frequency,
}

impl MajoritySign {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "total" => Ok(Self::Total),
            "frequency" => Ok(Self::Frequency),
            _ => Err(PeftError::config(
                "majority_sign_method",
                format!("Unimplemented mask method \"{name}\" (use \"total\" or \"frequency\")"),
            )),
        }
    }
}

/// The keyword arguments of PEFT's `add_weighted_adapter`, plus the seed of DARE's masks.
#[derive(Debug, Clone, PartialEq)]
pub struct CombineOptions {
    /// Rank of the `*svd` results; default the largest source rank.
    pub svd_rank: Option<usize>,
    /// Quantile (in [0, 1]) at which the SVD factors are clamped.
    pub svd_clamp: Option<f64>,
    pub svd_full_matrices: bool,
    /// Fraction of entries kept by the pruning types (required by them).
    pub density: Option<f64>,
    pub majority_sign_method: MajoritySign,
    /// Seed of the DARE masks' generator.
    pub seed: u64,
}

impl Default for CombineOptions {
    fn default() -> Self {
        Self {
            svd_rank: None,
            svd_clamp: None,
            svd_full_matrices: true,
            density: None,
            majority_sign_method: MajoritySign::Total,
            seed: 0,
        }
    }
}

/// What a combination reports besides the new adapter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CombineReport {
    /// [`Combination::ExactSvd`]: per module, the relative Frobenius truncation error
    /// `‖ΔW − B A‖_F / ‖ΔW‖_F` (0 for a zero ΔW). Empty for the other types.
    pub truncation_errors: BTreeMap<String, f64>,
}

impl CombineReport {
    /// The largest truncation error (`None` without any).
    pub fn max_error(&self) -> Option<f64> {
        self.truncation_errors.values().copied().reduce(f64::max)
    }

    /// The mean truncation error over the modules (`None` without any).
    pub fn mean_error(&self) -> Option<f64> {
        let n = self.truncation_errors.len();
        (n > 0).then(|| self.truncation_errors.values().sum::<f64>() / n as f64)
    }
}

/// PEFT's `add_weighted_adapter` over LoRA adapter files: a new adapter `adapter_name` whose
/// modules are those of the sources that the new config selects (in sorted order).
pub fn combine_lora(
    adapter_name: &str,
    adapters: &[&PeftAdapter],
    weights: &[f64],
    combination: Combination,
    options: &CombineOptions,
) -> Result<PeftAdapter> {
    Ok(combine_lora_with_report(adapter_name, adapters, weights, combination, options)?.0)
}

/// [`combine_lora`] with its [`CombineReport`] (the truncation errors of `exact_svd`).
pub fn combine_lora_with_report(
    adapter_name: &str,
    adapters: &[&PeftAdapter],
    weights: &[f64],
    combination: Combination,
    options: &CombineOptions,
) -> Result<(PeftAdapter, CombineReport)> {
    combine_modules_with_report(
        adapter_name,
        adapters,
        weights,
        combination,
        options,
        &module_union(adapters),
    )
}

/// Every module some adapter holds, sorted.
fn module_union(adapters: &[&PeftAdapter]) -> Vec<String> {
    let mut modules: Vec<String> = adapters
        .iter()
        .flat_map(|a| a.module_names())
        .map(str::to_string)
        .collect();
    modules.sort();
    modules.dedup();
    modules
}

/// PEFT's `add_weighted_adapter` for the method of the sources (their `peft_type`): LoRA
/// ([`combine_lora`]; `combination` defaults to PEFT's `svd`) or IA³ ([`combine_ia3`], which
/// takes no combination type: `None` or `linear`, and no options).
pub fn combine_adapters(
    adapter_name: &str,
    adapters: &[&PeftAdapter],
    weights: &[f64],
    combination: Option<Combination>,
    options: &CombineOptions,
) -> Result<PeftAdapter> {
    Ok(combine_adapters_with_report(adapter_name, adapters, weights, combination, options)?.0)
}

/// [`combine_adapters`] with its [`CombineReport`] (the truncation errors of `exact_svd`).
pub fn combine_adapters_with_report(
    adapter_name: &str,
    adapters: &[&PeftAdapter],
    weights: &[f64],
    combination: Option<Combination>,
    options: &CombineOptions,
) -> Result<(PeftAdapter, CombineReport)> {
    let candidates = module_union(adapters);
    combine_candidates(
        adapter_name,
        adapters,
        weights,
        combination,
        options,
        &candidates,
    )
}

/// [`combine_adapters_with_report`] over `candidates` (a model's module paths, in its order).
pub(crate) fn combine_candidates(
    adapter_name: &str,
    adapters: &[&PeftAdapter],
    weights: &[f64],
    combination: Option<Combination>,
    options: &CombineOptions,
    candidates: &[String],
) -> Result<(PeftAdapter, CombineReport)> {
    if method_of(adapters)? == Some(crate::methods::ia3::PEFT_TYPE) {
        check_ia3_arguments(combination, options)?;
        let adapter = combine_ia3_modules(adapter_name, adapters, weights, candidates)?;
        return Ok((adapter, CombineReport::default()));
    }
    let combination = combination.unwrap_or(Combination::Svd);
    combine_modules_with_report(
        adapter_name,
        adapters,
        weights,
        combination,
        options,
        candidates,
    )
}

/// The one `peft_type` of the sources (`None` for no sources): LoRA or IA³.
fn method_of(adapters: &[&PeftAdapter]) -> Result<Option<&'static str>> {
    use crate::methods::{ia3, lora};
    let Some(first) = adapters.first() else {
        return Ok(None);
    };
    let peft_type = first.config().peft_type();
    if let Some(other) = adapters
        .iter()
        .find(|a| a.config().peft_type() != peft_type)
    {
        return Err(PeftError::InvalidOperation(format!(
            "add_weighted_adapter combines adapters of one method: {:?} is {peft_type}, {:?} is {}",
            first.adapter_name(),
            other.adapter_name(),
            other.config().peft_type()
        )));
    }
    if peft_type != lora::PEFT_TYPE && peft_type != ia3::PEFT_TYPE {
        return Err(PeftError::InvalidOperation(format!(
            "add_weighted_adapter combines LoRA or IA3 adapters; {:?} is a {peft_type} adapter",
            first.adapter_name()
        )));
    }
    Ok(Some(peft_type))
}

/// PEFT's `IA3Model.add_weighted_adapter(adapters, weights, adapter_name)` has no
/// `combination_type` and no options: only the plain weighted sum (`linear`) is accepted.
fn check_ia3_arguments(combination: Option<Combination>, options: &CombineOptions) -> Result<()> {
    if let Some(c) = combination.filter(|&c| c != Combination::Linear) {
        return Err(PeftError::config(
            "combination_type",
            format!(
                "IA3 adapters are combined by their weighted sum (PEFT's \
                 IA3Model.add_weighted_adapter takes no combination_type); got {:?}",
                c.name()
            ),
        ));
    }
    // The seed only draws DARE masks, so it is ignored rather than checked.
    let defaults = CombineOptions {
        seed: options.seed,
        ..CombineOptions::default()
    };
    if *options != defaults {
        return Err(PeftError::InvalidOperation(
            "IA3's add_weighted_adapter takes no svd_rank, svd_clamp, svd_full_matrices, \
             density or majority_sign_method"
                .into(),
        ));
    }
    Ok(())
}

/// PEFT's `IA3Model.add_weighted_adapter` over IA³ adapter files: each module's new vector is
/// `Σ wᵢ lᵢ` over the sources holding it, for the modules the new config selects (sorted).
pub fn combine_ia3(
    adapter_name: &str,
    adapters: &[&PeftAdapter],
    weights: &[f64],
) -> Result<PeftAdapter> {
    combine_ia3_modules(adapter_name, adapters, weights, &module_union(adapters))
}

/// [`combine_ia3`] over `candidates` (a model's module paths, in its order).
///
/// A module that the new config selects but no source holds is an error (PEFT leaves its
/// vector at zero, which silences the layer).
fn combine_ia3_modules(
    adapter_name: &str,
    adapters: &[&PeftAdapter],
    weights: &[f64],
    candidates: &[String],
) -> Result<PeftAdapter> {
    check_weights(adapters, weights)?;
    let sources = adapters
        .iter()
        .zip(weights)
        .map(|(adapter, &weight)| Ia3Source::new(adapter, weight))
        .collect::<Result<Vec<_>>>()?;
    let config = ia3_union_config(&sources)?;
    let mut layers = BTreeMap::new();
    for module in candidates {
        if config.selection().is_target(module)? {
            let l = weighted_ia3(module, &sources, config.is_feedforward(module)?)?;
            layers.insert(module.clone(), vec![(IA3_L.to_string(), l)]);
        }
    }
    if layers.is_empty() {
        return Err(PeftError::InvalidOperation(
            "the combined IA3 config selects none of the adapters' modules".into(),
        ));
    }
    let config = PeftConfig::new(Arc::new(config))?;
    Ok(PeftAdapter::from_parts(
        adapter_name,
        config,
        layers,
        BTreeMap::new(),
        BTreeMap::new(),
    ))
}

/// One IA³ source adapter: its file, config and weight.
struct Ia3Source<'a> {
    adapter: &'a PeftAdapter,
    config: Ia3Config,
    weight: f64,
}

impl<'a> Ia3Source<'a> {
    fn new(adapter: &'a PeftAdapter, weight: f64) -> Result<Self> {
        check_replaced(adapter)?;
        Ok(Self {
            adapter,
            config: Ia3Config::from_json(adapter.config().to_json())?,
            weight,
        })
    }

    /// `ia3_l` of `module`, if this adapter holds the module.
    fn vector(&self, module: &str) -> Result<Option<&Tensor>> {
        let Ok(tensors) = self.adapter.tensors(module) else {
            return Ok(None);
        };
        let l = tensors.iter().find(|(n, _)| n == IA3_L).map(|(_, t)| t);
        l.map(Some).ok_or_else(|| PeftError::MissingKey {
            key: format!("{module}.{IA3_L}"),
            context: format!("adapter {:?}", self.adapter.adapter_name()),
        })
    }
}

/// `replace(config_of_first, target_modules=union, feedforward_modules=union)`.
fn ia3_union_config(sources: &[Ia3Source]) -> Result<Ia3Config> {
    let targets: Vec<_> = sources.iter().map(|s| &s.config.target_modules).collect();
    let feedforward: Vec<_> = sources
        .iter()
        .map(|s| &s.config.feedforward_modules)
        .collect();
    let mut config = sources[0].config.clone();
    config.target_modules = Some(union_selector(&targets)?.ok_or_else(|| {
        PeftError::config("target_modules", "the adapters have no target_modules")
    })?);
    config.feedforward_modules = union_selector(&feedforward)?;
    Ok(config)
}

/// IA³'s union of selectors: regexes joined as `(r1)|(r2)`, name lists merged; all must be of
/// one kind (PEFT compares their Python types, `None` included).
fn union_selector(selectors: &[&Option<ModuleSelector>]) -> Result<Option<ModuleSelector>> {
    let kind = |s: &Option<ModuleSelector>| s.as_ref().map(std::mem::discriminant);
    if selectors.iter().any(|s| kind(s) != kind(selectors[0])) {
        return Err(PeftError::config(
            "target_modules",
            "All adapter configs should have the same type for target and feedforward modules.",
        ));
    }
    let mut regexes = Vec::new();
    let mut names = Vec::new();
    for selector in selectors.iter().copied().flatten() {
        match selector {
            ModuleSelector::Regex(r) => regexes.push(format!("({r})")),
            ModuleSelector::Names(n) => names.extend(n.iter().cloned()),
        }
    }
    names.sort();
    names.dedup();
    Ok(match selectors[0] {
        None => None,
        Some(ModuleSelector::Regex(_)) => Some(ModuleSelector::Regex(regexes.join("|"))),
        Some(ModuleSelector::Names(_)) => Some(ModuleSelector::Names(names)),
    })
}

/// `Σ wᵢ lᵢ` over the sources holding `module`, in the vectors' dtype as PEFT computes it
/// (`l = 0; l += lᵢ * wᵢ`, the weight rounded to that dtype).
fn weighted_ia3(module: &str, sources: &[Ia3Source], feedforward: bool) -> Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    for source in sources {
        let Some(l) = source.vector(module)? else {
            continue;
        };
        // A vector scales the input of a feed-forward module and the output of any other:
        // the two cannot be added (PEFT fails to broadcast them).
        if source.config.is_feedforward(module)? != feedforward {
            return Err(PeftError::InvalidOperation(format!(
                "`{module}` is {}a feed-forward module in the combined config but {}one in \
                 adapter {:?}: their vectors cannot be added",
                if feedforward { "" } else { "not " },
                if feedforward { "not " } else { "" },
                source.adapter.adapter_name()
            )));
        }
        let term = l.affine(source.weight, 0.0)?;
        sum = Some(match sum {
            None => term,
            Some(acc) if acc.dims() != term.dims() => {
                return Err(PeftError::shape(
                    format!("`{module}`.{IA3_L} of {:?}", source.adapter.adapter_name()),
                    acc.dims(),
                    term.dims(),
                ));
            }
            Some(acc) => (acc + term)?,
        });
    }
    sum.ok_or_else(|| {
        PeftError::InvalidOperation(format!(
            "the combined IA3 config selects `{module}` but no source adapter holds it"
        ))
    })
}

/// [`combine_lora`] over `candidates` (a model's module paths, in its order): the new adapter
/// holds every candidate its config selects, each of which some source must hold.
fn combine_modules_with_report(
    adapter_name: &str,
    adapters: &[&PeftAdapter],
    weights: &[f64],
    combination: Combination,
    options: &CombineOptions,
    candidates: &[String],
) -> Result<(PeftAdapter, CombineReport)> {
    let sources = sources(adapters, weights)?;
    // A single adapter can only be combined linearly (PEFT); the exact modes are not PEFT's.
    let exact = matches!(combination, Combination::Exact | Combination::ExactSvd);
    let combination = if adapters.len() == 1 && !exact {
        Combination::Linear
    } else {
        combination
    };
    check_options(combination, options)?;
    let new_rank = new_rank(&sources, combination, options.svd_rank)?;
    let config = new_config(&sources, combination, new_rank)?;
    let mut rng = TorchGenerator::new(options.seed);
    let mut layers = BTreeMap::new();
    let mut report = CombineReport::default();
    for module in candidates {
        if !config.selection().is_target(module)? {
            continue;
        }
        let ctx = ModuleCombine {
            module,
            new_rank,
            combination,
            options,
        };
        let (tensors, error) = ctx.combine(&sources, &mut rng)?;
        layers.insert(module.clone(), tensors);
        if let Some(error) = error {
            report.truncation_errors.insert(module.clone(), error);
        }
    }
    if layers.is_empty() {
        return Err(PeftError::InvalidOperation(
            "No matching LoRAs found: the combined config selects none of the adapters' modules"
                .into(),
        ));
    }
    let replaced = embedding_base_weights(adapters, &layers);
    let adapter = PeftAdapter::from_parts(adapter_name, config, layers, replaced, BTreeMap::new());
    Ok((adapter, report))
}

/// One source adapter: its file, LoRA config and weight.
struct Source<'a> {
    adapter: &'a PeftAdapter,
    config: LoraConfig,
    weight: f64,
}

fn sources<'a>(adapters: &[&'a PeftAdapter], weights: &[f64]) -> Result<Vec<Source<'a>>> {
    check_weights(adapters, weights)?;
    let mut out = Vec::new();
    for (adapter, &weight) in adapters.iter().zip(weights) {
        let name = adapter.adapter_name();
        let peft_type = adapter.config().peft_type();
        if peft_type != crate::methods::lora::PEFT_TYPE {
            return Err(PeftError::InvalidOperation(format!(
                "add_weighted_adapter combines LoRA adapters; {name:?} is a {peft_type} adapter"
            )));
        }
        let config = LoraConfig::from_json(adapter.config().to_json())?;
        if config.use_dora || config.lora_bias {
            return Err(PeftError::InvalidOperation(format!(
                "{name:?} uses DoRA or lora_bias, which add_weighted_adapter does not combine \
                 (PEFT leaves the new magnitude/bias at their initial values)"
            )));
        }
        check_replaced(adapter)?;
        out.push(Source {
            adapter,
            config,
            weight,
        });
    }
    Ok(out)
}

/// Some adapters, one finite weight each.
fn check_weights(adapters: &[&PeftAdapter], weights: &[f64]) -> Result<()> {
    if adapters.is_empty() {
        return Err(PeftError::config(
            "adapters",
            "Found no adapter matching the names in []",
        ));
    }
    if adapters.len() != weights.len() {
        return Err(PeftError::InvalidOperation(format!(
            "{} adapters but {} weights: give one weight per adapter",
            adapters.len(),
            weights.len()
        )));
    }
    for (adapter, weight) in adapters.iter().zip(weights) {
        if !weight.is_finite() {
            return Err(PeftError::config(
                "weights",
                format!("the weight of {:?} is {weight}", adapter.adapter_name()),
            ));
        }
    }
    Ok(())
}

/// Only the saved base weights of adapted embedding layers may come along: `modules_to_save`
/// copies and trained biases cannot be combined.
fn check_replaced(adapter: &PeftAdapter) -> Result<()> {
    let adapted = adapter.module_names();
    for key in adapter.replaced_tensors().keys() {
        let base_weight = key
            .strip_suffix(".weight")
            .is_some_and(|m| adapted.contains(&m));
        if !base_weight {
            return Err(PeftError::InvalidOperation(format!(
                "{:?} replaces `{key}` (modules_to_save or a trained bias); adapters with such \
                 tensors cannot be combined",
                adapter.adapter_name()
            )));
        }
    }
    Ok(())
}

fn check_options(combination: Combination, options: &CombineOptions) -> Result<()> {
    if combination.task_merge() != TaskMerge::Sum {
        match options.density {
            None => {
                return Err(PeftError::config(
                    "density",
                    format!("combination_type {:?} needs a density", combination.name()),
                ));
            }
            Some(d) if d.is_nan() || d < 0.0 => {
                return Err(PeftError::config(
                    "density",
                    format!("Density should be >= 0, got {d}"),
                ));
            }
            Some(_) => {}
        }
    }
    if combination == Combination::ExactSvd && options.svd_clamp.is_some() {
        return Err(PeftError::config(
            "svd_clamp",
            "exact_svd does not clamp (clamping breaks the best rank-k approximation and its \
             reported error); use svd with svd_clamp",
        ));
    }
    if combination.uses_svd()
        && let Some(q) = options.svd_clamp
        && !(0.0..=1.0).contains(&q)
    {
        return Err(PeftError::config(
            "svd_clamp",
            format!("quantile() q must be in the range [0, 1] but got {q}"),
        ));
    }
    if options.svd_rank == Some(0) {
        return Err(PeftError::config("svd_rank", "must be positive"));
    }
    Ok(())
}

/// PEFT's `_check_add_weighted_adapter` rank rules.
fn new_rank(
    sources: &[Source],
    combination: Combination,
    svd_rank: Option<usize>,
) -> Result<usize> {
    let ranks: Vec<usize> = sources
        .iter()
        .map(|s| {
            let patterns = s.config.rank_pattern.0.iter().map(|(_, r)| *r);
            patterns.fold(s.config.r, u32::max) as usize
        })
        .collect();
    let max = ranks.iter().copied().max().unwrap_or(0);
    if combination == Combination::ExactSvd {
        let total: usize = ranks.iter().sum();
        let k = svd_rank.unwrap_or(max);
        if k > total {
            return Err(PeftError::config(
                "svd_rank",
                format!(
                    "exact_svd: svd_rank {k} is above the combined rank R = {total} (the sum of \
                     the sources' ranks), the most components ΔW has; use exact to keep them all"
                ),
            ));
        }
        return Ok(k);
    }
    if combination.uses_svd() {
        return Ok(svd_rank.unwrap_or(max));
    }
    match combination {
        Combination::Cat | Combination::Exact => Ok(ranks.iter().sum()),
        _ if ranks.iter().any(|&r| r != ranks[0]) => Err(PeftError::config(
            "r",
            "All adapters must have the same r value when using combination_type linear, ties, \
             dare_ties or dare_linear.",
        )),
        _ => Ok(ranks[0]),
    }
}

/// `replace(config_of_first, r=new_rank, lora_alpha=new_rank, target_modules=union,
/// rank_pattern={}, alpha_pattern={})`; `exact` also turns rsLoRA off (scaling 1).
fn new_config(sources: &[Source], combination: Combination, new_rank: usize) -> Result<PeftConfig> {
    let targets = union_targets(sources)?;
    let mut value = sources[0].config.fields();
    value["r"] = Value::from(new_rank);
    value["lora_alpha"] = Value::from(new_rank);
    value["target_modules"] = serde_json::to_value(targets).map_err(|e| {
        PeftError::config("target_modules", format!("cannot serialise the union: {e}"))
    })?;
    value["rank_pattern"] = Value::Object(Default::default());
    value["alpha_pattern"] = Value::Object(Default::default());
    if matches!(combination, Combination::Exact | Combination::ExactSvd) {
        value["use_rslora"] = Value::Bool(false);
    }
    value["peft_type"] = Value::from(crate::methods::lora::PEFT_TYPE);
    PeftConfig::from_json(value)
}

fn union_targets(sources: &[Source]) -> Result<ModuleSelector> {
    let targets: Vec<&ModuleSelector> = sources
        .iter()
        .map(|s| {
            s.config.target_modules.as_ref().ok_or_else(|| {
                PeftError::config(
                    "target_modules",
                    format!("{:?} has none", s.adapter.adapter_name()),
                )
            })
        })
        .collect::<Result<_>>()?;
    let regexes: Vec<String> = targets
        .iter()
        .filter_map(|t| match t {
            ModuleSelector::Regex(r) => Some(format!("({r})")),
            ModuleSelector::Names(_) => None,
        })
        .collect();
    if regexes.len() == targets.len() {
        return Ok(ModuleSelector::Regex(regexes.join("|")));
    }
    let mut names = Vec::new();
    for t in targets {
        match t {
            ModuleSelector::Names(n) => names.extend(n.iter().cloned()),
            ModuleSelector::Regex(_) => {
                return Err(PeftError::config(
                    "target_modules",
                    "all adapter configs should follow the same target modules type. Combining \
                     adapters with `target_modules` type being a mix of list/set and string is \
                     not supported.",
                ));
            }
        }
    }
    names.sort();
    names.dedup();
    Ok(ModuleSelector::Names(names))
}

/// The base weights PEFT saves for targeted embedding layers, taken from the first source that
/// has one, for the modules the new adapter holds.
fn embedding_base_weights(
    adapters: &[&PeftAdapter],
    layers: &BTreeMap<String, Vec<(String, Tensor)>>,
) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for module in layers.keys() {
        let key = format!("{module}.weight");
        if let Some(t) = adapters.iter().find_map(|a| a.replaced_tensors().get(&key)) {
            out.insert(key, t.clone());
        }
    }
    out
}

/// A dense row-major array in f64 with its shape.
#[derive(Debug, Clone)]
struct Dense {
    shape: Vec<usize>,
    data: Vec<f64>,
}

impl Dense {
    fn from_tensor(t: &Tensor) -> Result<Self> {
        Ok(Self {
            shape: t.dims().to_vec(),
            data: t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?,
        })
    }

    fn to_tensor(&self, dtype: DType) -> Result<Tensor> {
        let t = Tensor::from_vec(self.data.clone(), self.shape.as_slice(), &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?)
    }

    fn scaled(&self, s: f64) -> Self {
        Self {
            shape: self.shape.clone(),
            data: self.data.iter().map(|v| v * s).collect(),
        }
    }

    /// Rounded to f32, as PEFT's f32 tensors hold the value.
    fn rounded_f32(mut self) -> Self {
        for v in &mut self.data {
            *v = *v as f32 as f64;
        }
        self
    }
}

/// One source's LoRA factors on a module, with the names they are saved under.
struct Factors {
    a: Dense,
    b: Dense,
    names: (&'static str, &'static str),
    dtype: DType,
    scaling: f64,
    weight: f64,
}

impl Factors {
    fn rank(&self) -> usize {
        self.a.shape[0]
    }

    /// `(out, rank)` and `(rank, in_flat)`: the 2-D views whose product is ΔW / s.
    fn matrices(&self, module: &str) -> Result<(usize, usize, usize)> {
        let r = self.rank();
        let out = self.b.shape[0];
        let inner = self.b.shape.get(1).copied().unwrap_or(0);
        if inner != r || self.b.data.len() != out * r {
            return Err(PeftError::InvalidOperation(format!(
                "`{module}`: LoRA factors of shapes {:?} and {:?} cannot be combined (grouped \
                 Conv2d LoRA is not supported by add_weighted_adapter here)",
                self.b.shape, self.a.shape
            )));
        }
        Ok((out, r, self.a.data.len() / r.max(1)))
    }

    /// `s · B A` as an `(out, in_flat)` matrix (PEFT's `get_delta_weight`, in the B·A layout its
    /// SVD uses for every module kind), rounded to f32 as PEFT computes it.
    fn delta(&self, module: &str) -> Result<Dense> {
        let (out, r, inp) = self.matrices(module)?;
        let mut data = vec![0.0; out * inp];
        for i in 0..out {
            for k in 0..r {
                let bik = self.b.data[i * r + k];
                let row = &self.a.data[k * inp..(k + 1) * inp];
                for (d, a) in data[i * inp..(i + 1) * inp].iter_mut().zip(row) {
                    *d += bik * a;
                }
            }
        }
        Ok(Dense {
            shape: vec![out, inp],
            data,
        }
        .scaled(self.scaling)
        .rounded_f32())
    }
}

fn source_factors(source: &Source, module: &str) -> Result<Option<Factors>> {
    let Ok(tensors) = source.adapter.tensors(module) else {
        return Ok(None);
    };
    let get = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t);
    let (names, a, b) = match (get(LORA_A), get(LORA_B)) {
        (Some(a), Some(b)) => ((LORA_A, LORA_B), a, b),
        _ => match (get(LORA_EMBEDDING_A), get(LORA_EMBEDDING_B)) {
            (Some(a), Some(b)) => ((LORA_EMBEDDING_A, LORA_EMBEDDING_B), a, b),
            _ => {
                return Err(PeftError::MissingKey {
                    key: format!("{module}.lora_A / lora_B"),
                    context: format!("adapter {:?}", source.adapter.adapter_name()),
                });
            }
        },
    };
    let (r, alpha) = source.config.rank_and_alpha(module)?;
    Ok(Some(Factors {
        a: Dense::from_tensor(a)?,
        b: Dense::from_tensor(b)?,
        names,
        dtype: a.dtype(),
        scaling: source.config.scaling(r, alpha),
        weight: source.weight,
    }))
}

/// The combination of one module.
struct ModuleCombine<'a> {
    module: &'a str,
    new_rank: usize,
    combination: Combination,
    options: &'a CombineOptions,
}

/// A module's new tensors, with the truncation error of `exact_svd`.
type Combined = (Vec<(String, Tensor)>, Option<f64>);

/// `B_cat` (`out × rank`) and `A_cat` (`rank × inp`), row-major.
struct Concat {
    b: Vec<f64>,
    a: Vec<f64>,
    out: usize,
    rank: usize,
    inp: usize,
}

impl ModuleCombine<'_> {
    fn combine(&self, sources: &[Source], rng: &mut TorchGenerator) -> Result<Combined> {
        let mut factors = Vec::new();
        for source in sources {
            factors.extend(source_factors(source, self.module)?);
        }
        let Some(first) = factors.first() else {
            return Err(PeftError::InvalidOperation(format!(
                "No matching LoRAs found for `{}`: the combined config selects it but no source \
                 adapter holds it",
                self.module
            )));
        };
        let (names, dtype) = (first.names, first.dtype);
        let mut error = None;
        let (a, b) = match self.combination {
            Combination::Cat | Combination::Exact => self.cat(&factors)?,
            Combination::ExactSvd => {
                let (a, b, e) = self.exact_svd(&factors)?;
                error = Some(e);
                (a, b)
            }
            c if c.uses_svd() => self.svd(&factors, rng)?,
            _ => self.separately(&factors, rng)?,
        };
        let a = pad_rank(&a, 0, self.new_rank);
        let b = pad_rank(&b, 1, self.new_rank);
        let tensors = vec![
            (names.0.to_string(), a.to_tensor(dtype)?),
            (names.1.to_string(), b.to_tensor(dtype)?),
        ];
        Ok((tensors, error))
    }

    /// `B_cat = [B₁ … Bₙ]` (`out × R`) and `A_cat = [c₁A₁; …; cₙAₙ]` (`R × in`) with
    /// `cᵢ = coefficient(f)`, so that `B_cat A_cat = Σ cᵢ Bᵢ Aᵢ`.
    fn concatenated(
        &self,
        factors: &[Factors],
        coefficient: impl Fn(&Factors) -> f64,
    ) -> Result<Concat> {
        let (out, _, inp) = factors[0].matrices(self.module)?;
        let a_tail = &factors[0].a.shape[1..];
        for f in factors {
            let (o, _, i) = f.matrices(self.module)?;
            if o != out || i != inp || f.a.shape[1..] != *a_tail {
                return Err(PeftError::shape(
                    format!(
                        "`{}`: the adapters' LoRA factors must fit one ΔW to be combined",
                        self.module
                    ),
                    &factors[0].a.shape,
                    &f.a.shape,
                ));
            }
        }
        let total: usize = factors.iter().map(Factors::rank).sum();
        let mut a = Vec::with_capacity(total * inp);
        for f in factors {
            let c = coefficient(f);
            a.extend(f.a.data.iter().map(|v| v * c));
        }
        let mut b = Vec::with_capacity(out * total);
        for i in 0..out {
            for f in factors {
                let r = f.rank();
                b.extend_from_slice(&f.b.data[i * r..(i + 1) * r]);
            }
        }
        Ok(Concat {
            b,
            a,
            out,
            rank: total,
            inp,
        })
    }

    /// `B = U_k Σ_k`, `A = V_kᵀ` of `svd` (k = `min(new_rank, components)`) in the sources'
    /// layouts.
    fn truncated(&self, svd: &Svd, factors: &[Factors], m: usize, n: usize) -> (Dense, Dense) {
        let k = svd.s.len();
        let r = self.new_rank.min(k);
        let mut b = Vec::with_capacity(m * r);
        for i in 0..m {
            b.extend((0..r).map(|j| svd.u[i * k + j] * svd.s[j]));
        }
        let a = svd.vt[..r * n].to_vec();
        let mut a_shape = factors[0].a.shape.clone();
        a_shape[0] = r;
        let mut b_shape = factors[0].b.shape.clone();
        b_shape[1] = r;
        (
            Dense {
                shape: a_shape,
                data: a,
            },
            Dense {
                shape: b_shape,
                data: b,
            },
        )
    }

    /// The best rank-`new_rank` approximation of `Σ wᵢ sᵢ Bᵢ Aᵢ` from the SVD of its factors,
    /// and its relative Frobenius error.
    fn exact_svd(&self, factors: &[Factors]) -> Result<(Dense, Dense, f64)> {
        let Concat {
            b,
            a,
            out: m,
            rank: r,
            inp: n,
        } = self.concatenated(factors, |f| f.weight * f.scaling)?;
        let svd = Svd::factored(&b, &a, m, r, n);
        let error = svd.truncation_error(self.new_rank);
        let (a, b) = self.truncated(&svd, factors, m, n);
        Ok((a, b, error))
    }

    /// `A = cat(wᵢ sᵢ Aᵢ)` (rows), `B = cat(Bᵢ)` (columns).
    fn cat(&self, factors: &[Factors]) -> Result<(Dense, Dense)> {
        let mut a_rows = Vec::new();
        let mut b_cols: Vec<Dense> = Vec::new();
        for f in factors {
            f.matrices(self.module)?;
            a_rows.extend(f.a.scaled(f.weight * f.scaling).rounded_f32().data);
            b_cols.push(f.b.clone());
        }
        let mut a_shape = factors[0].a.shape.clone();
        a_shape[0] = factors.iter().map(Factors::rank).sum();
        let mut b_shape = factors[0].b.shape.clone();
        b_shape[1] = a_shape[0];
        let out = b_shape[0];
        let mut b = Vec::with_capacity(out * a_shape[0]);
        for i in 0..out {
            for f in &b_cols {
                let r = f.shape[1];
                b.extend_from_slice(&f.data[i * r..(i + 1) * r]);
            }
        }
        Ok((
            Dense {
                shape: a_shape,
                data: a_rows,
            },
            Dense {
                shape: b_shape,
                data: b,
            },
        ))
    }

    /// A's and B's merged separately, with `sign(wᵢsᵢ)·sqrt|wᵢsᵢ|` and `sqrt|wᵢsᵢ|`.
    fn separately(&self, factors: &[Factors], rng: &mut TorchGenerator) -> Result<(Dense, Dense)> {
        let (mut wa, mut wb) = (Vec::new(), Vec::new());
        for f in factors {
            let ws = f.weight * f.scaling;
            let root = ws.abs().sqrt();
            // PEFT holds the weights in an f32 tensor.
            wa.push(f32_value(if ws >= 0.0 { root } else { -root }));
            wb.push(f32_value(root));
        }
        let a: Vec<&Dense> = factors.iter().map(|f| &f.a).collect();
        let b: Vec<&Dense> = factors.iter().map(|f| &f.b).collect();
        let merge = self.combination.task_merge();
        let a = self.merge(&a, &wa, merge, factors[0].dtype, rng)?;
        let b = self.merge(&b, &wb, merge, factors[0].dtype, rng)?;
        Ok((a, b))
    }

    /// The deltas merged, then factored by a truncated SVD: `B = U Σ`, `A = Vᴴ`.
    fn svd(&self, factors: &[Factors], rng: &mut TorchGenerator) -> Result<(Dense, Dense)> {
        if let Some(found) = self.factored_svd(factors)? {
            return Ok(found);
        }
        let deltas: Vec<Dense> = factors
            .iter()
            .map(|f| f.delta(self.module))
            .collect::<Result<_>>()?;
        let refs: Vec<&Dense> = deltas.iter().collect();
        let weights: Vec<f64> = factors.iter().map(|f| f32_value(f.weight)).collect();
        let merge = self.combination.task_merge();
        let delta = self.merge(&refs, &weights, merge, factors[0].dtype, rng)?;
        let (m, n) = (delta.shape[0], delta.shape[1]);
        let k = m.min(n);
        if self.options.svd_full_matrices && self.new_rank > k && m != n {
            return Err(PeftError::InvalidOperation(format!(
                "`{}`: rank {} is above min(out, in) = {k}; with svd_full_matrices=True PEFT's \
                 SVD factors do not fit together. Pass svd_full_matrices=False or a rank <= {k}",
                self.module, self.new_rank
            )));
        }
        let svd = Svd::new(&delta.data, m, n);
        let r = self.new_rank.min(k);
        let mut b = Vec::with_capacity(m * r);
        for i in 0..m {
            b.extend((0..r).map(|j| svd.u[i * k + j] * svd.s[j]));
        }
        let mut a = svd.vt[..r * n].to_vec();
        if let Some(q) = self.options.svd_clamp {
            clamp_at_quantile(&mut b, &mut a, q);
        }
        let mut a_shape = factors[0].a.shape.clone();
        a_shape[0] = r;
        let mut b_shape = factors[0].b.shape.clone();
        b_shape[1] = r;
        Ok((
            Dense {
                shape: a_shape,
                data: a,
            },
            Dense {
                shape: b_shape,
                data: b,
            },
        ))
    }

    /// Plain `svd` (ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ, no pruning) from the SVD of the factors: the same
    /// singular triplets and signs as the dense SVD of ΔW, in `O((out + in) R²)`. `None` where
    /// the dense path is needed: pruning types, or a rank above the number of components (the
    /// dense SVD then fills the rest with null-space vectors, which `svd_clamp`'s quantile sees).
    fn factored_svd(&self, factors: &[Factors]) -> Result<Option<(Dense, Dense)>> {
        if self.combination != Combination::Svd {
            return Ok(None);
        }
        // PEFT's weights are an f32 tensor.
        let Concat {
            b,
            a,
            out: m,
            rank: r,
            inp: n,
        } = self.concatenated(factors, |f| f32_value(f.weight) * f.scaling)?;
        if self.new_rank > r.min(m).min(n) {
            return Ok(None);
        }
        let svd = Svd::factored(&b, &a, m, r, n);
        if svd.s.len() < self.new_rank {
            return Ok(None);
        }
        let (mut a, mut b) = self.truncated(&svd, factors, m, n);
        if let Some(q) = self.options.svd_clamp {
            clamp_at_quantile(&mut b.data, &mut a.data, q);
        }
        Ok(Some((a, b)))
    }

    /// `merge_utils`' task merge of equally shaped tensors.
    fn merge(
        &self,
        tasks: &[&Dense],
        weights: &[f64],
        merge: TaskMerge,
        dtype: DType,
        rng: &mut TorchGenerator,
    ) -> Result<Dense> {
        let shape = tasks[0].shape.clone();
        if let Some(t) = tasks.iter().find(|t| t.shape != shape) {
            return Err(PeftError::shape(
                format!(
                    "`{}`: the adapters' tensors are stacked, so their shapes must be equal",
                    self.module
                ),
                &shape,
                &t.shape,
            ));
        }
        let density = self.options.density.unwrap_or(1.0);
        let pruned: Vec<Vec<f64>> = tasks
            .iter()
            .map(|t| match merge {
                TaskMerge::Sum => t.data.clone(),
                TaskMerge::MagnitudePrune | TaskMerge::Ties => prune_magnitude(&t.data, density),
                TaskMerge::DareLinear | TaskMerge::DareTies => {
                    prune_random(&t.data, density, dtype, rng)
                }
            })
            .collect();
        let data = match merge {
            TaskMerge::Ties | TaskMerge::DareTies => {
                disjoint_merge(&pruned, weights, self.options.majority_sign_method)
            }
            _ => weighted_sum(&pruned, weights),
        };
        Ok(Dense { shape, data })
    }
}

/// PEFT's `svd_clamp`: both factors clamped at the `q` quantile of their entries.
fn clamp_at_quantile(b: &mut [f64], a: &mut [f64], q: f64) {
    let mut dist: Vec<f64> = b.iter().chain(a.iter()).copied().collect();
    let hi = quantile(&mut dist, q);
    // torch.clamp(x, -hi, hi) = min(max(x, -hi), hi), also when -hi > hi.
    for v in b.iter_mut().chain(a.iter_mut()) {
        *v = v.max(-hi).min(hi);
    }
}

fn f32_value(v: f64) -> f64 {
    v as f32 as f64
}

/// Zero-pads dimension `dim` (the rank) up to `rank`.
fn pad_rank(t: &Dense, dim: usize, rank: usize) -> Dense {
    let r = t.shape[dim];
    if r >= rank {
        return t.clone();
    }
    let outer: usize = t.shape[..dim].iter().product();
    let inner: usize = t.shape[dim + 1..].iter().product();
    let mut data = Vec::with_capacity(outer * rank * inner);
    for o in 0..outer {
        data.extend_from_slice(&t.data[o * r * inner..(o + 1) * r * inner]);
        data.extend(std::iter::repeat_n(0.0, (rank - r) * inner));
    }
    let mut shape = t.shape.clone();
    shape[dim] = rank;
    Dense { shape, data }
}

fn weighted_sum(tasks: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; tasks[0].len()];
    for (t, w) in tasks.iter().zip(weights) {
        for (o, v) in out.iter_mut().zip(t) {
            *o += w * v;
        }
    }
    out
}

/// `magnitude_based_pruning`: keeps the `int(density · numel)` largest entries by magnitude
/// (`density >= 1` keeps everything, as PEFT's `prune`).
fn prune_magnitude(t: &[f64], density: f64) -> Vec<f64> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()));
    let mut out = vec![0.0; t.len()];
    for &i in &order[..k] {
        out[i] = t[i];
    }
    out
}

/// `random_pruning(rescale=True)`: `t · bernoulli(density) / density`.
fn prune_random(t: &[f64], density: f64, dtype: DType, rng: &mut TorchGenerator) -> Vec<f64> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let keep_scale = 1.0 / f32_value(density);
    t.iter()
        .map(|v| {
            if rng.bernoulli(density, dtype) {
                v * keep_scale
            } else {
                0.0
            }
        })
        .collect()
}

/// TIES: entries whose sign is the majority sign (of the unweighted pruned tensors), weighted
/// and averaged over the tensors that kept them.
fn disjoint_merge(tasks: &[Vec<f64>], weights: &[f64], method: MajoritySign) -> Vec<f64> {
    let n = tasks[0].len();
    (0..n)
        .map(|e| {
            let magnitude: f64 = tasks
                .iter()
                .map(|t| match method {
                    MajoritySign::Total => t[e],
                    MajoritySign::Frequency => sign(t[e]),
                })
                .sum();
            let majority = if magnitude >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut count) = (0.0, 0.0);
            for (t, w) in tasks.iter().zip(weights) {
                if sign(t[e]) == majority {
                    sum += w * t[e];
                    count += 1.0;
                }
            }
            sum / f64::max(count, 1.0)
        })
        .collect()
}

/// `torch.sign`: 0 for 0.
fn sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// `torch.quantile(x, q)` (linear interpolation between the two nearest order statistics).
fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let pos = q * (values.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(values.len() - 1);
    let frac = pos - lo as f64;
    values[lo] + frac * (values[hi] - values[lo])
}

/// A reduced singular value decomposition `M = U diag(s) Vᵀ` of an `m × n` matrix (row-major),
/// `k = min(m, n)` components sorted by decreasing singular value, each signed so that the
/// largest entry of its left vector is positive.
#[derive(Debug, Clone)]
pub struct Svd {
    /// `m × k`, row-major.
    pub u: Vec<f64>,
    pub s: Vec<f64>,
    /// `k × n`, row-major.
    pub vt: Vec<f64>,
}

impl Svd {
    /// One-sided Jacobi (Hestenes) on the columns of `M` (or of `Mᵀ` when `m < n`), in f64:
    /// accurate to rounding for every singular value; `O(k² · max(m, n))` per sweep.
    pub fn new(data: &[f64], m: usize, n: usize) -> Self {
        if m < n {
            let t = transpose(data, m, n);
            let Svd { u, s, vt } = Self::new(&t, n, m);
            // Mᵀ = U S Vᵀ  ⇒  M = V S Uᵀ.
            let mut out = Self {
                u: transpose(&vt, m, m),
                s,
                vt: transpose(&u, n, m),
            };
            out.fix_signs(m, n);
            return out;
        }
        // Columns of M (m ≥ n), rotated until orthogonal; V accumulates the rotations.
        let mut cols: Vec<Vec<f64>> = (0..n)
            .map(|j| (0..m).map(|i| data[i * n + j]).collect())
            .collect();
        let mut v: Vec<Vec<f64>> = (0..n)
            .map(|j| (0..n).map(|i| f64::from(u8::from(i == j))).collect())
            .collect();
        for _sweep in 0..80 {
            let mut rotated = false;
            for p in 0..n {
                for q in p + 1..n {
                    rotated |= rotate(&mut cols, &mut v, p, q);
                }
            }
            if !rotated {
                break;
            }
        }
        let norms: Vec<f64> = cols.iter().map(|c| dot(c, c).sqrt()).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&i, &j| norms[j].total_cmp(&norms[i]));
        let mut u = vec![0.0; m * n];
        let mut vt = vec![0.0; n * n];
        let mut s = Vec::with_capacity(n);
        for (jj, &j) in order.iter().enumerate() {
            let sigma = norms[j];
            s.push(sigma);
            if sigma > 0.0 {
                for i in 0..m {
                    u[i * n + jj] = cols[j][i] / sigma;
                }
            }
            vt[jj * n..(jj + 1) * n].copy_from_slice(&v[j]);
        }
        let mut out = Self { u, s, vt };
        out.fix_signs(m, n);
        out
    }

    /// The exact SVD of `B A` from `B` (`m × r`) and `A` (`r × n`), row-major, without forming
    /// the product: thin Householder QRs `B = Q_B R_B`, `Aᵀ = Q_A R_A`, the Jacobi SVD of the
    /// small core `R_B R_Aᵀ = U_c Σ V_cᵀ`, and `U = Q_B U_c`, `Vᵀ = V_cᵀ Q_Aᵀ`;
    /// `O((m + n) r²)`. It has `min(m, n, r)` components, signed as [`Svd::new`]'s.
    pub fn factored(b: &[f64], a: &[f64], m: usize, r: usize, n: usize) -> Self {
        let (qb, rb, pb) = thin_qr(b, m, r);
        let (qa, ra, pa) = thin_qr(&transpose(a, r, n), n, r);
        // core = R_B R_Aᵀ (pb × pa).
        let mut core = vec![0.0; pb * pa];
        for i in 0..pb {
            for j in 0..pa {
                core[i * pa + j] = dot(&rb[i * r..(i + 1) * r], &ra[j * r..(j + 1) * r]);
            }
        }
        let c = Self::new(&core, pb, pa);
        let k = c.s.len();
        let mut u = vec![0.0; m * k];
        for i in 0..m {
            for l in 0..pb {
                let q = qb[i * pb + l];
                if q != 0.0 {
                    for (o, x) in u[i * k..(i + 1) * k]
                        .iter_mut()
                        .zip(&c.u[l * k..(l + 1) * k])
                    {
                        *o += q * x;
                    }
                }
            }
        }
        let mut vt = vec![0.0; k * n];
        for j in 0..k {
            let row = &mut vt[j * n..(j + 1) * n];
            for l in 0..pa {
                let v = c.vt[j * pa + l];
                for (o, i) in row.iter_mut().zip(0..n) {
                    *o += v * qa[i * pa + l];
                }
            }
        }
        let mut out = Self { u, s: c.s, vt };
        out.fix_signs(m, n);
        out
    }

    /// `‖M − U_k Σ_k V_kᵀ‖_F / ‖M‖_F = sqrt(Σ_{i≥k} σᵢ²) / sqrt(Σ σᵢ²)`; 0 for `M = 0`.
    pub fn truncation_error(&self, k: usize) -> f64 {
        let total: f64 = self.s.iter().map(|s| s * s).sum();
        let tail: f64 = self.s.iter().skip(k).map(|s| s * s).sum();
        if total > 0.0 {
            (tail / total).sqrt()
        } else {
            0.0
        }
    }

    /// Signs each pair so the largest-magnitude entry of its left vector (first among equals)
    /// is positive.
    fn fix_signs(&mut self, m: usize, n: usize) {
        let k = self.s.len();
        for j in 0..k {
            let mut best = 0;
            for i in 0..m {
                if self.u[i * k + j].abs() > self.u[best * k + j].abs() {
                    best = i;
                }
            }
            if self.u[best * k + j] < 0.0 {
                for i in 0..m {
                    self.u[i * k + j] = -self.u[i * k + j];
                }
                for v in &mut self.vt[j * n..(j + 1) * n] {
                    *v = -*v;
                }
            }
        }
    }
}

/// Thin Householder QR of an `m × n` row-major matrix: `Q` (`m × p`, orthonormal columns,
/// row-major), `R` (`p × n`, upper trapezoidal, row-major) and `p = min(m, n)`.
fn thin_qr(data: &[f64], m: usize, n: usize) -> (Vec<f64>, Vec<f64>, usize) {
    let p = m.min(n);
    let mut cols: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..m).map(|i| data[i * n + j]).collect())
        .collect();
    let mut reflectors: Vec<(Vec<f64>, f64)> = Vec::with_capacity(p);
    for j in 0..p {
        let x = &cols[j][j..];
        let norm = dot(x, x).sqrt();
        let mut v = x.to_vec();
        let mut beta = 0.0;
        if norm > 0.0 {
            v[0] += if x[0] >= 0.0 { norm } else { -norm };
            let vv = dot(&v, &v);
            if vv > 0.0 {
                beta = 2.0 / vv;
            }
        }
        if beta != 0.0 {
            for col in &mut cols[j..] {
                let seg = &mut col[j..];
                let t = beta * dot(&v, seg);
                for (c, vi) in seg.iter_mut().zip(&v) {
                    *c -= t * vi;
                }
            }
        }
        reflectors.push((v, beta));
    }
    let mut r = vec![0.0; p * n];
    for i in 0..p {
        for j in i..n {
            r[i * n + j] = cols[j][i];
        }
    }
    // Q = H₀ H₁ … H_{p−1} [I_p; 0], applied from the last reflector.
    let mut q: Vec<Vec<f64>> = (0..p)
        .map(|j| (0..m).map(|i| f64::from(u8::from(i == j))).collect())
        .collect();
    for (j, (v, beta)) in reflectors.iter().enumerate().rev() {
        if *beta == 0.0 {
            continue;
        }
        for col in &mut q {
            let seg = &mut col[j..];
            let t = beta * dot(v, seg);
            for (c, vi) in seg.iter_mut().zip(v) {
                *c -= t * vi;
            }
        }
    }
    let mut q_rows = vec![0.0; m * p];
    for (j, col) in q.iter().enumerate() {
        for (i, v) in col.iter().enumerate() {
            q_rows[i * p + j] = *v;
        }
    }
    (q_rows, r, p)
}

/// One Jacobi rotation making columns `p` and `q` orthogonal; false when they already are.
fn rotate(cols: &mut [Vec<f64>], v: &mut [Vec<f64>], p: usize, q: usize) -> bool {
    let alpha = dot(&cols[p], &cols[p]);
    let beta = dot(&cols[q], &cols[q]);
    let gamma = dot(&cols[p], &cols[q]);
    if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
        return false;
    }
    let zeta = (beta - alpha) / (2.0 * gamma);
    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
    let c = 1.0 / (1.0 + t * t).sqrt();
    let s = c * t;
    for vecs in [cols, v] {
        let (left, right) = vecs.split_at_mut(q);
        for (x, y) in left[p].iter_mut().zip(right[0].iter_mut()) {
            let (xp, yq) = (*x, *y);
            *x = c * xp - s * yq;
            *y = s * xp + c * yq;
        }
    }
    true
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn transpose(data: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = data[i * cols + j];
        }
    }
    out
}

/// `torch.bernoulli` on PyTorch's CPU generator: one 32-bit draw per element (24 bits used) for
/// f32/f16/bf16 probabilities, two (53 bits) for f64.
trait Bernoulli {
    fn bernoulli(&mut self, p: f64, dtype: DType) -> bool;
}

impl Bernoulli for TorchGenerator {
    /// `uniform(0, 1) < p`, as `at::bernoulli_distribution` computes it.
    fn bernoulli(&mut self, p: f64, dtype: DType) -> bool {
        if dtype == DType::F64 {
            let hi = u64::from(self.next_u32());
            let lo = u64::from(self.next_u32());
            let x = ((hi << 32) | lo) & ((1 << 53) - 1);
            (x as f64) * 2f64.powi(-53) < p
        } else {
            let x = self.next_u32() & ((1 << 24) - 1);
            (x as f32) * 2f32.powi(-24) < p as f32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for l in 0..k {
                for j in 0..n {
                    out[i * n + j] += a[i * k + l] * b[l * n + j];
                }
            }
        }
        out
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<f64> {
        let mut g = TorchGenerator::new(seed);
        (0..len)
            .map(|_| f64::from(g.next_u32()) / f64::from(u32::MAX) - 0.5)
            .collect()
    }

    #[test]
    fn svd_reconstructs_and_is_orthonormal() {
        for (m, n) in [(7, 4), (4, 7), (5, 5), (1, 3), (6, 1)] {
            let data = pseudo_random(m * n, (m * 10 + n) as u64);
            let svd = Svd::new(&data, m, n);
            let k = m.min(n);
            let us: Vec<f64> = (0..m * k).map(|e| svd.u[e] * svd.s[e % k]).collect();
            let back = matmul(&us, &svd.vt, m, k, n);
            for (x, y) in back.iter().zip(&data) {
                assert!((x - y).abs() < 1e-12, "{m}x{n}: {x} vs {y}");
            }
            let utu = matmul(&transpose(&svd.u, m, k), &svd.u, k, m, k);
            let vvt = matmul(&svd.vt, &transpose(&svd.vt, k, n), k, n, k);
            for i in 0..k {
                for j in 0..k {
                    let eye = f64::from(u8::from(i == j));
                    assert!((utu[i * k + j] - eye).abs() < 1e-12);
                    assert!((vvt[i * k + j] - eye).abs() < 1e-12);
                }
            }
            assert!(svd.s.windows(2).all(|w| w[0] >= w[1]));
        }
    }

    #[test]
    fn svd_of_known_matrix() {
        // diag(3, 2) rotated: singular values 3 and 2 whatever the rotation.
        let (c, s) = (0.6, 0.8);
        let data = [3.0 * c, -2.0 * s, 3.0 * s, 2.0 * c];
        let svd = Svd::new(&data, 2, 2);
        assert!((svd.s[0] - 3.0).abs() < 1e-14 && (svd.s[1] - 2.0).abs() < 1e-14);
    }

    #[test]
    fn svd_of_rank_deficient_matrix() {
        let b = pseudo_random(6 * 2, 1);
        let a = pseudo_random(2 * 5, 2);
        let data = matmul(&b, &a, 6, 2, 5);
        let svd = Svd::new(&data, 6, 5);
        assert!(svd.s[2] < 1e-12 && svd.s[1] > 1e-3);
    }

    #[test]
    fn factored_svd_equals_dense_svd() {
        // (m, r, n): tall, wide, r above m or n (rank-deficient core), square.
        for (m, r, n) in [(9, 3, 6), (5, 4, 11), (3, 5, 7), (8, 6, 4), (6, 2, 6)] {
            let b = pseudo_random(m * r, (m * 100 + r * 10 + n) as u64);
            let a = pseudo_random(r * n, (n * 100 + r) as u64);
            let dense = Svd::new(&matmul(&b, &a, m, r, n), m, n);
            let fact = Svd::factored(&b, &a, m, r, n);
            let (kd, kf) = (dense.s.len(), fact.s.len());
            assert_eq!(kf, m.min(n).min(r), "{m}x{r}x{n}");
            for j in 0..kf {
                assert!((fact.s[j] - dense.s[j]).abs() < 1e-12, "{m}x{r}x{n}: σ{j}");
                // Nonzero singular values are distinct here: the pairs, signs included, agree.
                for i in 0..m {
                    let (x, y) = (fact.u[i * kf + j], dense.u[i * kd + j]);
                    assert!((x - y).abs() < 1e-9, "{m}x{r}x{n}: u[{i},{j}] {x} vs {y}");
                }
                for i in 0..n {
                    let (x, y) = (fact.vt[j * n + i], dense.vt[j * n + i]);
                    assert!((x - y).abs() < 1e-9, "{m}x{r}x{n}: vt[{j},{i}] {x} vs {y}");
                }
            }
            assert!(dense.s[kf..].iter().all(|s| *s < 1e-12));
            for k in 0..=kf {
                let (ef, ed) = (fact.truncation_error(k), dense.truncation_error(k));
                assert!((ef - ed).abs() < 1e-12, "{m}x{r}x{n}: error at {k}");
            }
            assert_eq!(fact.truncation_error(kf), 0.0);
        }
    }

    #[test]
    fn thin_qr_is_orthonormal_and_reconstructs() {
        for (m, n) in [(7, 3), (3, 7), (4, 4)] {
            let data = pseudo_random(m * n, (m + 7 * n) as u64);
            let (q, r, p) = thin_qr(&data, m, n);
            let back = matmul(&q, &r, m, p, n);
            for (x, y) in back.iter().zip(&data) {
                assert!((x - y).abs() < 1e-13);
            }
            let qtq = matmul(&transpose(&q, m, p), &q, p, m, p);
            for i in 0..p {
                for j in 0..p {
                    let eye = f64::from(u8::from(i == j));
                    assert!((qtq[i * p + j] - eye).abs() < 1e-13);
                    if j < i && j < n {
                        assert_eq!(r[i * n + j], 0.0);
                    }
                }
            }
        }
    }

    #[test]
    fn quantile_interpolates_like_torch() {
        // torch.quantile(torch.tensor([1., 2., 4., 8.]), 0.5) == 3.0; q=0.9 → 6.8.
        assert_eq!(quantile(&mut [8.0, 1.0, 4.0, 2.0], 0.5), 3.0);
        assert!((quantile(&mut [8.0, 1.0, 4.0, 2.0], 0.9) - 6.8).abs() < 1e-12);
    }

    #[test]
    fn torch_generator_matches_torch_bernoulli() {
        // torch.manual_seed(5); torch.bernoulli(torch.full((12,), 0.3)).int().tolist()
        let mut g = TorchGenerator::new(5);
        let drawn: Vec<u8> = (0..12)
            .map(|_| u8::from(g.bernoulli(0.3, DType::F32)))
            .collect();
        assert_eq!(drawn, TORCH_BERNOULLI_SEED5);
    }

    const TORCH_BERNOULLI_SEED5: [u8; 12] = [0, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0];

    #[test]
    fn magnitude_pruning_keeps_top_k() {
        assert_eq!(
            prune_magnitude(&[0.1, -3.0, 2.0, 0.5], 0.5),
            vec![0.0, -3.0, 2.0, 0.0]
        );
        assert_eq!(prune_magnitude(&[1.0, 2.0], 1.0), vec![1.0, 2.0]);
    }

    #[test]
    fn ties_disjoint_merge_follows_majority_sign() {
        // Entry 0: signs (+, -, +), total 1+(-5)+1 = -3 → only the negative one survives.
        let tasks = vec![vec![1.0, 2.0], vec![-5.0, 0.0], vec![1.0, 4.0]];
        let out = disjoint_merge(&tasks, &[1.0, 1.0, 1.0], MajoritySign::Total);
        assert_eq!(out, vec![-5.0, 3.0]);
        let out = disjoint_merge(&tasks, &[1.0, 1.0, 1.0], MajoritySign::Frequency);
        assert_eq!(out, vec![1.0, 3.0]);
    }

    #[test]
    fn names_round_trip() {
        for (name, c) in COMBINATIONS {
            assert_eq!(Combination::from_name(name).ok(), Some(*c));
            assert_eq!(c.name(), *name);
        }
        assert!(Combination::from_name("average").is_err());
    }
}
