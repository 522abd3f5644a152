//! OFT (PEFT `tuners/oft`): orthogonal fine-tuning. The layer's input features (an Embedding's
//! output features) are rotated by a block-diagonal `R = blockdiag(R_1..R_r)`, each block the
//! Cayley transform of a skew-symmetric `Q_i` whose strict upper triangle is the trained
//! parameter: Linear `y = base(x·R)`, Embedding `y = base(ids)·R`.
//!
//! PEFT behaviour reproduced, and where it is odd:
//! - Block size: exactly one of `r` (blocks) and `oft_block_size` is non-zero; the other follows
//!   from the rotated width `D`, after PEFT's `adjust_oft_parameters` moves a value that does not
//!   divide `D` to the nearest divisor (the lower one on ties).
//! - Rotation: `use_cayley_neumann` sums PEFT's truncated series `I + 2Q + 2Q² + … + Q^m`, which
//!   approximates `(I + Q)(I − Q)⁻¹`, while the exact form (`use_cayley_neumann=false`) is
//!   `(I − Q)(I + Q)⁻¹`: the two rotate the opposite way for the same weights. The series for
//!   `num_cayley_neumann_terms` 3 and 4 is the same (`m = 3`), and 0 or 1 terms give `R = I`.
//! - `coft`: PEFT projects each block's `Q` back into the ball of radius `eps/√blocks` in place,
//!   at every forward and merge. Here the forward and the merge use the projected weight without
//!   writing it back (same numbers; a stored weight outside the ball stays there, and PEFT
//!   projects it the same way when it loads the file). The gradient passes through the
//!   projection unchanged, as with PEFT's in-place copy; training steps still differ from PEFT's
//!   once a weight leaves the ball, since PEFT's optimiser then updates the projected value.
//! - `module_dropout` is accepted and saved, but PEFT's forward never applies it; neither does
//!   this one.
//! - Conv2d: `D = in_channels·k·k`. PEFT's forward unfolds the input into k×k patches with
//!   stride 1 and no padding, rotates each patch, and folds back with `F.fold` after a `view`
//!   that reorders the rotated values (and `fold` sums overlapping patches). It agrees with the
//!   merged weight only when patches do not overlap (input spatial size equal to the kernel, or
//!   1×1 kernels): even `R = I` changes the input otherwise. The forward here is PEFT's forward.
//!   PEFT refuses dilation > 1; a non-square kernel fails in PEFT, and is refused here; a grouped
//!   Conv2d runs forward but cannot be merged (PEFT's merge fails on it), so merging is an error.
//! - Unmerge multiplies by the inverse of `R` (not `Rᵀ`: the series is not exactly orthogonal),
//!   computed in f32 as PEFT does (even for an f64 adapter).
//! - transformers `Conv1D` is not supported by PEFT's OFT; it is an error here too.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::base::{BaseLayer, ModuleKind};
use crate::config::{CommonFields, ModuleSelector, OneOrMany, check_extra_fields, parse_config};
use crate::error::{PeftError, Result};
use crate::init::Initializer;
use crate::linalg::{self, BlockFactors};
use crate::matching::Selection;
use crate::merge::adapter_dtype;
use crate::method::{
    BiasMode, InferredBase, LayerAdapter, MergeRule, MethodConfig, MethodEntry, ParamSource, Side,
    dims_of, dims_with_rank,
};
use crate::module::Below;
use crate::params::{Params, take_params};

pub const PEFT_TYPE: &str = "OFT";

pub const ENTRY: MethodEntry = MethodEntry {
    peft_type: PEFT_TYPE,
    config_class: "OFTConfig",
    from_json: |v| Ok(Arc::new(OftConfig::from_json(v)?)),
};

/// The packed rotation parameters of a Linear or Conv2d layer, `(blocks, b·(b−1)/2)`.
pub const OFT_R: &str = "oft_R.weight";
/// The same for an Embedding layer.
pub const OFT_EMBEDDING_R: &str = "oft_embedding_R.weight";

pub const PARAM_NAMES: &[&str] = &[OFT_R, OFT_EMBEDDING_R];

/// OFT's `bias`: which base-model biases are trained and saved with the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OftBias {
    #[default]
    None,
    All,
    OftOnly,
}

