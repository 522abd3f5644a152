//! BOFT (PEFT `tuners/boft`): orthogonal fine-tuning with a butterfly-factorised rotation of the
//! layer's input features, `y = (base(x · R) − b) · s + b`.
//!
//! `R = M_N ⋯ M_1 M_0` with `M_i = P_i · blockdiag(Cayley(blocks of factor i)) · P_iᵀ`, the
//! `P_i` PEFT's block-butterfly permutations, and `s` a learned per-output scaling.
//!
//! PEFT quirks reproduced:
//! - Without its CUDA extension (any CPU machine) PEFT silently builds every layer with one
//!   butterfly factor, whatever `boft_n_butterfly_factor` says, so a file's `boft_R` may have
//!   first dimension 1 while its config asks for more. A file is read with the factor its
//!   `boft_R` holds (the config's, or 1); a new adapter uses the config's factor, as PEFT does
//!   with its extension.
//! - Conv2d uses the merged formulation in its forward (the base conv with the rotated, scaled
//!   weight). PEFT drops the dilation there, which disagrees with its own merge, so a dilated
//!   Conv2d is refused; grouped Conv2d is refused as PEFT refuses it.
//! - `fan_in_fan_out` has no effect: PEFT forces it to false on `nn.Linear` (and saves that) and
//!   ignores it on Conv2d.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::base::{BaseLayer, ModuleKind, linear_rows};
use crate::config::{CommonFields, ModuleSelector, OneOrMany, check_extra_fields, parse_config};
use crate::error::{PeftError, Result};
use crate::init::Initializer;
use crate::kernels::linear::Extras;
use crate::linalg::{BlockFactors, cayley};
use crate::matching::Selection;
use crate::merge::{adapter_dtype, apply_rule};
use crate::method::{
    BiasMode, InferredBase, LayerAdapter, MergeRule, MethodConfig, MethodEntry, ParamSource, Side,
    dims_with_rank,
};
use crate::module::Below;
use crate::params::{Params, take_params};
use crate::rng::DropoutRng;

pub const PEFT_TYPE: &str = "BOFT";

pub const ENTRY: MethodEntry = MethodEntry {
    peft_type: PEFT_TYPE,
    config_class: "BOFTConfig",
    from_json: |v| Ok(Arc::new(BoftConfig::from_json(v)?)),
};

/// The blocks of every butterfly factor, `(factors, block_num, block_size, block_size)`.
pub const BOFT_R: &str = "boft_R";
/// The output scaling: `(out, 1)` for Linear, `(1, out)` for Conv2d.
pub const BOFT_S: &str = "boft_s";

pub const PARAM_NAMES: &[&str] = &[BOFT_R, BOFT_S];

/// BOFT's `bias`: which base-model biases are trained and saved with the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoftBias {
    #[default]
    None,
    All,
    BoftOnly,
}

impl From<BoftBias> for BiasMode {
    fn from(b: BoftBias) -> Self {
        match b {
            BoftBias::None => BiasMode::None,
            BoftBias::All => BiasMode::All,
            BoftBias::BoftOnly => BiasMode::AdaptedOnly,
        }
    }
}

/// PEFT's `BOFTConfig`, with PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BoftConfig {
    #[serde(flatten)]
    pub common: CommonFields,
    pub boft_block_size: usize,
    pub boft_block_num: usize,
    pub boft_n_butterfly_factor: usize,
    pub target_modules: Option<ModuleSelector>,
    pub exclude_modules: Option<ModuleSelector>,
    pub boft_dropout: f64,
    pub fan_in_fan_out: bool,
    pub bias: BoftBias,
    pub modules_to_save: Option<Vec<String>>,
    pub init_weights: bool,
    pub layers_to_transform: Option<OneOrMany<i64>>,
    pub layers_pattern: Option<OneOrMany<String>>,
    /// Fields a newer PEFT may write; they must be "off" (see [`check_extra_fields`]).
    #[serde(flatten, skip_serializing)]
    pub unsupported: Map<String, Value>,
}

impl Default for BoftConfig {
    fn default() -> Self {
        Self {
            common: CommonFields::default(),
            boft_block_size: 4,
            boft_block_num: 0,
            boft_n_butterfly_factor: 1,
            target_modules: None,
            exclude_modules: None,
            boft_dropout: 0.0,
            fan_in_fan_out: false,
            bias: BoftBias::None,
            modules_to_save: None,
            init_weights: true,
            layers_to_transform: None,
            layers_pattern: None,
            unsupported: Map::new(),
        }
    }
}

impl BoftConfig {
    /// Reads a config from PEFT's JSON form (`adapter_config.json` or `BOFTConfig.to_dict()`).
    pub fn from_json(value: Value) -> Result<Self> {
        parse_config(value, PEFT_TYPE)
    }