impl From<OftBias> for BiasMode {
    fn from(b: OftBias) -> Self {
        match b {
            OftBias::None => BiasMode::None,
            OftBias::All => BiasMode::All,
            OftBias::OftOnly => BiasMode::AdaptedOnly,
        }
    }
}

/// PEFT's `OFTConfig`, with PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OftConfig {
    #[serde(flatten)]
    pub common: CommonFields,
    /// Number of blocks; 0 when `oft_block_size` is given.
    pub r: usize,
    /// Block size; 0 when `r` is given.
    pub oft_block_size: usize,
    /// Saved, never applied (PEFT's forward does not call its dropout).
    pub module_dropout: f64,
    pub target_modules: Option<ModuleSelector>,
    /// No effect: PEFT forces it to false on `nn.Linear` targets (and saves that).
    pub fan_in_fan_out: bool,
    pub bias: OftBias,
    pub exclude_modules: Option<ModuleSelector>,
    /// `true`: zeros (`R = I`); `false`: N(0, 0.1²).
    pub init_weights: bool,
    pub layers_to_transform: Option<OneOrMany<i64>>,
    pub layers_pattern: Option<OneOrMany<String>>,
    pub modules_to_save: Option<Vec<String>>,
    /// Constrained OFT: each block's `Q` is kept within Frobenius radius `eps/√blocks`.
    pub coft: bool,
    pub eps: f64,
    /// One block, repeated along the diagonal.
    pub block_share: bool,
    pub use_cayley_neumann: bool,
    pub num_cayley_neumann_terms: u32,
    /// Fields PEFT's `OFTConfig` does not have; each must be "off" (null, false, empty).
    #[serde(flatten, skip_serializing)]
    pub unsupported: Map<String, Value>,
}

impl Default for OftConfig {
    fn default() -> Self {
        Self {
            common: CommonFields::default(),
            r: 0,
            oft_block_size: 32,
            module_dropout: 0.0,
            target_modules: None,
            fan_in_fan_out: false,
            bias: OftBias::None,
            exclude_modules: None,
            init_weights: true,
            layers_to_transform: None,
            layers_pattern: None,
            modules_to_save: None,
            coft: false,
            eps: 6e-5,
            block_share: false,
            use_cayley_neumann: true,
            num_cayley_neumann_terms: 5,
            unsupported: Map::new(),
        }
    }
}

impl OftConfig {
    /// Reads a config from PEFT's JSON form (`adapter_config.json` or `OFTConfig.to_dict()`).
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

    /// Checks every field; every constructor calls it, so a config in hand is valid.
    pub fn validate(&self) -> Result<()> {
        self.common.validate()?;
        check_extra_fields(&self.unsupported, &[])?;
        // PEFT's messages.
        let (r, b) = (self.r, self.oft_block_size);
        if r == 0 && b == 0 {
            return Err(PeftError::config(
                "r",
                format!(
                    "Either `r` or `oft_block_size` must be non-zero. Currently, r = {r} and \
                     oft_block_size = {b}."
                ),
            ));
        }
        if r != 0 && b != 0 {
            return Err(PeftError::config(
                "oft_block_size",
                format!(
                    "You can only specify either r ({r}) or oft_block_size ({b}), but not both \
                     simultaneously, because r x oft_block_size == in_features. (A config of \
                     PEFT < 0.14 has no oft_block_size; PEFT cannot read those either.)"
                ),
            ));
        }
        // A probability of replacing blocks by the identity: 1 is meaningful (all of them).
        if !(0.0..=1.0).contains(&self.module_dropout) {
            return Err(PeftError::config(
                "module_dropout",
                format!("must be in [0, 1], found {}", self.module_dropout),
            ));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(PeftError::config(
                "eps",
                format!("must be a finite non-negative radius, found {}", self.eps),
            ));
        }
        self.selection().validate()
    }
}

impl MethodConfig for OftConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn validate(&self) -> Result<()> {
        OftConfig::validate(self)
    }

    fn fields(&self) -> Value {
        serde_json::to_value(self).expect("OftConfig serialises")
    }

    fn selection(&self) -> Selection<'_> {
        OftConfig::selection(self)
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
        Ok(Box::new(OftAdapter::new(
            module,
            base,
            self.clone(),
            source,
        )?))
    }

    /// PEFT sets `fan_in_fan_out` to false when it wraps an `nn.Linear`, and saves that.
    fn for_targets(&self, kinds: &[ModuleKind]) -> Result<Option<Arc<dyn MethodConfig>>> {
        if kinds.contains(&ModuleKind::Conv1D) {
            return Err(unsupported_conv1d());
        }
        let mut config = self.clone();
        if kinds.contains(&ModuleKind::Linear) {
            config.fan_in_fan_out = false;
        }
        Ok(Some(Arc::new(config)))
    }

    /// The rotated width `blocks · block_size`: the block size whose strict upper triangle
    /// holds the packed row length (the nearest one when none does, so that `build` reports
    /// it), the blocks from the rows (`r`, or 1 with `block_share`). `oft_embedding_R` tells an
    /// Embedding (the width is its `embedding_dim`); `oft_R` a Linear (the width is its input;
    /// a Conv2d's `in · k · k` cannot be split). The other width is free: taken equal.
    fn infer_base(
        &self,
        module: &str,
        tensors: &[(String, Tensor)],
        _shared: &BTreeMap<String, Tensor>,
    ) -> Result<Option<InferredBase>> {
        let embedding = dims_of(tensors, OFT_EMBEDDING_R).is_some();
        let name = if embedding { OFT_EMBEDDING_R } else { OFT_R };
        let r = dims_with_rank(module, tensors, name, &[2])?;
        // b(b − 1)/2 = packed → b = (1 + √(1 + 8·packed)) / 2.
        let block_size = ((1.0 + (1.0 + 8.0 * r[1] as f64).sqrt()) / 2.0).round() as usize;
        let blocks = match (self.block_share, self.r) {
            (false, _) => r[0],
            (true, 0) => 1,
            (true, r) => r,
        };
        let dim = blocks * block_size.max(1);
        Ok(Some(if embedding {
            InferredBase::embedding(dim, dim)
        } else {
            InferredBase::linear(dim, dim, false)
        }))
    }
}

fn unsupported_conv1d() -> PeftError {
    PeftError::InvalidOperation(
        "OFT does not support transformers Conv1D layers (PEFT's OFT supports nn.Linear, \
         nn.Conv2d and nn.Embedding)"
            .into(),
    )
}

/// PEFT's `adjust_oft_parameters`: `value` if it divides `dim`, else the nearest divisor of
/// `dim` (the lower one on ties); `dim` itself when `value >= dim`.
pub fn adjust_oft_parameters(dim: usize, value: usize) -> usize {
    if value >= dim {
        return dim;
    }
    let mut higher = value;
    while higher <= dim && !dim.is_multiple_of(higher) {
        higher += 1;
    }
    let mut lower = value;
    while lower > 1 && !dim.is_multiple_of(lower) {
        lower -= 1;
    }
    if value - lower <= higher - value {
        lower
    } else {
        higher
    }
}

/// `(blocks, block_size)` for a rotated width `dim`, from the config's `r` or `oft_block_size`
/// (exactly one is non-zero), as PEFT's `update_layer` resolves them.
pub fn resolve_blocks(dim: usize, r: usize, block_size: usize) -> Result<(usize, usize)> {
    let fits = |v: usize| dim.is_multiple_of(v) && v <= dim;
    match (r, block_size) {
        (0, b) if b != 0 => {
            let b = if fits(b) {
                b
            } else {
                adjust_oft_parameters(dim, b)
            };
            Ok((dim / b, b))
        }
        (r, 0) if r != 0 => {
            let r = if fits(r) {
                r
            } else {
                adjust_oft_parameters(dim, r)
            };
            Ok((r, dim / r))
        }
        _ => Err(PeftError::config(
            "r",
            format!("exactly one of r ({r}) and oft_block_size ({block_size}) must be non-zero"),
        )),
    }
}

/// Coefficients of `Q⁰, Q¹, …` in PEFT's truncated Cayley–Neumann series for `terms` terms:
/// `[1]`, `[1, 2]`, then `[1, 2, 2, …, 2, 1]` up to `Q^max(3, terms − 1)`.
pub fn neumann_coefficients(terms: u32) -> Vec<f64> {
    match terms {
        0 | 1 => vec![1.0],
        2 => vec![1.0, 2.0],
        _ => {
            let top = (terms as usize - 1).max(3);
            let mut c = vec![2.0; top + 1];
            c[0] = 1.0;
            c[top] = 1.0;
            c
        }
    }
}