    pub fn selection(&self) -> Selection<'_> {
        Selection {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: self.exclude_modules.as_ref(),
            modules_to_save: self.modules_to_save.as_deref(),
            layers_to_transform: self.layers_to_transform.as_ref(),
            layers_pattern: self.layers_pattern.as_ref(),
        }
    }

    /// Checks every field with PEFT's rules and messages (`BOFTConfig.__post_init__`, and the
    /// factor check of `update_layer`, which does not depend on the layer).
    pub fn validate(&self) -> Result<()> {
        self.common.validate()?;
        check_extra_fields(&self.unsupported, &[])?;
        let (size, num) = (self.boft_block_size, self.boft_block_num);
        if size == 0 && num == 0 {
            return Err(PeftError::config(
                "boft_block_size",
                format!(
                    "Either `boft_block_size` or `boft_block_num` must be non-zero. Currently, \
                     boft_block_size = {size} and boft_block_num = {num}."
                ),
            ));
        }
        if size != 0 && num != 0 {
            return Err(PeftError::config(
                "boft_block_size",
                format!(
                    "You can only specify either boft_block_size ({size}) or boft_block_num \
                     ({num}), but not both simultaneously, because boft_block_size x \
                     boft_block_num == in_features."
                ),
            ));
        }
        if self.boft_n_butterfly_factor == 0 {
            return Err(PeftError::config(
                "boft_n_butterfly_factor",
                "You can only specify boft_n_butterfly_factor 0 to be a positive integer number.",
            ));
        }
        // PEFT replaces int(p · block_num) blocks by the identity; p = 1 replaces them all and
        // p > 1 fails inside PEFT's dropout.
        if !(0.0..=1.0).contains(&self.boft_dropout) {
            return Err(PeftError::config(
                "boft_dropout",
                format!("must be in [0, 1], found {}", self.boft_dropout),
            ));
        }
        self.selection().validate()
    }
}

impl MethodConfig for BoftConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn validate(&self) -> Result<()> {
        BoftConfig::validate(self)
    }

    fn fields(&self) -> Value {
        serde_json::to_value(self).expect("BoftConfig serialises")
    }

    fn selection(&self) -> Selection<'_> {
        BoftConfig::selection(self)
    }

    fn bias_mode(&self) -> BiasMode {
        self.bias.into()
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
        Ok(Box::new(BoftAdapter::new(
            module,
            base,
            self.clone(),
            source,
        )?))
    }

    /// PEFT refuses layers other than Linear and Conv2d, and sets `fan_in_fan_out` to false
    /// when it wraps an `nn.Linear` (the saved config says so).
    fn for_targets(&self, kinds: &[ModuleKind]) -> Result<Option<Arc<dyn MethodConfig>>> {
        if let Some(kind) = kinds.iter().find(|k| !supported(**k)) {
            return Err(unsupported_kind(*kind));
        }
        let mut config = self.clone();
        if kinds.contains(&ModuleKind::Linear) {
            config.fan_in_fan_out = false;
        }
        Ok(Some(Arc::new(config)))
    }

    /// The rotated width `block_num · block_size` from `boft_R`, the outputs from `boft_s`,
    /// whose orientation tells a Conv2d (`(1, out)`) from a Linear (`(out, 1)`). A Conv2d's
    /// rotated `in · k · k` cannot be split: it is told as a 1×1 kernel.
    fn infer_base(
        &self,
        module: &str,
        tensors: &[(String, Tensor)],
        _shared: &BTreeMap<String, Tensor>,
    ) -> Result<Option<InferredBase>> {
        let r = dims_with_rank(module, tensors, BOFT_R, &[4])?;
        let s = dims_with_rank(module, tensors, BOFT_S, &[2])?;
        let dim = r[1] * r[2];
        Ok(Some(match s {
            [1, out] if *out != 1 => InferredBase::conv2d(*out, dim, 1, 1),
            _ => InferredBase::linear(s[0], dim, false),
        }))
    }
}

fn supported(kind: ModuleKind) -> bool {
    matches!(kind, ModuleKind::Linear | ModuleKind::Conv2d(_))
}

fn unsupported_kind(kind: ModuleKind) -> PeftError {
    let name = match kind {
        ModuleKind::Conv1D => "transformers Conv1D",
        ModuleKind::Embedding => "nn.Embedding",
        ModuleKind::Linear => "nn.Linear",
        ModuleKind::Conv2d(_) => "nn.Conv2d",
    };
    PeftError::InvalidOperation(format!(
        "BOFT does not support {name} layers; PEFT's BOFT supports nn.Linear and nn.Conv2d only"
    ))
}