/// `(row, col)` of each packed parameter: the strict upper triangle of a `b × b` block, row by
/// row (`torch.triu_indices(b, b, 1)`).
pub fn packed_positions(b: usize) -> Vec<(usize, usize)> {
    (0..b)
        .flat_map(|i| (i + 1..b).map(move |j| (i, j)))
        .collect()
}

/// For each entry of a `b × b` block, row-major, `1 + k` where packed parameter `k` goes and 0
/// elsewhere: an index into the packed vector with a zero prepended.
fn upper_index(b: usize, device: &Device) -> Result<Tensor> {
    let mut index = vec![0u32; b * b];
    for (k, (i, j)) in packed_positions(b).into_iter().enumerate() {
        index[i * b + j] = k as u32 + 1;
    }
    Ok(Tensor::from_vec(index, b * b, device)?)
}

/// What OFT rotates on a module of this kind, and the merge's side of the weight.
#[derive(Debug, Clone, Copy)]
enum Rotated {
    /// Linear: the input features.
    Input,
    /// Embedding: the output features.
    Output,
    /// Conv2d: k×k input patches (PEFT's unfold/fold forward). `groups > 1` cannot be merged.
    Patches { kernel: usize, groups: usize },
}

/// An OFT adapter on one module.
#[derive(Debug)]
pub struct OftAdapter {
    config: Arc<OftConfig>,
    params: Params,
    /// [`OFT_R`] or [`OFT_EMBEDDING_R`].
    name: &'static str,
    rotated: Rotated,
    blocks: usize,
    block_size: usize,
    /// See [`upper_index`]; on the adapter's device.
    upper: Tensor,
}

impl OftAdapter {
    /// The adapter for `module` on `base`: given tensors, or initialised following
    /// `init_weights`.
    pub fn new(
        module: &str,
        base: &BaseLayer,
        config: OftConfig,
        source: ParamSource,
    ) -> Result<Self> {
        let (rotated, dim, name) = match base.kind() {
            ModuleKind::Linear => (Rotated::Input, base.in_features(), OFT_R),
            ModuleKind::Embedding => (Rotated::Output, base.out_features(), OFT_EMBEDDING_R),
            ModuleKind::Conv2d(p) => {
                let (kh, kw) = base.kernel_size();
                if p.dilation > 1 {
                    return Err(PeftError::InvalidOperation(
                        "OFT does not support Conv2d with dilation > 1 (as in PEFT)".into(),
                    ));
                }
                if kh != kw {
                    return Err(PeftError::InvalidOperation(format!(
                        "OFT needs a square Conv2d kernel, found {kh}×{kw} (PEFT sizes the \
                         rotation with kernel_size[0] twice and fails on it)"
                    )));
                }
                let rotated = Rotated::Patches {
                    kernel: kh,
                    groups: p.groups,
                };
                (rotated, base.in_features() * kh * kw, OFT_R)
            }
            ModuleKind::Conv1D => return Err(unsupported_conv1d()),
        };
        let (blocks, block_size) = resolve_blocks(dim, config.r, config.oft_block_size)?;
        let stored = if config.block_share { 1 } else { blocks };
        let shape = vec![stored, block_size * (block_size - 1) / 2];
        let dtype = adapter_dtype(base.dtype());
        let given = match source {
            ParamSource::Given(tensors) => tensors,
            ParamSource::Init { seed } => {
                let t = if config.init_weights {
                    Tensor::zeros(shape.as_slice(), dtype, &Device::Cpu)?
                } else {
                    Initializer::new(seed).normal(&shape, 0.1, dtype)?
                };
                vec![(name.to_string(), t)]
            }
        };
        let what = format!(
            "OFT {:?} with {blocks} blocks of size {block_size}{}",
            base.kind(),
            if config.block_share { " (shared)" } else { "" }
        );
        let params = take_params(module, &what, given, &[(name, shape)], dtype, base.device())?;
        Ok(Self {
            config: Arc::new(config),
            params,
            name,
            rotated,
            blocks,
            block_size,
            upper: upper_index(block_size, base.device())?,
        })
    }