/// PEFT's `block_butterfly_perm(n, b, r, n_butterfly_factor)`: the permutation of `n` features
/// that groups them into `b` blocks of a butterfly factor, `r` being half the base block size.
/// Within each run of `n / b` features, chunks of `r` are reordered evens first, then odds.
/// `P = perm2mat(perm)` has `P[j, perm[j]] = 1`, so `P · A · Pᵀ` is `A[perm][:, perm]`.
pub fn block_butterfly_perm(
    n: usize,
    b: usize,
    r: usize,
    n_butterfly_factor: usize,
) -> Result<Vec<usize>> {
    if n_butterfly_factor == 0 {
        return Ok((0..n).collect());
    }
    if b == 0 || r == 0 || b * r * 2 > n || !n.is_multiple_of(b) || !(n / b).is_multiple_of(r) {
        return Err(PeftError::InvalidOperation(format!(
            "Invalid number of blocks! (butterfly permutation of {n} features into {b} blocks \
             of chunks of {r})"
        )));
    }
    let run = n / b;
    let step = run / r;
    let order: Vec<usize> = (0..step)
        .step_by(2)
        .chain((1..step).step_by(2))
        .flat_map(|pos| pos * r..pos * r + r)
        .collect();
    Ok((0..n)
        .step_by(run)
        .flat_map(|start| order.iter().map(move |o| start + o))
        .collect())
}

/// The shape of one layer's butterfly: `factors` factors, each `block_num` blocks of
/// `block_size` over `dim` input features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Butterfly {
    pub dim: usize,
    pub block_size: usize,
    pub block_num: usize,
    pub factors: usize,
}

impl Butterfly {
    /// PEFT's `update_layer` resolution and checks (messages as PEFT's, prefixed by the module):
    /// `dim` is the layer's input width, `in·k·k` for Conv2d.
    pub fn resolve(
        config: &BoftConfig,
        module: &str,
        base: &BaseLayer,
        factors: usize,
    ) -> Result<Self> {
        let (dim, what, what_lower) = match base.kind() {
            ModuleKind::Linear => (base.in_features(), "in_features", "in_features"),
            ModuleKind::Conv2d(p) => {
                if p.groups > 1 {
                    return Err(PeftError::InvalidOperation(format!(
                        "`{module}`: BOFT does not support Conv2d layers with groups > 1 (got \
                         groups={}), as in PEFT",
                        p.groups
                    )));
                }
                if p.dilation != 1 {
                    return Err(PeftError::InvalidOperation(format!(
                        "`{module}`: BOFT on a dilated Conv2d (dilation={}) is not supported: \
                         PEFT's forward drops the dilation and disagrees with its merge",
                        p.dilation
                    )));
                }
                let (kh, kw) = base.kernel_size();
                if kh != kw {
                    return Err(PeftError::InvalidOperation(format!(
                        "`{module}`: BOFT needs a square Conv2d kernel (PEFT sizes the rotation \
                         as in_channels·k[0]·k[0]), found {kh}x{kw}"
                    )));
                }
                (
                    base.in_features() * kh * kh,
                    "Convolutional kernel dimension",
                    "convolutional kernel dimension",
                )
            }
            kind => return Err(unsupported_kind(kind)),
        };
        let n = factors - 1; // PEFT's (paper's) butterfly factor
        let fail =
            |field: &str, msg: String| PeftError::config(field, format!("`{module}`: {msg}"));
        let (mut size, mut num) = (config.boft_block_size, config.boft_block_num);
        if size == 0 {
            if !dim.is_multiple_of(num) {
                return Err(fail(
                    "boft_block_num",
                    format!("{what} ({dim}) must be divisible by boft_block_num ({num})!"),
                ));
            }
            if n != 0 {
                if n > num.ilog2() as usize {
                    return Err(fail(
                        "boft_n_butterfly_factor",
                        format!(
                            "Invalid combination of boft_n_butterfly_factor ({factors}) and \
                             boft_block_num ({num})!"
                        ),
                    ));
                }
                if !num.is_multiple_of(1 << n) {
                    return Err(fail(
                        "boft_block_num",
                        format!(
                            "boft_block_num ({num}) must be a multiple of 2 raised to the power \
                             of boft_n_butterfly_factor ({factors})!"
                        ),
                    ));
                }
            }
            size = dim / num;
        } else {
            if !dim.is_multiple_of(size) {
                return Err(fail(
                    "boft_block_size",
                    format!("{what} ({dim}) must be divisible by boft_block_size ({size})!"),
                ));
            }
            if n != 0 {
                let span = u32::try_from(n)
                    .ok()
                    .and_then(|n| 1usize.checked_shl(n))
                    .and_then(|p| p.checked_mul(size));
                if span.is_none_or(|span| dim < span || !dim.is_multiple_of(span)) {
                    return Err(fail(
                        "boft_n_butterfly_factor",
                        format!(
                            "Invalid combination of {what_lower} ({dim}), \
                             boft_n_butterfly_factor ({factors}) and boft_block_size ({size})!"
                        ),
                    ));
                }
            }
            num = dim / size;
        }
        if n != 0 {
            if !num.is_multiple_of(2) {
                return Err(fail(
                    "boft_block_num",
                    format!("boft_block_num ({num}) must be an even number!"),
                ));
            }
            if !size.is_multiple_of(2) {
                return Err(fail(
                    "boft_block_size",
                    format!("boft_block_size ({size}) must be an even number!"),
                ));
            }
        }
        Ok(Self {
            dim,
            block_size: size,
            block_num: num,
            factors,
        })
    }