    /// Number of blocks on the diagonal of `R` (PEFT's resolved `r`).
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The rotation's blocks `(stored, b, b)` from the current parameters: one block with
    /// `block_share`.
    pub fn rotation_blocks(&self) -> Result<Tensor> {
        let mut packed = self.params.get(self.name)?;
        if self.config.coft {
            packed = self.coft_projected(&packed)?;
        }
        if self.config.use_cayley_neumann
            && let Some(blocks) = neumann_packed(
                &packed,
                self.block_size,
                self.config.num_cayley_neumann_terms,
            )?
        {
            return Ok(blocks);
        }
        let skew = self.skew(&packed)?;
        if self.config.use_cayley_neumann {
            neumann(&skew, self.config.num_cayley_neumann_terms)
        } else {
            linalg::cayley(&skew)
        }
    }

    /// The skew-symmetric blocks `Q = U − Uᵀ`, `U` the packed values in the strict upper
    /// triangle.
    fn skew(&self, packed: &Tensor) -> Result<Tensor> {
        let (n, b) = (packed.dim(0)?, self.block_size);
        let zero = Tensor::zeros((n, 1), packed.dtype(), packed.device())?;
        let upper = Tensor::cat(&[&zero, packed], 1)?
            .index_select(&self.upper, 1)?
            .reshape((n, b, b))?;
        Ok(upper.sub(&upper.transpose(1, 2)?)?)
    }

    /// COFT's projection of each block's `Q` into the Frobenius ball of radius `eps/√n`, as
    /// PEFT's `_project_batch` computes it (the radius in f32). The value is the projection;
    /// the gradient passes through unchanged, as through PEFT's in-place copy.
    fn coft_projected(&self, packed: &Tensor) -> Result<Tensor> {
        let n = packed.dim(0)?;
        // torch: `eps * 1 / torch.sqrt(torch.tensor(n))`, i.e. f32 reciprocal times eps.
        let radius = ((1.0f32 / (n as f32).sqrt()) * self.config.eps as f32) as f64;
        let detached = packed.detach();
        let norm = self
            .skew(&detached)?
            .sqr()?
            .sum_keepdim((1, 2))?
            .sqrt()?
            .reshape((n, 1))?;
        let inside = norm.le(&norm.ones_like()?.affine(0.0, radius)?)?;
        let scaled = detached.broadcast_div(&norm)?.affine(radius, 0.0)?;
        let projected = inside
            .broadcast_as(packed.shape())?
            .where_cond(&detached, &scaled)?;
        if packed.track_op() {
            Ok(packed.add(&projected.sub(&detached)?.detach())?)
        } else {
            Ok(projected)
        }
    }

    /// `R` (block diagonal, `D × D`) from the current parameters.
    fn rotation(&self) -> Result<BlockFactors> {
        BlockFactors::block_diagonal(self.rotation_blocks()?, self.blocks * self.block_size)
    }