    /// PEFT's permutation of each factor: `block_butterfly_perm(D, block_num / 2^i,
    /// block_size / 2, N)`.
    pub fn permutations(&self) -> Result<Vec<Vec<usize>>> {
        (0..self.factors)
            .map(|i| {
                block_butterfly_perm(
                    self.dim,
                    self.block_num >> i,
                    self.block_size / 2,
                    self.factors - 1,
                )
            })
            .collect()
    }

    fn r_shape(&self) -> Vec<usize> {
        vec![
            self.factors,
            self.block_num,
            self.block_size,
            self.block_size,
        ]
    }
}

/// `boft_s`'s shape: `(out, 1)` for Linear, `(1, out)` for Conv2d.
fn s_shape(base: &BaseLayer) -> Vec<usize> {
    match base.kind() {
        ModuleKind::Conv2d(_) => vec![1, base.out_features()],
        _ => vec![base.out_features(), 1],
    }
}

/// The number of butterfly factors a layer gets: the config's for a new adapter; for given
/// tensors, what `boft_R` holds when PEFT could have written it (the config's factor with its
/// CUDA extension, 1 without).
fn factors_of(
    config: &BoftConfig,
    module: &str,
    base: &BaseLayer,
    source: &ParamSource,
) -> Result<usize> {
    let wanted = config.boft_n_butterfly_factor;
    let ParamSource::Given(tensors) = source else {
        return Ok(wanted);
    };
    let Some((_, r)) = tensors.iter().find(|(n, _)| n == BOFT_R) else {
        return Ok(wanted); // take_params reports the missing tensor
    };
    match r.dims().first() {
        Some(&f) if f == wanted || f == 1 => Ok(f),
        _ => {
            let expected = Butterfly::resolve(config, module, base, wanted)?.r_shape();
            Err(PeftError::shape(
                format!(
                    "{} (BOFT with boft_n_butterfly_factor={wanted}; PEFT without its CUDA \
                     extension writes a first dimension of 1)",
                    crate::params::file_key(module, BOFT_R)
                ),
                &expected,
                r.dims(),
            ))
        }
    }
}

/// A BOFT adapter on one Linear or Conv2d module.
#[derive(Debug)]
pub struct BoftAdapter {
    config: Arc<BoftConfig>,
    params: Params,
    kind: ModuleKind,
    butterfly: Butterfly,
    /// Per factor, the permutation as indices on the adapter's device; `None` for the identity.
    perms: Vec<Option<Tensor>>,
}

impl BoftAdapter {
    pub fn new(
        module: &str,
        base: &BaseLayer,
        config: BoftConfig,
        source: ParamSource,
    ) -> Result<Self> {
        if !supported(base.kind()) {
            return Err(unsupported_kind(base.kind()));
        }
        let factors = factors_of(&config, module, base, &source)?;
        let butterfly = Butterfly::resolve(&config, module, base, factors)?;
        let expected = [(BOFT_R, butterfly.r_shape()), (BOFT_S, s_shape(base))];
        let dtype = adapter_dtype(base.dtype());
        let given = match source {
            ParamSource::Given(tensors) => tensors,
            ParamSource::Init { seed } => init_params(&config, &expected, seed, dtype)?,
        };
        let what = format!(
            "BOFT {:?} ({} factor(s) of {} blocks of {})",
            base.kind(),
            butterfly.factors,
            butterfly.block_num,
            butterfly.block_size
        );
        let params = take_params(module, &what, given, &expected, dtype, base.device())?;
        let perms = permutation_indices(&butterfly, base.device())?;
        Ok(Self {
            config: Arc::new(config),
            params,
            kind: base.kind(),
            butterfly,
            perms,
        })
    }

    pub fn butterfly(&self) -> Butterfly {
        self.butterfly
    }

    /// The rotation `R = M_N ⋯ M_0` `(D, D)` in the adapter dtype (PEFT's
    /// `get_delta_weight`); with a training stream `dropout`, PEFT's multiplicative dropout
    /// first replaces blocks of one random factor by the identity.
    pub fn rotation(&self, dropout: Option<&DropoutRng>) -> Result<Tensor> {
        self.factors(&self.factor_blocks(dropout)?)?.to_dense()
    }

    /// The orthogonal blocks of each factor `(factors, block_num, size, size)`, after the
    /// multiplicative dropout of a training stream.
    fn factor_blocks(&self, dropout: Option<&DropoutRng>) -> Result<Tensor> {
        let r = self.params.get(BOFT_R)?;
        let (factors, num, size, _) = r.dims4()?;
        let flat = r.reshape((factors * num, size, size))?;
        let skew = flat.sub(&flat.t()?)?.affine(0.5, 0.0)?;
        let blocks = cayley(&skew)?.reshape((factors, num, size, size))?;
        match dropout.filter(|_| self.config.boft_dropout > 0.0) {
            Some(rng) => self.drop_blocks(&blocks, rng),
            None => Ok(blocks),
        }
    }

    /// `R` kept as its factors, from their blocks ([`Self::factor_blocks`]).
    fn factors(&self, blocks: &Tensor) -> Result<BlockFactors> {
        let factors = (self.perms.iter().enumerate())
            .map(|(i, perm)| Ok((blocks.get(i)?, perm.clone())))
            .collect::<Result<_>>()?;
        BlockFactors::new(factors, self.butterfly.dim)
    }

    /// PEFT's `MultiplicativeDropoutLayer`: in one random factor, `int(p · block_num)` random
    /// blocks become the identity.
    fn drop_blocks(&self, blocks: &Tensor, rng: &DropoutRng) -> Result<Tensor> {
        let (factors, num, size, _) = blocks.dims4()?;
        let count = (self.config.boft_dropout * num as f64) as usize;
        if count == 0 {
            return Ok(blocks.clone());
        }
        let draws = rng.uniform(num + 1);
        let factor = ((draws[0] * factors as f32) as usize).min(factors - 1);
        // The `count` blocks with the smallest draws: a uniform sample without replacement.
        let mut order: Vec<usize> = (0..num).collect();
        order.sort_by(|a, b| draws[1 + a].total_cmp(&draws[1 + b]));
        let mut mask = vec![0u8; factors * num];
        for block in &order[..count.min(num)] {
            mask[factor * num + block] = 1;
        }
        let shape = blocks.shape();
        let mask =
            Tensor::from_vec(mask, (factors, num, 1, 1), blocks.device())?.broadcast_as(shape)?;
        let eye = Tensor::eye(size, blocks.dtype(), blocks.device())?.broadcast_as(shape)?;
        Ok(mask.where_cond(&eye, blocks)?)
    }

    fn rule(&self, blocks: &Tensor) -> Result<MergeRule> {
        let matrix = self.factors(blocks)?;
        Ok(MergeRule::Transform {
            // PEFT unmerges with the transpose (R is orthogonal), not an inverse.
            inverse: matrix.transpose()?,
            matrix,
            side: Side::Input,
            out_scale: Some(self.params.get(BOFT_S)?.flatten_all()?),
        })
    }

    /// PEFT's Linear output: `(y − b) · s + b`, the scaling in the adapter dtype.
    fn scale_output(&self, y: &Tensor, base: &BaseLayer) -> Result<Tensor> {
        let out_dtype = y.dtype();
        let dtype = self.params.get(BOFT_S)?.dtype();
        let s = base.per_output(&self.params.get(BOFT_S)?, y.rank())?;
        let out = match base.bias() {
            Some(b) => {
                let b = base.per_output(b, y.rank())?;
                y.broadcast_sub(&b)?
                    .to_dtype(dtype)?
                    .broadcast_mul(&s)?
                    .broadcast_add(&b.to_dtype(dtype)?)?
            }
            None => y.to_dtype(dtype)?.broadcast_mul(&s)?,
        };
        Ok(out.to_dtype(out_dtype)?)
    }
}

fn permutation_indices(butterfly: &Butterfly, device: &Device) -> Result<Vec<Option<Tensor>>> {
    butterfly
        .permutations()?
        .into_iter()
        .map(|perm| {
            if perm.iter().enumerate().all(|(i, p)| i == *p) {
                return Ok(None);
            }
            let idx: Vec<u32> = perm.iter().map(|&p| p as u32).collect();
            Ok(Some(Tensor::from_vec(idx, perm.len(), device)?))
        })
        .collect()
}

impl LayerAdapter for BoftAdapter {
    fn config(&self) -> &dyn MethodConfig {
        &*self.config
    }

    fn params(&self) -> &Params {
        &self.params
    }

    fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }

    fn forward(&self, x: &Tensor, below: &Below<'_>) -> Result<Tensor> {
        let base = below.base();
        match self.kind {
            ModuleKind::Conv2d(_) => {
                let blocks = self.factor_blocks(below.training_rng())?;
                // PEFT's Conv2d forward is the conv with the merged weight, which the f32
                // scaling promotes: the conv runs in the adapter dtype, its result is cast back.
                let dtype = blocks.dtype();
                let (weight, bias) = below.weights()?;
                let bias = bias.map(|b| b.to_dtype(dtype)).transpose()?;
                let rule = self.rule(&blocks)?;
                let (weight, _, _) =
                    apply_rule(base, &rule, &weight.to_dtype(dtype)?, bias.as_ref())?;
                let y = base.forward_with(&x.to_dtype(dtype)?, &weight, bias.as_ref())?;
                Ok(y.to_dtype(x.dtype())?)
            }
            _ => {
                let blocks = self.factor_blocks(below.training_rng())?;
                let factors = self.factors(&blocks)?;
                let rotated = match factors.rows_times_on_cpu(x, x.dtype())? {
                    Some(rotated) => rotated,
                    None => {
                        // x · R, the rotation cast to the input's dtype as PEFT does.
                        let rotation = factors.to_dense()?.to_dtype(x.dtype())?;
                        linear_rows(x, &rotation, None, self.butterfly.dim)?
                    }
                };
                // `(base(x·R) − b) · s + b` is the base product scaled per output before the
                // bias: the fused kernel's output scale, in the pass that writes the output.
                let scale = || {
                    Ok(Extras {
                        out_scale: Some(self.params.get(BOFT_S)?.flatten_all()?),
                        unscaled_bias: true,
                        ..Extras::default()
                    })
                };
                match below.fused(&rotated, 0.0, scale)? {
                    Some(y) => Ok(y),
                    None => self.scale_output(&below.forward(&rotated)?, base),
                }
            }
        }
    }

    fn merge_rule(&self, _base: &BaseLayer) -> Result<MergeRule> {
        self.rule(&self.factor_blocks(None)?)
    }
}