    /// PEFT's Conv2d rotation of `(N, C, H, W)` input: unfold k×k patches (stride 1, no
    /// padding), rotate each `C·k·k` patch vector, then `F.fold` back to `(N, C, H, W)` after
    /// PEFT's reordering `view` (fold sums overlapping patches).
    fn rotate_patches(&self, x: &Tensor, rotation: &BlockFactors, k: usize) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if h < k || w < k {
            return Err(PeftError::InvalidOperation(format!(
                "OFT on a Conv2d unfolds {k}×{k} patches; the input is only {h}×{w}"
            )));
        }
        let (ho, wo) = (h - k + 1, w - k + 1);
        let shifts: Vec<Tensor> = (0..k)
            .flat_map(|i| (0..k).map(move |j| (i, j)))
            .map(|(i, j)| x.narrow(2, i, ho)?.narrow(3, j, wo))
            .collect::<candle_core::Result<_>>()?;
        // (n, c, ho, wo, k·k) → one row per patch, features ordered (c, ki, kj).
        let patches = Tensor::stack(&shifts, 4)?
            .permute((0, 2, 3, 1, 4))?
            .reshape((n * ho * wo, c * k * k))?;
        let rotated = rotation.rows_times(&patches, patches.dtype())?;
        // PEFT's `permute(0, 3, 1, 2, 4, 5).contiguous().view(n, c·k·k, ho·wo)`: the memory of
        // (n, c, ho, wo, k, k) read as fold's (n, c, k, k, ho, wo).
        let cols = rotated
            .reshape((n, ho, wo, c, k, k))?
            .permute((0, 3, 1, 2, 4, 5))?
            .contiguous()?
            .reshape((n, c, k, k, ho, wo))?;
        let mut out: Option<Tensor> = None;
        for i in 0..k {
            for j in 0..k {
                let placed = cols
                    .narrow(2, i, 1)?
                    .narrow(3, j, 1)?
                    .reshape((n, c, ho, wo))?
                    .pad_with_zeros(2, i, h - ho - i)?
                    .pad_with_zeros(3, j, w - wo - j)?;
                out = Some(match out {
                    None => placed,
                    Some(acc) => acc.add(&placed)?,
                });
            }
        }
        out.ok_or_else(|| PeftError::InvalidOperation("OFT on a Conv2d with a 0×0 kernel".into()))
    }

    fn merge_error(&self) -> Option<PeftError> {
        match self.rotated {
            Rotated::Patches { groups, .. } if groups > 1 => {
                Some(PeftError::InvalidOperation(format!(
                    "OFT cannot be merged into a grouped Conv2d (groups={groups}): the rotation \
                     mixes channels across groups (PEFT's merge fails on it too)"
                )))
            }
            _ => None,
        }
    }
}

/// PEFT's truncated Cayley–Neumann series `Σ c_k Q^k` for each block of `skew`, summed in
/// PEFT's order.
/// [`neumann`] of the skew blocks of `packed` (`(n, b(b-1)/2)`, f32 on the CPU, no gradient
/// recorded), one block per parallel task with the products on the CPU directly: PEFT forms `R`
/// on every forward, and candle's batched small matmuls and element-wise ops cost more than the
/// arithmetic (0.3 ms for 32 blocks of 32). `None` where it does not apply.
fn neumann_packed(packed: &Tensor, b: usize, terms: u32) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    let Ok((n, len)) = packed.dims2() else {
        return Ok(None);
    };
    if !packed.device().is_cpu()
        || packed.track_op()
        || packed.dtype() != DType::F32
        || len != b * b.saturating_sub(1) / 2
    {
        return Ok(None);
    }
    let values = packed.flatten_all()?.to_vec1::<f32>()?;
    let positions = packed_positions(b);
    let coefficients = neumann_coefficients(terms);
    let mut out = vec![0f32; n * b * b];
    out.par_chunks_mut((b * b).max(1))
        .enumerate()
        .for_each(|(blk, r)| {
            // By index, not by chunks of `values`: 1 × 1 blocks have no packed values at all.
            let p = &values[blk * len..(blk + 1) * len];
            let mut q = vec![0f32; b * b];
            for (&v, &(i, j)) in p.iter().zip(&positions) {
                q[i * b + j] = v;
                q[j * b + i] = -v;
            }
            for i in 0..b {
                r[i * b + i] = 1.0;
            }
            let (mut power, mut next) = (q.clone(), vec![0f32; b * b]);
            for (t, &c) in coefficients.iter().enumerate().skip(1) {
                if t > 1 {
                    faer::linalg::matmul::matmul(
                        faer::MatMut::from_row_major_slice_mut(&mut next, b, b),
                        faer::Accum::Replace,
                        faer::MatRef::from_row_major_slice(&power, b, b),
                        faer::MatRef::from_row_major_slice(&q, b, b),
                        1.0,
                        faer::Par::Seq,
                    );
                    std::mem::swap(&mut power, &mut next);
                }
                let c = c as f32;
                r.iter_mut().zip(&power).for_each(|(r, p)| *r += c * p);
            }
        });
    Ok(Some(Tensor::from_vec(out, (n, b, b), &Device::Cpu)?))
}

fn neumann(skew: &Tensor, terms: u32) -> Result<Tensor> {
    let (n, b, _) = skew.dims3()?;
    let mut r = Tensor::eye(b, skew.dtype(), skew.device())?
        .unsqueeze(0)?
        .broadcast_as((n, b, b))?
        .contiguous()?;
    let mut power: Option<Tensor> = None;
    for c in neumann_coefficients(terms).into_iter().skip(1) {
        let next = match &power {
            None => skew.clone(),
            Some(p) => p.matmul(skew)?,
        };
        r = r.add(&next.affine(c, 0.0)?)?;
        power = Some(next);
    }
    Ok(r)
}