/// `init_weights=true`: `boft_R = 0` (R = I), `boft_s = 1`; false: `boft_R ~ N(0, 0.1²)`,
/// `boft_s ~ N(1, 0.1²)`.
fn init_params(
    config: &BoftConfig,
    expected: &[(&'static str, Vec<usize>)],
    seed: u64,
    dtype: DType,
) -> Result<Vec<(String, Tensor)>> {
    let mut init = Initializer::new(seed);
    let dev = &Device::Cpu;
    expected
        .iter()
        .map(|(name, shape)| {
            let t = match (config.init_weights, *name) {
                (true, BOFT_R) => Tensor::zeros(shape.as_slice(), dtype, dev)?,
                (true, _) => Tensor::ones(shape.as_slice(), dtype, dev)?,
                (false, BOFT_R) => init.normal(shape, 0.1, dtype)?,
                (false, _) => init.normal(shape, 0.1, dtype)?.affine(1.0, 1.0)?,
            };
            Ok((name.to_string(), t))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::Conv2dParams;

    fn perms(dim: usize, block_size: usize, factors: usize) -> Vec<Vec<usize>> {
        Butterfly {
            dim,
            block_size,
            block_num: dim / block_size,
            factors,
        }
        .permutations()
        .unwrap()
    }

    /// The examples of hf-peft.md §10.2 and more, as PEFT's `block_butterfly_perm` gives them.
    #[test]
    fn butterfly_permutations_match_peft() {
        let id = |n: usize| (0..n).collect::<Vec<_>>();
        assert_eq!(perms(8, 2, 2), vec![id(8), vec![0, 2, 1, 3, 4, 6, 5, 7]]);
        assert_eq!(
            perms(16, 4, 3),
            vec![
                id(16),
                vec![0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15],
                vec![0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15],
            ]
        );
        assert_eq!(
            perms(16, 2, 4)[1..],
            [
                vec![0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15],
                vec![0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15],
                vec![0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15],
            ]
        );
        assert_eq!(
            perms(24, 2, 3)[2],
            vec![
                0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15, 16, 18, 20, 22, 17, 19, 21,
                23
            ]
        );
        assert_eq!(perms(12, 3, 1), vec![id(12)]);
    }

    fn config(json: Value) -> Result<BoftConfig> {
        BoftConfig::from_json(json)
    }

    fn linear(out: usize, inp: usize) -> BaseLayer {
        let w = Tensor::arange(0f32, (out * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((out, inp))
            .unwrap();
        BaseLayer::new(ModuleKind::Linear, w, None).unwrap()
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn config_checks_use_peft_messages() {
        let e = err_text(config(serde_json::json!({"boft_block_size": 0})));
        assert!(e.contains("Either `boft_block_size` or `boft_block_num` must be non-zero"));
        let e = err_text(config(serde_json::json!({"boft_block_num": 2})));
        assert!(
            e.contains("You can only specify either boft_block_size (4) or boft_block_num (2)")
        );
        let e = err_text(config(serde_json::json!({"boft_n_butterfly_factor": 0})));
        assert!(e.contains("boft_n_butterfly_factor"));
        let e = err_text(config(serde_json::json!({"boft_dropout": 1.5})));
        assert!(e.contains("boft_dropout"));
        let e = err_text(config(serde_json::json!({"bias": "lora_only"})));
        assert!(e.contains("bias"));
        let e = err_text(config(serde_json::json!({"layers_pattern": "layers"})));
        assert!(e.contains("layers_to_transform"));
        let e = err_text(config(serde_json::json!({"peft_type": "LORA"})));
        assert!(e.contains("LORA"));
    }

    #[test]
    fn layer_checks_use_peft_messages() {
        let base = linear(4, 12);
        let resolve = |json: Value, factors| {
            Butterfly::resolve(&config(json).unwrap(), "lin", &base, factors)
        };
        let e = err_text(resolve(serde_json::json!({"boft_block_size": 5}), 1));
        assert!(
            e.contains("in_features (12) must be divisible by boft_block_size (5)!"),
            "{e}"
        );
        let e = err_text(resolve(serde_json::json!({"boft_block_size": 4}), 2));
        assert!(e.contains("Invalid combination of in_features (12), boft_n_butterfly_factor (2) and boft_block_size (4)!"), "{e}");
        let e = err_text(resolve(
            serde_json::json!({"boft_block_size": 0, "boft_block_num": 4}),
            4,
        ));
        assert!(
            e.contains(
                "Invalid combination of boft_n_butterfly_factor (4) and boft_block_num (4)!"
            ),
            "{e}"
        );
        let e = err_text(resolve(
            serde_json::json!({"boft_block_size": 0, "boft_block_num": 6}),
            3,
        ));
        assert!(e.contains("boft_block_num (6) must be a multiple of 2 raised to the power of boft_n_butterfly_factor (3)!"), "{e}");
        let e = err_text(resolve(
            serde_json::json!({"boft_block_size": 0, "boft_block_num": 4}),
            2,
        ));
        assert!(
            e.contains("boft_block_size (3) must be an even number!"),
            "{e}"
        );
        let e = err_text(resolve(serde_json::json!({"boft_block_size": 3}), 200));
        assert!(e.contains("Invalid combination"), "{e}");
        let ok = resolve(serde_json::json!({"boft_block_size": 2}), 2).unwrap();
        assert_eq!((ok.block_num, ok.block_size, ok.dim), (6, 2, 12));
    }

    #[test]
    fn conv_dimension_is_in_channels_times_kernel_area() {
        let w = Tensor::zeros((8, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let conv = BaseLayer::new(ModuleKind::Conv2d(Conv2dParams::default()), w, None).unwrap();
        let cfg = config(serde_json::json!({"boft_block_size": 2})).unwrap();
        let e = err_text(Butterfly::resolve(&cfg, "conv", &conv, 1));
        assert!(
            e.contains(
                "Convolutional kernel dimension (27) must be divisible by boft_block_size (2)!"
            ),
            "{e}"
        );
        let cfg = config(serde_json::json!({"boft_block_size": 3})).unwrap();
        let a = BoftAdapter::new("conv", &conv, cfg, ParamSource::Init { seed: 0 }).unwrap();
        assert_eq!(a.butterfly().block_num, 9);
        assert_eq!(a.params().get(BOFT_S).unwrap().dims(), [1, 8]);
    }

    #[test]
    fn unsupported_kinds_are_refused() {
        let cfg = config(serde_json::json!({"boft_block_size": 2})).unwrap();
        let w = Tensor::zeros((6, 4), DType::F32, &Device::Cpu).unwrap();
        let gpt2 = BaseLayer::new(ModuleKind::Conv1D, w, None).unwrap();
        let e = err_text(BoftAdapter::new(
            "c",
            &gpt2,
            cfg.clone(),
            ParamSource::Init { seed: 0 },
        ));
        assert!(e.contains("transformers Conv1D"), "{e}");
        let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let dilated = Conv2dParams {
            dilation: 2,
            ..Default::default()
        };
        let conv = BaseLayer::new(ModuleKind::Conv2d(dilated), w, None).unwrap();
        let e = err_text(BoftAdapter::new(
            "c",
            &conv,
            cfg,
            ParamSource::Init { seed: 0 },
        ));
        assert!(e.contains("dilat"), "{e}");
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn rotation_is_orthogonal_and_identity_at_init() {
        let base = linear(3, 16);
        for (json, zero) in [
            (
                serde_json::json!({"boft_block_size": 2, "boft_n_butterfly_factor": 3}),
                false,
            ),
            (
                serde_json::json!({"boft_block_size": 4, "init_weights": true}),
                true,
            ),
        ] {
            let mut json = json;
            if !zero {
                json["init_weights"] = false.into();
            }
            let a = BoftAdapter::new(
                "lin",
                &base,
                config(json).unwrap(),
                ParamSource::Init { seed: 3 },
            )
            .unwrap();
            let r = a.rotation(None).unwrap();
            let eye = Tensor::eye(16, DType::F32, &Device::Cpu).unwrap();
            assert!(max_abs(&(r.matmul(&r.t().unwrap()).unwrap() - &eye).unwrap()) < 1e-5);
            assert_eq!(max_abs(&(r - &eye).unwrap()) == 0.0, zero);
        }
    }

    /// The input rotation by factor blocks equals `x · R` with `R` formed, for one and several
    /// butterfly factors (permuted), f32 and bf16, strided and 3-D inputs.
    #[test]
    fn input_rotation_by_blocks_equals_the_formed_rotation() {
        let base = linear(3, 16);
        let mut init = Initializer::new(4);
        for (block_size, factors) in [(2, 1), (2, 3), (4, 2), (8, 1)] {
            let json = serde_json::json!({"boft_block_size": block_size,
                "boft_n_butterfly_factor": factors, "init_weights": false});
            let a = BoftAdapter::new(
                "lin",
                &base,
                config(json).unwrap(),
                ParamSource::Init { seed: 3 },
            )
            .unwrap();
            let matrix = a.factors(&a.factor_blocks(None).unwrap()).unwrap();
            let rotation = a.rotation(None).unwrap();
            let wide = init.uniform(&[5, 19], 1.0, DType::F32).unwrap();
            let inputs = [
                init.uniform(&[7, 16], 1.0, DType::F32).unwrap(),
                init.uniform(&[2, 3, 16], 1.0, DType::F32).unwrap(),
                wide.narrow(1, 2, 16).unwrap(),
            ];
            for x in inputs {
                for dtype in [DType::F32, DType::BF16] {
                    let x = x.to_dtype(dtype).unwrap();
                    let fast = matrix.rows_times_on_cpu(&x, dtype).unwrap().unwrap();
                    assert_eq!(fast.dtype(), dtype);
                    let x32 = x.to_dtype(DType::F32).unwrap();
                    let formed = x32.broadcast_matmul(&rotation).unwrap();
                    let diff = max_abs(&(fast.to_dtype(DType::F32).unwrap() - formed).unwrap());
                    let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                    assert!(
                        diff < tol,
                        "{block_size} {factors} {dtype:?} {:?}: {diff}",
                        x.dims()
                    );
                }
            }
        }
    }

    fn given(factors: usize) -> ParamSource {
        let r = Tensor::zeros((factors, 8, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let s = Tensor::ones((3, 1), DType::F32, &Device::Cpu).unwrap();
        ParamSource::Given(vec![(BOFT_R.into(), r), (BOFT_S.into(), s)])
    }

    /// A config asking for 2 factors loads files with 2 (PEFT with its CUDA extension) or 1
    /// (PEFT without it); anything else names the expected and found shapes.
    #[test]
    fn files_of_either_factor_load() {
        let base = linear(3, 16);
        let cfg = config(serde_json::json!({"boft_block_size": 2, "boft_n_butterfly_factor": 2}))
            .unwrap();
        for f in [1, 2] {
            let a = BoftAdapter::new("lin", &base, cfg.clone(), given(f)).unwrap();
            assert_eq!(a.butterfly().factors, f);
        }
        let e = err_text(BoftAdapter::new("lin", &base, cfg, given(3)));
        assert!(e.contains("base_model.model.lin.boft_R"), "{e}");
        assert!(
            e.contains("[2, 8, 2, 2]") && e.contains("[3, 8, 2, 2]"),
            "{e}"
        );
    }

    /// With p = 1 every block of the (only) factor is dropped: the training forward is the
    /// base output rescaled.
    #[test]
    fn full_dropout_leaves_only_the_scaling() {
        let base = linear(3, 8);
        let cfg = config(serde_json::json!({
            "boft_block_size": 2, "boft_dropout": 1.0, "init_weights": false
        }))
        .unwrap();
        let a = BoftAdapter::new("lin", &base, cfg, ParamSource::Init { seed: 1 }).unwrap();
        let eye = Tensor::eye(8, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            max_abs(&(a.rotation(Some(&DropoutRng::new(2))).unwrap() - &eye).unwrap()),
            0.0
        );
        assert!(max_abs(&(a.rotation(None).unwrap() - &eye).unwrap()) > 1e-3);
    }

    /// PEFT drops `int(p · block_num)` blocks of one factor: with p = 0.6 and 4 blocks, 2 of
    /// the 4 diagonal blocks of the rotation are the identity, the other 2 are as without
    /// dropout.
    #[test]
    fn dropout_replaces_int_p_times_blocks() {
        let base = linear(3, 8);
        let cfg = config(serde_json::json!({
            "boft_block_size": 2, "boft_dropout": 0.6, "init_weights": false
        }))
        .unwrap();
        let a = BoftAdapter::new("lin", &base, cfg, ParamSource::Init { seed: 1 }).unwrap();
        let kept = a.rotation(None).unwrap();
        let eye = Tensor::eye(8, DType::F32, &Device::Cpu).unwrap();
        let rng = DropoutRng::new(2);
        for _ in 0..5 {
            let dropped = a.rotation(Some(&rng)).unwrap();
            let (mut identity, mut same) = (0, 0);
            for i in 0..4 {
                let block =
                    |t: &Tensor| t.narrow(0, 2 * i, 2).unwrap().narrow(1, 2 * i, 2).unwrap();
                identity += usize::from(max_abs(&(block(&dropped) - block(&eye)).unwrap()) == 0.0);
                same += usize::from(max_abs(&(block(&dropped) - block(&kept)).unwrap()) == 0.0);
            }
            assert_eq!((identity, same), (2, 2));
        }
    }
}