impl LayerAdapter for OftAdapter {
    fn config(&self) -> &dyn MethodConfig {
        &*self.config
    }

    fn params(&self) -> &Params {
        &self.params
    }

    fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }

    /// PEFT's forward: the rotation runs in the adapter dtype and its result is cast back to
    /// the dtype it was given (the layer input, or an Embedding's output).
    fn forward(&self, x: &Tensor, below: &Below<'_>) -> Result<Tensor> {
        let dtype = adapter_dtype(below.base().dtype());
        let rotation = self.rotation()?;
        match self.rotated {
            Rotated::Input => {
                let x_rot = match rotation.rows_times_on_cpu(x, x.dtype())? {
                    Some(rotated) => rotated,
                    None => rotation.rows_times(&x.to_dtype(dtype)?, x.dtype())?,
                };
                below.forward(&x_rot)
            }
            Rotated::Output => {
                let y = below.forward(x)?;
                rotation.rows_times(&y, y.dtype())
            }
            Rotated::Patches { kernel, .. } => {
                let x4 = match x.rank() {
                    3 => x.unsqueeze(0)?,
                    _ => x.clone(),
                };
                let x_rot = self
                    .rotate_patches(&x4.to_dtype(dtype)?, &rotation, kernel)?
                    .to_dtype(x.dtype())?;
                let x_rot = if x.rank() == 3 {
                    x_rot.squeeze(0)?
                } else {
                    x_rot
                };
                below.forward(&x_rot)
            }
        }
    }

    /// `R` (block diagonal, `D × D`) on the input features (Embedding: the output features);
    /// undone with `R⁻¹` computed in f32, as PEFT's `torch.linalg.inv` in its unmerge.
    fn merge_rule(&self, _base: &BaseLayer) -> Result<MergeRule> {
        if let Some(e) = self.merge_error() {
            return Err(e);
        }
        let matrix = self.rotation()?;
        let side = match self.rotated {
            Rotated::Output => Side::Output,
            Rotated::Input | Rotated::Patches { .. } => Side::Input,
        };
        Ok(MergeRule::Transform {
            inverse: matrix.inverse()?,
            matrix,
            side,
            out_scale: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values below were printed by PEFT 0.21.2 (`OFTLayer.adjust_oft_parameters`,
    // `torch.triu_indices`, `OFTRotationModule._cayley_batch`), not derived here.

    #[test]
    fn adjust_oft_parameters_matches_peft() {
        let peft = [
            (10, 32, 10),
            (12, 5, 4),
            (12, 7, 6),
            (20, 3, 2),
            (27, 4, 3),
            (48, 5, 4),
            (100, 7, 5),
            (7, 7, 7),
            (7, 3, 1),
            (13, 4, 1),
            (96, 13, 12),
            (1, 1, 1),
            (36, 8, 9),
            (18, 4, 3),
        ];
        for (dim, value, expected) in peft {
            assert_eq!(
                adjust_oft_parameters(dim, value),
                expected,
                "({dim}, {value})"
            );
        }
    }

    #[test]
    fn blocks_resolve_from_r_or_block_size() {
        assert_eq!(resolve_blocks(10, 0, 32).unwrap(), (1, 10));
        assert_eq!(resolve_blocks(20, 0, 4).unwrap(), (5, 4));
        assert_eq!(resolve_blocks(20, 3, 0).unwrap(), (2, 10));
        assert_eq!(resolve_blocks(27, 0, 4).unwrap(), (9, 3));
        assert_eq!(resolve_blocks(8, 16, 0).unwrap(), (8, 1));
        assert!(resolve_blocks(8, 2, 4).is_err());
        assert!(resolve_blocks(8, 0, 0).is_err());
    }

    #[test]
    fn packed_order_is_torch_triu_indices() {
        // torch.triu_indices(4, 4, 1) = [[0, 0, 0, 1, 1, 2], [1, 2, 3, 2, 3, 3]]
        let rows = [0, 0, 0, 1, 1, 2];
        let cols = [1, 2, 3, 2, 3, 3];
        let expected: Vec<_> = rows.into_iter().zip(cols).collect();
        assert_eq!(packed_positions(4), expected);
        assert!(packed_positions(1).is_empty());
    }

    /// The per-block fast path equals candle's ops on the dense skew blocks (f32 products in
    /// another order: 1e-5), for every term count and odd block sizes.
    #[test]
    fn packed_neumann_equals_the_tensor_ops() {
        for b in [1, 2, 5, 32] {
            let len = b * (b - 1) / 2;
            let mut init = Initializer::new(b as u64);
            let packed = init.uniform(&[3, len], 0.3, DType::F32).unwrap();
            let p = packed.to_vec2::<f32>().unwrap();
            let mut skew = vec![0f32; 3 * b * b];
            for (blk, p) in p.iter().enumerate() {
                for (&v, (i, j)) in p.iter().zip(packed_positions(b)) {
                    skew[blk * b * b + i * b + j] = v;
                    skew[blk * b * b + j * b + i] = -v;
                }
            }
            let skew = Tensor::from_vec(skew, (3, b, b), &Device::Cpu).unwrap();
            for terms in 0..7 {
                let fast = neumann_packed(&packed, b, terms).unwrap().unwrap();
                let plain = neumann(&skew, terms).unwrap();
                let diff = (fast - plain)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff < 1e-5, "b={b}, {terms} terms: {diff}");
            }
        }
    }

    #[test]
    fn neumann_term_count_has_peft_quirk() {
        assert_eq!(neumann_coefficients(3), neumann_coefficients(4));
        assert_eq!(neumann_coefficients(5), vec![1.0, 2.0, 2.0, 2.0, 1.0]);
        // R for Q = [[0, 0.3], [-0.3, 0]] and 0..=7 terms, entries (0, 0) and (0, 1), from PEFT.
        let peft = [
            (1.0, 0.0),
            (1.0, 0.0),
            (1.0, 0.6),
            (0.82, 0.573),
            (0.82, 0.573),
            (0.8281, 0.546),
            (0.8362, 0.54843),
            (0.835471, 0.55086),
        ];
        let skew = Tensor::new(&[[[0.0f64, 0.3], [-0.3, 0.0]]], &Device::Cpu).unwrap();
        for (terms, (r00, r01)) in peft.into_iter().enumerate() {
            let r = neumann(&skew, terms as u32)
                .unwrap()
                .to_vec3::<f64>()
                .unwrap();
            assert!((r[0][0][0] - r00).abs() < 1e-12, "{terms} terms");
            assert!((r[0][0][1] - r01).abs() < 1e-12, "{terms} terms");
        }
        // The exact Cayley transform rotates the other way: PEFT gives (0.83486, -0.55046).
        let exact = linalg::cayley(&skew).unwrap().to_vec3::<f64>().unwrap();
        assert!((exact[0][0][0] - 0.8348623853211009).abs() < 1e-12);
        assert!((exact[0][0][1] + 0.5504587155963302).abs() < 1e-12);
    }

    #[test]
    fn config_rules() {
        let ok = |v: Value| OftConfig::from_json(v);
        assert!(ok(serde_json::json!({"r": 4, "oft_block_size": 0})).is_ok());
        assert!(ok(serde_json::json!({"r": 4})).is_err());
        assert!(ok(serde_json::json!({"r": 0, "oft_block_size": 0})).is_err());
        assert!(ok(serde_json::json!({"module_dropout": 1.5})).is_err());
        assert!(ok(serde_json::json!({"eps": -1.0})).is_err());
        assert!(ok(serde_json::json!({"bias": "lora_only"})).is_err());
        assert!(ok(serde_json::json!({"peft_type": "LORA"})).is_err());
        assert!(ok(serde_json::json!({"layers_pattern": "h"})).is_err());
        assert!(ok(serde_json::json!({"use_dora": true})).is_err());
        let c = ok(serde_json::json!({"peft_type": "OFT", "bias": "oft_only"})).unwrap();
        assert_eq!(c.bias_mode(), BiasMode::AdaptedOnly);
        assert_eq!(c.to_json()["peft_type"], "OFT");
        assert_eq!(c.to_json()["peft_version"], crate::config::PEFT_VERSION);
    }
}
