//! AdaLoRA's training-time rank allocation (PEFT `tuners/adalora`: `RankAllocator`,
//! `AdaLoraModel.update_and_allocate` and the orthogonal regularisation of `AdaLoraModel.forward`).
//!
//! Every module starts with `init_r` triplets `(A[i, :], E[i], B[:, i])`. After each optimiser
//! step the allocator smooths each entry's sensitivity `|p · ∂L/∂p|` and its uncertainty, scores
//! each triplet, and on allocation steps zeroes the `E[i]` of the globally lowest-scoring triplets
//! until the budget of the cubic schedule is met. The kept/pruned masks are the `rank_pattern` a
//! saved adapter is cut down with.
//!
//! The trainer's contract, as PEFT's (`update_and_allocate` must run after `optimizer.step()` and
//! before `zero_grad()`):
//! 1. build a [`RankAllocator`] once, from the config and the modules in model order;
//! 2. add [`orthogonal_regularization`] to the loss of every forward that PEFT would add it to;
//! 3. after each optimiser step, call [`RankAllocator::update_and_allocate`] with the 0-based
//!    index of that step (HF Trainer's `state.global_step` as seen by `on_optimizer_step`) and
//!    the (clipped) gradients of the step, then store any returned pattern in the config's
//!    `rank_pattern`.
//!
//! Pruning is only a mask: the optimiser keeps updating a zeroed `E[i]`, so it regrows until the
//! next allocation, which may keep it. After the final allocation (`total_step - tfinal`) the
//! pattern is frozen and re-applied after every step.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{PeftError, Result};
use crate::methods::adalora::AdaLoraConfig;
use crate::train::Gradients;

/// One AdaLoRA module's trainable tensors, in model order (the order PEFT's
/// `model.named_parameters()` visits them).
#[derive(Debug, Clone)]
pub struct AdaLoraModule {
    /// Module path, e.g. `bert.encoder.layer.0.attention.self.query`.
    pub module: String,
    /// `lora_A`, `(r, in_features)`: the right singular vectors.
    pub a: Var,
    /// `lora_E`, `(r, 1)`: the singular values, the only tensor pruning writes.
    pub e: Var,
    /// `lora_B`, `(out_features, r)`: the left singular vectors.
    pub b: Var,
}

impl AdaLoraModule {
    /// The module's parameters in the order PEFT registers them (`lora_A`, `lora_B` come from
    /// `LoraLayer.__init__`, `lora_E` is added after), with their names.
    fn params(&self) -> [(String, &Var); 3] {
        [
            (format!("{}.lora_A", self.module), &self.a),
            (format!("{}.lora_B", self.module), &self.b),
            (format!("{}.lora_E", self.module), &self.e),
        ]
    }

    /// The module's key in `rank_pattern`, as PEFT saves it (adapter name dropped).
    fn rank_key(&self) -> String {
        format!("{}.lora_E", self.module)
    }
}

/// What the allocator remembers of one parameter, to check later calls and restore state.
#[derive(Debug, Clone)]
struct ParamInfo {
    name: String,
    dims: Vec<usize>,
    dtype: DType,
    device: Device,
}

/// PEFT's `exp_avg_ipt` (smoothed sensitivity) and `exp_avg_unc` (its uncertainty) of one
/// parameter.
#[derive(Debug, Clone)]
struct Ema {
    ipt: Tensor,
    unc: Tensor,
}

impl Ema {
    /// PEFT's `update_ipt` for one parameter: `ipt = |p · g|`, then both moving averages, the
    /// uncertainty taken against the already-updated sensitivity. `prev = None` is PEFT's
    /// lazily created zeros.
    fn step(prev: Option<&Ema>, p: &Tensor, grad: &Tensor, beta1: f64, beta2: f64) -> Result<Self> {
        let ipt = p.detach().mul(grad)?.abs()?;
        let (prev_ipt, prev_unc) = match prev {
            Some(e) => (e.ipt.clone(), e.unc.clone()),
            None => (ipt.zeros_like()?, ipt.zeros_like()?),
        };
        let exp_ipt = ((prev_ipt * beta1)? + (&ipt * (1.0 - beta1))?)?;
        let unc = ((prev_unc * beta2)? + ((&ipt - &exp_ipt)?.abs()? * (1.0 - beta2))?)?;
        Ok(Self { ipt: exp_ipt, unc })
    }

    /// PEFT's `_element_score`.
    fn score(&self) -> Result<Tensor> {
        Ok((&self.ipt * &self.unc)?)
    }
}

/// PEFT's `lora_config.rank_pattern` as the allocator holds it: the masks, and the same as CPU
/// `u8` tensors for [`RankAllocator::state`], built when the pattern is set so that reading the
/// state cannot fail.
#[derive(Debug, Clone)]
struct RankPattern {
    masks: BTreeMap<String, Vec<bool>>,
    tensors: Vec<(String, Tensor)>,
}

impl RankPattern {
    fn new(masks: BTreeMap<String, Vec<bool>>) -> Result<Self> {
        let tensors = masks
            .iter()
            .map(|(key, mask)| {
                let flags: Vec<u8> = mask.iter().map(|&k| u8::from(k)).collect();
                let t = Tensor::from_vec(flags, mask.len(), &Device::Cpu)?;
                Ok((format!("{RANK_PATTERN}.{key}"), t))
            })
            .collect::<Result<_>>()?;
        Ok(Self { masks, tensors })
    }
}

/// State-name prefixes of [`RankAllocator::state`].
const EXP_AVG_IPT: &str = "exp_avg_ipt";
const EXP_AVG_UNC: &str = "exp_avg_unc";
const RANK_PATTERN: &str = "rank_pattern";

/// PEFT's AdaLoRA `RankAllocator` plus the step dispatch of `AdaLoraModel.update_and_allocate`.
#[derive(Debug, Clone)]
pub struct RankAllocator {
    tinit: u64,
    tfinal: u64,
    total_step: u64,
    delta_t: u64,
    beta1: f64,
    beta2: f64,
    /// Three per module (`lora_A`, `lora_B`, `lora_E`), modules in model order.
    params: Vec<ParamInfo>,
    /// Ranks at the start: the sum of every module's `r`.
    init_bgt: usize,
    /// `target_r` × number of modules.
    target_bgt: usize,
    /// Parallel to `params`; `None` before the first update and after the final allocation
    /// (PEFT's `reset_ipt`).
    ema: Option<Vec<Ema>>,
    /// PEFT's `lora_config.rank_pattern`: the config's at first, then each allocation's.
    rank_pattern: Option<RankPattern>,
}

impl RankAllocator {
    /// Checks what PEFT checks (`AdaLoraConfig.__post_init__` and the `RankAllocator` asserts,
    /// plus `deltaT > 0`, which PEFT would only find by dividing by zero) and records the
    /// modules, whose ranks set the initial budget as PEFT's `_set_budget_scheduler` does.
    pub fn new(config: &AdaLoraConfig, modules: &[AdaLoraModule]) -> Result<Self> {
        let c = &config.adalora;
        let total_step = match c.total_step {
            Some(total) if total > 0 => total,
            _ => {
                return Err(PeftError::config(
                    "total_step",
                    "AdaLoRA needs the number of training steps; supply a value > 0",
                ));
            }
        };
        // PEFT compares with `total_step - tfinal` in Python integers, where a negative
        // difference also fails; saturating at 0 keeps that.
        if c.tinit >= total_step.saturating_sub(c.tfinal) {
            return Err(PeftError::config(
                "tinit",
                format!(
                    "tinit ({}) must be below total_step - tfinal ({total_step} - {}) so that a \
                     budgeting phase exists; decrease tinit/tfinal or increase total_step",
                    c.tinit, c.tfinal
                ),
            ));
        }
        for (field, beta) in [("beta1", c.beta1), ("beta2", c.beta2)] {
            if !(beta > 0.0 && beta < 1.0) {
                return Err(PeftError::config(
                    field,
                    format!("must be in (0, 1), found {beta}"),
                ));
            }
        }
        if c.delta_t == 0 {
            return Err(PeftError::config(
                "deltaT",
                "must be > 0: allocations happen at steps divisible by deltaT",
            ));
        }
        if modules.is_empty() {
            return Err(PeftError::InvalidOperation(
                "AdaLoRA rank allocation needs at least one AdaLoRA module".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        let mut params = Vec::with_capacity(3 * modules.len());
        let mut init_bgt = 0;
        for m in modules {
            if !seen.insert(m.module.as_str()) {
                return Err(PeftError::InvalidOperation(format!(
                    "AdaLoRA module `{}` is listed twice",
                    m.module
                )));
            }
            init_bgt += check_shapes(m)?;
            params.extend(m.params().into_iter().map(|(name, var)| ParamInfo {
                name,
                dims: var.dims().to_vec(),
                dtype: var.dtype(),
                device: var.device().clone(),
            }));
        }
        let rank_pattern = c
            .rank_pattern
            .as_ref()
            .map(|pattern| {
                pattern
                    .iter()
                    .map(|(key, mask)| {
                        serde_json::from_value::<Vec<bool>>(mask.clone())
                            .map(|mask| (key.clone(), mask))
                            .map_err(|e| PeftError::config("rank_pattern", format!("{key:?}: {e}")))
                    })
                    .collect::<Result<BTreeMap<_, _>>>()
                    .and_then(RankPattern::new)
            })
            .transpose()?;
        Ok(Self {
            tinit: c.tinit,
            tfinal: c.tfinal,
            total_step,
            delta_t: c.delta_t,
            beta1: c.beta1,
            beta2: c.beta2,
            params,
            init_bgt,
            target_bgt: c.target_r as usize * modules.len(),
            ema: None,
            rank_pattern,
        })
    }

    /// PEFT's `budget_schedule`: the total rank allowed at `step` and whether `step` masks.
    /// Full budget up to `tinit`, the target after `total_step - tfinal`, and in between
    /// `int((init - target) · (1 - (step - tinit) / (total - tfinal - tinit))³ + target)`,
    /// masking every `deltaT` steps. Evaluated in f64 with `powf` as Python's `float ** int`
    /// (C `pow`), truncated as Python's `int`.
    pub fn budget(&self, step: u64) -> (usize, bool) {
        if step <= self.tinit {
            (self.init_bgt, false)
        } else if step > self.total_step - self.tfinal {
            (self.target_bgt, true)
        } else {
            let span = (self.total_step - self.tfinal - self.tinit) as f64;
            let mul_coeff = 1.0 - (step - self.tinit) as f64 / span;
            let (init, target) = (self.init_bgt as f64, self.target_bgt as f64);
            // Between `target` and `init`, so never negative: `as` truncates like `int()`.
            let budget = ((init - target) * mul_coeff.powf(3.0) + target) as usize;
            (budget, step.is_multiple_of(self.delta_t))
        }
    }

    /// PEFT's `AdaLoraModel.update_and_allocate(step)`; call after the optimiser step, with that
    /// step's gradients. Before `total_step - tfinal` it updates the importance EMAs and, on
    /// masking steps of the schedule, prunes to the budget; at `total_step - tfinal` it prunes
    /// to the target from the EMAs as they are (no update with this step's gradients) and
    /// forgets them; after it, it re-applies the final pattern. Returns the pattern whenever
    /// PEFT assigns `lora_config.rank_pattern` (keys `"<module>.lora_E"`, one flag per rank).
    pub fn update_and_allocate(
        &mut self,
        step: u64,
        modules: &[AdaLoraModule],
        grads: &Gradients,
    ) -> Result<Option<BTreeMap<String, Vec<bool>>>> {
        self.check_modules(modules)?;
        let end = self.total_step - self.tfinal;
        match step.cmp(&end) {
            Ordering::Less => {
                self.update_ipt(modules, grads)?;
                let (budget, mask) = self.budget(step);
                if !mask {
                    return Ok(None);
                }
                self.allocate(modules, budget).map(Some)
            }
            Ordering::Equal => {
                let (budget, _) = self.budget(step);
                let pattern = self.allocate(modules, budget)?;
                self.ema = None;
                Ok(Some(pattern))
            }
            Ordering::Greater => {
                let pattern = self.rank_pattern.as_ref().ok_or_else(|| {
                    PeftError::InvalidOperation(format!(
                        "AdaLoRA step {step} is after total_step - tfinal ({end}), where the \
                         rank pattern is re-applied, but there is none: the allocation at step \
                         {end} did not run and the config has no rank_pattern"
                    ))
                })?;
                // Every mask is looked up before any is applied, so a pattern that misses a
                // module changes nothing.
                let keeps = modules
                    .iter()
                    .map(|m| {
                        let key = m.rank_key();
                        pattern
                            .masks
                            .get(&key)
                            .ok_or_else(|| PeftError::MissingKey {
                                key,
                                context: "AdaLoRA rank_pattern".into(),
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                for (m, keep) in modules.iter().zip(keeps) {
                    mask_e(m, keep)?;
                }
                Ok(None)
            }
        }
    }

    /// The importance EMAs (`exp_avg_ipt.<param>` and `exp_avg_unc.<param>`, params named
    /// `<module>.lora_{A,B,E}`; none before the first update and after the final allocation)
    /// and the current rank pattern (`rank_pattern.<module>.lora_E`, `u8` flags), which the
    /// steps after `total_step - tfinal` re-apply.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut state = Vec::new();
        if let Some(ema) = &self.ema {
            for (p, e) in self.params.iter().zip(ema) {
                state.push((format!("{EXP_AVG_IPT}.{}", p.name), e.ipt.clone()));
                state.push((format!("{EXP_AVG_UNC}.{}", p.name), e.unc.clone()));
            }
        }
        if let Some(pattern) = &self.rank_pattern {
            state.extend(pattern.tensors.iter().cloned());
        }
        state
    }

    /// Restores what [`Self::state`] gave. The EMAs must be all there (each with its
    /// parameter's shape; moved to its device and dtype) or all absent; the rank pattern is the
    /// one in `tensors`, none if absent. Nothing changes on error.
    pub fn load_state(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        const CONTEXT: &str = "AdaLoRA rank allocator state";
        let mut emas: HashMap<&str, &Tensor> = HashMap::new();
        let mut masks = BTreeMap::new();
        for (key, t) in tensors {
            if let Some(module) = key.strip_prefix(&format!("{RANK_PATTERN}.")) {
                let flags = t
                    .to_dtype(DType::U8)?
                    .to_vec1::<u8>()
                    .map_err(|_| PeftError::shape(key.clone(), &[t.elem_count()], t.dims()))?;
                masks.insert(module.to_string(), flags.iter().map(|&f| f != 0).collect());
            } else if key.starts_with(&format!("{EXP_AVG_IPT}."))
                || key.starts_with(&format!("{EXP_AVG_UNC}."))
            {
                emas.insert(key.as_str(), t);
            } else {
                return Err(PeftError::UnexpectedKey {
                    key: key.clone(),
                    context: CONTEXT.into(),
                });
            }
        }
        let ema = if emas.is_empty() {
            None
        } else {
            let mut ema = Vec::with_capacity(self.params.len());
            for p in &self.params {
                let mut take = |kind: &str| -> Result<Tensor> {
                    let key = format!("{kind}.{}", p.name);
                    let t = emas
                        .remove(key.as_str())
                        .ok_or_else(|| PeftError::MissingKey {
                            key: key.clone(),
                            context: CONTEXT.into(),
                        })?;
                    if t.dims() != p.dims.as_slice() {
                        return Err(PeftError::shape(key, &p.dims, t.dims()));
                    }
                    Ok(t.to_device(&p.device)?.to_dtype(p.dtype)?)
                };
                ema.push(Ema {
                    ipt: take(EXP_AVG_IPT)?,
                    unc: take(EXP_AVG_UNC)?,
                });
            }
            if let Some(key) = emas.keys().min() {
                return Err(PeftError::UnexpectedKey {
                    key: key.to_string(),
                    context: CONTEXT.into(),
                });
            }
            Some(ema)
        };
        let rank_pattern = if masks.is_empty() {
            None
        } else {
            Some(RankPattern::new(masks)?)
        };
        self.ema = ema;
        self.rank_pattern = rank_pattern;
        Ok(())
    }

    /// The modules must be the ones the allocator was built with: the budget and the EMAs are
    /// tied to them.
    fn check_modules(&self, modules: &[AdaLoraModule]) -> Result<()> {
        if 3 * modules.len() != self.params.len() {
            return Err(PeftError::InvalidOperation(format!(
                "the rank allocator was built for {} AdaLoRA modules, got {}",
                self.params.len() / 3,
                modules.len()
            )));
        }
        let given = modules.iter().flat_map(AdaLoraModule::params);
        for (info, (name, var)) in self.params.iter().zip(given) {
            if name != info.name {
                return Err(PeftError::InvalidOperation(format!(
                    "the rank allocator expected `{}` at this position, got `{name}`",
                    info.name
                )));
            }
            if var.dims() != info.dims.as_slice() {
                return Err(PeftError::shape(name, &info.dims, var.dims()));
            }
        }
        Ok(())
    }

    /// PEFT's `update_ipt` over every parameter. A parameter without a gradient is an error,
    /// as PEFT's `p * p.grad` fails on `None`.
    fn update_ipt(&mut self, modules: &[AdaLoraModule], grads: &Gradients) -> Result<()> {
        let mut next = Vec::with_capacity(self.params.len());
        for (i, (name, var)) in modules.iter().flat_map(AdaLoraModule::params).enumerate() {
            let grad = grads
                .get(var.as_tensor())
                .ok_or_else(|| PeftError::MissingKey {
                    key: name.clone(),
                    context: "gradients of the AdaLoRA update: call update_and_allocate after \
                          backward and before the gradients are cleared"
                        .into(),
                })?;
            if grad.dims() != var.dims() {
                return Err(PeftError::shape(
                    format!("gradient of {name}"),
                    var.dims(),
                    grad.dims(),
                ));
            }
            let prev = self.ema.as_ref().map(|e| &e[i]);
            next.push(Ema::step(prev, var, grad, self.beta1, self.beta2)?);
        }
        self.ema = Some(next);
        Ok(())
    }

    /// Prunes to `budget` and makes the result the current pattern.
    fn allocate(
        &mut self,
        modules: &[AdaLoraModule],
        budget: usize,
    ) -> Result<BTreeMap<String, Vec<bool>>> {
        let masks = self.mask_to_budget(modules, budget)?;
        self.rank_pattern = Some(RankPattern::new(masks.clone())?);
        Ok(masks)
    }

    /// PEFT's `mask_to_budget`: scores every triplet, takes `torch.kthvalue` of all scores with
    /// `k = init_bgt - budget` as the threshold, and zeroes `E[i]` wherever the score is
    /// `<= threshold`. Only the k-th value matters, so ties at the threshold are all pruned
    /// (fewer than `budget` ranks may survive). The scores (`init_bgt` values) are read to the
    /// host once: the pattern is needed there anyway, and selecting there avoids device sorts
    /// of arbitrary length.
    fn mask_to_budget(
        &self,
        modules: &[AdaLoraModule],
        budget: usize,
    ) -> Result<BTreeMap<String, Vec<bool>>> {
        let ema = self.ema.as_ref().ok_or_else(|| {
            PeftError::InvalidOperation(
                "AdaLoRA allocation without importance scores: no update ran before this step"
                    .into(),
            )
        })?;
        let scores = ema
            .chunks(3)
            .map(|t| triplet_score(&t[0], &t[1], &t[2]))
            .collect::<Result<Vec<_>>>()?;
        // f64 holds every float dtype exactly, so host comparisons equal device ones.
        let scores = Tensor::cat(&scores, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let k = self
            .init_bgt
            .checked_sub(budget)
            .filter(|k| (1..=scores.len()).contains(k))
            .ok_or_else(|| {
                PeftError::config(
                    "target_r",
                    format!(
                        "a budget of {budget} ranks leaves nothing to prune from {}: target_r \
                         must be below init_r (PEFT's torch.kthvalue fails here too)",
                        self.init_bgt
                    ),
                )
            })?;
        let threshold = kth_smallest(&scores, k);
        let mut pattern = BTreeMap::new();
        let mut offset = 0;
        for m in modules {
            let r = m.e.dim(0)?;
            // `!(score <= threshold)`: NaN scores (and every score if the threshold is NaN) are
            // kept, as with torch's comparison.
            let keep: Vec<bool> = scores[offset..offset + r]
                .iter()
                .map(|s| {
                    !matches!(
                        s.partial_cmp(&threshold),
                        Some(Ordering::Less | Ordering::Equal)
                    )
                })
                .collect();
            mask_e(m, &keep)?;
            pattern.insert(m.rank_key(), keep);
            offset += r;
        }
        Ok(pattern)
    }
}

/// Checks the module's `A (r, in)`, `E (r, 1)`, `B (out, r)` and returns `r`.
fn check_shapes(m: &AdaLoraModule) -> Result<usize> {
    let &[r, _] = m.a.dims() else {
        return Err(PeftError::InvalidOperation(format!(
            "{}.lora_A must be 2-D (r, in_features), found shape {:?}",
            m.module,
            m.a.dims()
        )));
    };
    if m.e.dims() != [r, 1] {
        return Err(PeftError::shape(
            format!("{}.lora_E", m.module),
            &[r, 1],
            m.e.dims(),
        ));
    }
    if !matches!(m.b.dims(), &[_, c] if c == r) {
        let out = m.b.dims().first().copied().unwrap_or(0);
        return Err(PeftError::shape(
            format!("{}.lora_B", m.module),
            &[out, r],
            m.b.dims(),
        ));
    }
    Ok(r)
}

/// Mean over `dim` as torch's CPU `mean`: the sum divided by the count (not multiplied by its
/// reciprocal).
fn mean(t: &Tensor, dim: usize) -> Result<Tensor> {
    let count = Tensor::new(t.dim(dim)? as f64, t.device())?.to_dtype(t.dtype())?;
    Ok(t.sum(dim)?.broadcast_div(&count)?)
}

/// PEFT's triplet score of one module, `(r,)`: `E`'s score plus the row means of `A`'s and the
/// column means of `B`'s, added in PEFT's order (`E + (A + B)`).
fn triplet_score(a: &Ema, b: &Ema, e: &Ema) -> Result<Tensor> {
    let ab = (mean(&a.score()?, 1)? + mean(&b.score()?, 0)?)?;
    Ok((e.score()?.flatten_all()? + ab)?)
}

/// `torch.kthvalue`'s value (1-based `k`, NaN above everything); `k` must be in `1..=len`.
fn kth_smallest(values: &[f64], k: usize) -> f64 {
    let mut values = values.to_vec();
    let nan_last = |a: &f64, b: &f64| {
        a.partial_cmp(b)
            .unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
    };
    *values.select_nth_unstable_by(k - 1, nan_last).1
}

/// Zeroes `E[i]` where `keep[i]` is false, in place (PEFT's `masked_fill_`: the optimiser's
/// state is left as it is).
fn mask_e(m: &AdaLoraModule, keep: &[bool]) -> Result<()> {
    let e = m.e.as_tensor();
    let r = e.dim(0)?;
    if keep.len() != r {
        return Err(PeftError::shape(
            format!("rank pattern of {}", m.rank_key()),
            &[r],
            &[keep.len()],
        ));
    }
    let keep = Tensor::from_vec(
        keep.iter().map(|&k| u8::from(k)).collect::<Vec<_>>(),
        (r, 1),
        e.device(),
    )?;
    let masked = keep.where_cond(&e.detach(), &e.zeros_like()?)?;
    m.e.set(&masked)?;
    Ok(())
}

/// PEFT's orthogonal regularisation (added to the loss in `AdaLoraModel.forward`):
/// `orth_reg_weight · mean(‖A Aᵀ − I‖_F, ‖Bᵀ B − I‖_F over every module)`, summed in model order
/// (each module's A, then its B) and divided by the number of matrices, pruned ranks included.
/// Differentiable; a norm of exactly zero has gradient zero, as torch's `norm`.
pub fn orthogonal_regularization(
    modules: &[AdaLoraModule],
    orth_reg_weight: f64,
) -> Result<Tensor> {
    if orth_reg_weight < 0.0 {
        return Err(PeftError::config(
            "orth_reg_weight",
            format!("must be >= 0, found {orth_reg_weight}"),
        ));
    }
    let first = modules.first().ok_or_else(|| {
        PeftError::InvalidOperation(
            "AdaLoRA orthogonal regularisation needs at least one AdaLoRA module".into(),
        )
    })?;
    let (dtype, device) = (first.a.dtype(), first.a.device());
    let mut total = Tensor::zeros((), dtype, device)?;
    for m in modules {
        let (a, b) = (m.a.as_tensor(), m.b.as_tensor());
        for cov in [a.matmul(&a.t()?)?, b.t()?.matmul(b)?] {
            total = (total + distance_to_identity(&cov)?)?;
        }
    }
    let count = Tensor::new((2 * modules.len()) as f64, device)?.to_dtype(dtype)?;
    Ok((total.broadcast_div(&count)? * orth_reg_weight)?)
}

/// `‖cov − I‖_F` with a zero gradient where it is 0 (`sqrt`'s derivative there is infinite,
/// which would turn the backward pass into NaN for exactly orthonormal factors).
fn distance_to_identity(cov: &Tensor) -> Result<Tensor> {
    let eye = Tensor::eye(cov.dim(0)?, cov.dtype(), cov.device())?;
    let sq = (cov - eye)?.sqr()?.sum_all()?;
    let is_zero = sq.eq(0.0)?;
    let root = is_zero.where_cond(&sq.ones_like()?, &sq)?.sqrt()?;
    Ok(is_zero.where_cond(&sq.zeros_like()?, &root)?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::methods::adalora::AdaLoraFields;

    fn config(init_r: u32, target_r: u32, tinit: u64, tfinal: u64, total: u64) -> AdaLoraConfig {
        AdaLoraConfig {
            adalora: AdaLoraFields {
                init_r,
                target_r,
                tinit,
                tfinal,
                total_step: Some(total),
                beta1: 0.5,
                beta2: 0.5,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn var(data: &[f32], shape: (usize, usize)) -> Result<Var> {
        Ok(Var::from_tensor(&Tensor::from_slice(
            data,
            shape,
            &Device::Cpu,
        )?)?)
    }

    /// A module with `A`, `E`, `B` all ones.
    fn ones(
        name: &str,
        r: usize,
        in_features: usize,
        out_features: usize,
    ) -> Result<AdaLoraModule> {
        let ones = |shape: (usize, usize)| var(&vec![1.0; shape.0 * shape.1], shape);
        Ok(AdaLoraModule {
            module: name.into(),
            a: ones((r, in_features))?,
            e: ones((r, 1))?,
            b: ones((out_features, r))?,
        })
    }

    fn values(v: &Var) -> Result<Vec<f32>> {
        Ok(v.flatten_all()?.to_vec1::<f32>()?)
    }

    fn field(err: PeftError) -> String {
        match err {
            PeftError::InvalidConfig { field, .. } => field,
            other => panic!("expected InvalidConfig, got {other}"),
        }
    }

    /// Two modules (r = 3, 2 → 2) whose parameters are all ones, so `ipt = |grad|`. The
    /// gradients are zero except:
    /// - m0: `E` [4, 0, 2]; `A` row 1 = [2, 2];
    /// - m1: `E` [0, 1, 0]; `B[0, 0]` = 4.
    ///
    /// With β = 0.5, one update gives `exp_avg_ipt = ipt / 2` and `exp_avg_unc = ipt / 4`, an
    /// element score of `ipt² / 8`; a second identical update gives `3 ipt / 4` and `ipt / 4`,
    /// a score of `3 ipt² / 16`. Triplet scores (E + row mean of A + column mean of B) after one
    /// update: m0 [2, 0.5, 0.5], m1 [1, 0.125, 0]; after two: m0 [3, 0.75, 0.75],
    /// m1 [1.5, 0.1875, 0].
    fn two_modules() -> Result<(Vec<AdaLoraModule>, Gradients)> {
        let modules = vec![ones("m0", 3, 2, 2)?, ones("m1", 3, 2, 2)?];
        let mut grads = Gradients::default();
        let g = |data: &[f32], shape: (usize, usize)| Tensor::from_slice(data, shape, &Device::Cpu);
        let (m0, m1) = (&modules[0], &modules[1]);
        grads.insert(&m0.e, g(&[4., 0., 2.], (3, 1))?);
        grads.insert(&m0.a, g(&[0., 0., 2., 2., 0., 0.], (3, 2))?);
        grads.insert(&m0.b, g(&[0.; 6], (2, 3))?);
        grads.insert(&m1.e, g(&[0., 1., 0.], (3, 1))?);
        grads.insert(&m1.a, g(&[0.; 6], (3, 2))?);
        grads.insert(&m1.b, g(&[4., 0., 0., 0., 0., 0.], (2, 3))?);
        Ok((modules, grads))
    }

    fn pattern(entries: &[(&str, &[bool])]) -> BTreeMap<String, Vec<bool>> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn budget_follows_peft_schedule() -> Result<()> {
        // 3 modules, init_r 12, target_r 8: init_bgt 36, target_bgt 24. tinit 2, tfinal 3,
        // total_step 15, deltaT 2: the cubic phase spans 15 - 3 - 2 = 10 steps, and
        // budget = int(12 · (1 - (step - 2) / 10)³ + 24):
        // step 3: 12 · 0.9³ + 24 = 32.748 → 32, 3 % 2 ≠ 0 → no mask
        // step 4: 12 · 0.8³ + 24 = 30.144 → 30, mask
        // step 6: 12 · 0.6³ + 24 = 26.592 → 26, mask
        // step 7: 12 · 0.5³ + 24 = 25.5   → 25, no mask
        // step 11: 12 · 0.1³ + 24 = 24.012 → 24, no mask
        // step 12 = total - tfinal: mul_coeff 0 → 24, mask
        // step ≤ tinit: (36, no mask); step > 12: (24, mask).
        let mut c = config(12, 8, 2, 3, 15);
        c.adalora.delta_t = 2;
        let modules = [
            ones("a", 12, 4, 4)?,
            ones("b", 12, 4, 4)?,
            ones("c", 12, 4, 4)?,
        ];
        let allocator = RankAllocator::new(&c, &modules)?;
        let expected = [
            (0, (36, false)),
            (2, (36, false)),
            (3, (32, false)),
            (4, (30, true)),
            (6, (26, true)),
            (7, (25, false)),
            (11, (24, false)),
            (12, (24, true)),
            (13, (24, true)),
            (100, (24, true)),
        ];
        for (step, budget) in expected {
            assert_eq!(allocator.budget(step), budget, "step {step}");
        }
        Ok(())
    }

    #[test]
    fn new_rejects_what_peft_rejects() -> Result<()> {
        let modules = [ones("m", 3, 2, 2)?];
        let err = |c: &AdaLoraConfig| RankAllocator::new(c, &modules).map(|_| ()).unwrap_err();
        let mut c = config(3, 2, 0, 0, 10);
        c.adalora.total_step = None;
        assert_eq!(field(err(&c)), "total_step");
        c.adalora.total_step = Some(0);
        assert_eq!(field(err(&c)), "total_step");
        assert_eq!(field(err(&config(3, 2, 7, 3, 10))), "tinit");
        assert_eq!(field(err(&config(3, 2, 0, 11, 10))), "tinit");
        let mut c = config(3, 2, 0, 0, 10);
        c.adalora.beta1 = 1.0;
        assert_eq!(field(err(&c)), "beta1");
        let mut c = config(3, 2, 0, 0, 10);
        c.adalora.beta2 = 0.0;
        assert_eq!(field(err(&c)), "beta2");
        let mut c = config(3, 2, 0, 0, 10);
        c.adalora.delta_t = 0;
        assert_eq!(field(err(&c)), "deltaT");
        c.adalora.rank_pattern = Some(
            json!({"m.lora_E": [1, 0]})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
        c.adalora.delta_t = 1;
        assert_eq!(field(err(&c)), "rank_pattern");

        let c = config(3, 2, 0, 0, 10);
        assert!(matches!(
            RankAllocator::new(&c, &[]),
            Err(PeftError::InvalidOperation(_))
        ));
        let mut bad = ones("m", 3, 2, 2)?;
        bad.e = var(&[1.0; 4], (4, 1))?;
        assert!(matches!(
            RankAllocator::new(&c, &[bad]),
            Err(PeftError::ShapeMismatch { .. })
        ));
        Ok(())
    }

    #[test]
    fn final_allocation_masks_lowest_triplets_then_reapplies() -> Result<()> {
        // total_step 1, tinit 0, tfinal 0: step 0 only updates, step 1 = total - tfinal is the
        // final allocation (from step 0's EMAs) with the target budget 2 · 2 = 4 of 6: k = 2,
        // threshold 0.125 → m1's ranks 1 (0.125) and 2 (0) are pruned.
        let (modules, grads) = two_modules()?;
        let mut allocator = RankAllocator::new(&config(3, 2, 0, 0, 1), &modules)?;
        assert_eq!(allocator.update_and_allocate(0, &modules, &grads)?, None);
        assert_eq!(values(&modules[1].e)?, [1., 1., 1.]);

        let expected = pattern(&[
            ("m0.lora_E", &[true; 3]),
            ("m1.lora_E", &[true, false, false]),
        ]);
        assert_eq!(
            allocator.update_and_allocate(1, &modules, &grads)?,
            Some(expected.clone())
        );
        assert_eq!(values(&modules[0].e)?, [1., 1., 1.]);
        assert_eq!(values(&modules[1].e)?, [1., 0., 0.]);
        // PEFT's reset_ipt: only the pattern is left.
        let names: Vec<String> = allocator.state().into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["rank_pattern.m0.lora_E", "rank_pattern.m1.lora_E"]);

        // The optimiser regrows pruned values; each later step masks them again and assigns
        // no new pattern.
        modules[1]
            .e
            .set(&Tensor::new(&[[0.5f32], [0.25], [2.0]], &Device::Cpu)?)?;
        assert_eq!(allocator.update_and_allocate(2, &modules, &grads)?, None);
        assert_eq!(values(&modules[1].e)?, [0.5, 0., 0.]);
        Ok(())
    }

    #[test]
    fn threshold_ties_prune_beyond_the_budget() -> Result<()> {
        // total_step 4, target_r 1: step 1's budget is int(4 · 0.75³ + 2) = int(3.6875) = 3,
        // so k = 3 and the threshold is the 3rd smallest of [3, .75, .75, 1.5, .1875, 0],
        // 0.75, which two triplets share: four are pruned, one more than k.
        let (modules, grads) = two_modules()?;
        let mut allocator = RankAllocator::new(&config(3, 1, 0, 0, 4), &modules)?;
        assert_eq!(allocator.budget(1), (3, true));
        assert_eq!(allocator.update_and_allocate(0, &modules, &grads)?, None);
        let got = allocator.update_and_allocate(1, &modules, &grads)?;
        let expected = pattern(&[
            ("m0.lora_E", &[true, false, false]),
            ("m1.lora_E", &[true, false, false]),
        ]);
        assert_eq!(got, Some(expected));
        assert_eq!(values(&modules[0].e)?, [1., 0., 0.]);

        // The EMAs after two updates: exp_avg_ipt = 3 ipt / 4, exp_avg_unc = ipt / 4.
        let state: HashMap<String, Tensor> = allocator.state().into_iter().collect();
        let read = |k: &str| -> Result<Vec<f32>> { Ok(state[k].flatten_all()?.to_vec1::<f32>()?) };
        assert_eq!(read("exp_avg_ipt.m0.lora_E")?, [3., 0., 1.5]);
        assert_eq!(read("exp_avg_unc.m0.lora_E")?, [1., 0., 0.5]);
        assert_eq!(read("exp_avg_ipt.m1.lora_B")?, [3., 0., 0., 0., 0., 0.]);
        Ok(())
    }

    #[test]
    fn config_rank_pattern_is_applied_after_the_final_step() -> Result<()> {
        let (modules, grads) = two_modules()?;
        let mut c = config(3, 2, 0, 1, 2);
        c.adalora.rank_pattern = json!({
            "m0.lora_E": [true, false, true],
            "m1.lora_E": [false, false, true],
        })
        .as_object()
        .cloned();
        let mut allocator = RankAllocator::new(&c, &modules)?;
        assert_eq!(allocator.update_and_allocate(2, &modules, &grads)?, None);
        assert_eq!(values(&modules[0].e)?, [1., 0., 1.]);
        assert_eq!(values(&modules[1].e)?, [0., 0., 1.]);

        // A module the pattern does not name, and no pattern at all, are errors as in PEFT.
        c.adalora.rank_pattern = json!({"m0.lora_E": [true, true, true]})
            .as_object()
            .cloned();
        let mut allocator = RankAllocator::new(&c, &modules)?;
        assert!(matches!(
            allocator.update_and_allocate(2, &modules, &grads),
            Err(PeftError::MissingKey { key, .. }) if key == "m1.lora_E"
        ));
        c.adalora.rank_pattern = None;
        let mut allocator = RankAllocator::new(&c, &modules)?;
        assert!(matches!(
            allocator.update_and_allocate(2, &modules, &grads),
            Err(PeftError::InvalidOperation(_))
        ));
        Ok(())
    }

    #[test]
    fn allocation_errors() -> Result<()> {
        // target_r = init_r leaves nothing to prune: PEFT's kthvalue(k = 0) fails.
        let (modules, grads) = two_modules()?;
        let mut allocator = RankAllocator::new(&config(3, 3, 0, 0, 1), &modules)?;
        allocator.update_and_allocate(0, &modules, &grads)?;
        let err = allocator
            .update_and_allocate(1, &modules, &grads)
            .unwrap_err();
        assert_eq!(field(err), "target_r");

        // A parameter without a gradient, and modules other than the allocator's.
        let mut allocator = RankAllocator::new(&config(3, 2, 0, 0, 1), &modules)?;
        assert!(matches!(
            allocator.update_and_allocate(0, &modules, &Gradients::default()),
            Err(PeftError::MissingKey { key, .. }) if key == "m0.lora_A"
        ));
        assert!(matches!(
            allocator.update_and_allocate(0, &modules[..1], &grads),
            Err(PeftError::InvalidOperation(_))
        ));
        Ok(())
    }

    /// The values PEFT 0.21's `AdaLoraModel.update_and_allocate` gives on a model with two
    /// modules (`lin0` 3 → 4, `lin1` 4 → 2; init_r 4, target_r 2, tinit 1, tfinal 2, deltaT 2,
    /// total_step 8, default betas) when the parameters and every step's gradients are drawn
    /// from the LCG below and each step first applies `p -= g / 4` (exact in f32, so both sides
    /// see the same parameters). Per step: the pattern PEFT assigns and every `lora_E` after; at
    /// step 5, one parameter's EMAs.
    #[test]
    fn matches_peft_on_fixed_gradients() -> Result<()> {
        let mut state = 7u64;
        let mut fill = |shape: (usize, usize)| -> Result<Tensor> {
            let data: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| {
                    state = (state * 1_103_515_245 + 12_345) % (1 << 31);
                    ((state >> 16) % 15) as f32 / 8.0 - 7.0 / 8.0
                })
                .collect();
            Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
        };
        let mut modules = Vec::new();
        for (name, d_in, d_out) in [("lin0", 3, 4), ("lin1", 4, 2)] {
            let a = Var::from_tensor(&fill((4, d_in))?)?;
            let b = Var::from_tensor(&fill((d_out, 4))?)?;
            let e = Var::from_tensor(&fill((4, 1))?)?;
            modules.push(AdaLoraModule {
                module: name.into(),
                a,
                e,
                b,
            });
        }
        let mut c = config(4, 2, 1, 2, 8);
        (c.adalora.beta1, c.adalora.beta2, c.adalora.delta_t) = (0.85, 0.85, 2);
        let mut allocator = RankAllocator::new(&c, &modules)?;

        const T: bool = true;
        const F: bool = false;
        /// The two modules' pattern, if PEFT assigns one, and their `lora_E` after the step.
        type Step = (Option<[[bool; 4]; 2]>, [[f32; 4]; 2]);
        let expected: [Step; 10] = [
            (
                None,
                [
                    [0.875, -0.3125, 0.0625, 0.25],
                    [-0.0625, -0.46875, -1.0, 0.59375],
                ],
            ),
            (
                None,
                [
                    [0.8125, -0.125, 0.15625, 0.28125],
                    [0.125, -0.28125, -0.78125, 0.75],
                ],
            ),
            (
                Some([[T, T, F, F], [T, T, T, T]]),
                [
                    [0.9375, 0.0625, 0.0, 0.0],
                    [0.25, -0.1875, -0.59375, 0.71875],
                ],
            ),
            (
                None,
                [
                    [0.9375, 0.125, -0.0625, 0.21875],
                    [0.09375, -0.0625, -0.40625, 0.84375],
                ],
            ),
            (
                Some([[T, F, F, F], [T, T, T, F]]),
                [[0.78125, 0.0, 0.0, 0.0], [-0.09375, 0.03125, -0.40625, 0.0]],
            ),
            (
                None,
                [
                    [0.96875, -0.15625, 0.0, -0.125],
                    [-0.21875, -0.09375, -0.5, -0.0625],
                ],
            ),
            (
                Some([[T, F, F, F], [T, T, T, F]]),
                [[0.90625, 0.0, 0.0, 0.0], [-0.34375, 0.03125, -0.28125, 0.0]],
            ),
            (
                None,
                [[0.84375, 0.0, 0.0, 0.0], [-0.3125, -0.15625, -0.21875, 0.0]],
            ),
            (
                None,
                [[0.6875, 0.0, 0.0, 0.0], [-0.125, -0.125, -0.21875, 0.0]],
            ),
            (None, [[0.625, 0.0, 0.0, 0.0], [-0.125, -0.25, -0.25, 0.0]]),
        ];
        for (step, (pattern, e)) in expected.into_iter().enumerate() {
            let mut grads = Gradients::default();
            for m in &modules {
                for (_, var) in m.params() {
                    let g = fill(var.dims2()?)?;
                    var.set(&(var.as_tensor() - (&g * 0.25)?)?)?;
                    grads.insert(var, g);
                }
            }
            let got = allocator.update_and_allocate(step as u64, &modules, &grads)?;
            let want = pattern.map(|[p0, p1]| {
                BTreeMap::from([
                    ("lin0.lora_E".to_string(), p0.to_vec()),
                    ("lin1.lora_E".to_string(), p1.to_vec()),
                ])
            });
            assert_eq!(got, want, "step {step}");
            assert_eq!(values(&modules[0].e)?, e[0], "step {step}");
            assert_eq!(values(&modules[1].e)?, e[1], "step {step}");
            if step == 5 {
                // PEFT's `exp_avg_ipt` / `exp_avg_unc` of `lin1.lora_E` after this update.
                let state: HashMap<String, Tensor> = allocator.state().into_iter().collect();
                for (key, peft) in [
                    (
                        "exp_avg_ipt.lin1.lora_E",
                        [0.051_616_69, 0.062_204_1, 0.188_971_1, 0.131_688_09],
                    ),
                    (
                        "exp_avg_unc.lin1.lora_E",
                        [0.030_258_365, 0.047_960_855, 0.123_880_65, 0.101_939_06],
                    ),
                ] {
                    let ours = state[key].flatten_all()?.to_vec1::<f32>()?;
                    for (x, y) in ours.iter().zip(peft) {
                        assert!((x - y).abs() < 1e-7, "{key}: {ours:?} vs {peft:?}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn state_round_trips() -> Result<()> {
        let c = config(3, 1, 0, 0, 4);
        let (modules, grads) = two_modules()?;
        let mut first = RankAllocator::new(&c, &modules)?;
        first.update_and_allocate(0, &modules, &grads)?;
        let state = first.state();
        assert_eq!(state.len(), 12);

        let (copy, copy_grads) = two_modules()?;
        let mut second = RankAllocator::new(&c, &copy)?;
        second.load_state(&state)?;
        let a = first.update_and_allocate(1, &modules, &grads)?;
        let b = second.update_and_allocate(1, &copy, &copy_grads)?;
        assert!(a.is_some());
        assert_eq!(a, b);
        for ((ka, ta), (kb, tb)) in first.state().iter().zip(second.state().iter()) {
            assert_eq!(ka, kb);
            let diff = (ta.to_dtype(DType::F32)? - tb.to_dtype(DType::F32)?)?
                .abs()?
                .sum_all()?;
            assert_eq!(diff.to_scalar::<f32>()?, 0.0, "{ka}");
        }

        // The pattern survives alone after the final allocation (step 4 = total - tfinal).
        first.update_and_allocate(4, &modules, &grads)?;
        let mut third = RankAllocator::new(&c, &copy)?;
        third.load_state(&first.state())?;
        copy[0]
            .e
            .set(&Tensor::ones((3, 1), DType::F32, &Device::Cpu)?)?;
        third.update_and_allocate(5, &copy, &copy_grads)?;
        assert_eq!(values(&copy[0].e)?, values(&modules[0].e)?);

        // Incomplete, foreign or misshapen state is refused and changes nothing.
        let partial: Vec<_> = state.iter().skip(1).cloned().collect();
        assert!(matches!(
            third.load_state(&partial),
            Err(PeftError::MissingKey { .. })
        ));
        let mut foreign = state.clone();
        foreign.push((
            "momentum.m0.lora_A".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu)?,
        ));
        assert!(matches!(
            third.load_state(&foreign),
            Err(PeftError::UnexpectedKey { .. })
        ));
        let mut misshapen = state.clone();
        misshapen[0].1 = Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?;
        assert!(matches!(
            third.load_state(&misshapen),
            Err(PeftError::ShapeMismatch { .. })
        ));
        assert_eq!(third.state().len(), 2);
        Ok(())
    }

    #[test]
    fn orthogonal_regularization_values_and_gradients() -> Result<()> {
        // m0: A Aᵀ − I = diag(3, 0), norm 3; Bᵀ B − I = diag(1, 0), norm 1. m1 is orthonormal:
        // norms 0. Mean over the 4 matrices: 1; times 0.5.
        let m0 = AdaLoraModule {
            module: "m0".into(),
            a: var(&[2., 0., 0., 1.], (2, 2))?,
            e: var(&[1., 1.], (2, 1))?,
            b: var(&[1., 0., 0., 1., 1., 0.], (3, 2))?,
        };
        let m1 = AdaLoraModule {
            module: "m1".into(),
            a: var(&[1., 0., 0., 0., 1., 0.], (2, 3))?,
            e: var(&[1., 1.], (2, 1))?,
            b: var(&[0., 1., 1., 0., 0., 0.], (3, 2))?,
        };
        let reg = orthogonal_regularization(&[m0, m1.clone()], 0.5)?;
        assert_eq!(reg.to_scalar::<f32>()?, 0.5);

        // Exactly orthonormal factors: zero, with zero (not NaN) gradients.
        let reg = orthogonal_regularization(std::slice::from_ref(&m1), 0.5)?;
        assert_eq!(reg.to_scalar::<f32>()?, 0.0);
        let grads = reg.backward()?;
        for v in [&m1.a, &m1.b] {
            let g = grads
                .get(v)
                .map(|g| g.flatten_all()?.to_vec1::<f32>())
                .transpose()?;
            assert!(g.is_some_and(|g| g.iter().all(|x| *x == 0.0)));
        }

        // A generic module, checked against torch (`AdaLoraModel.forward`'s formula, weight 0.3).
        let m = AdaLoraModule {
            module: "m".into(),
            a: var(&[0.1, -0.2, 0.3, 0.4, 0.5, -0.6], (2, 3))?,
            e: var(&[0., 0.], (2, 1))?,
            b: var(&[0.7, -0.1, 0.2, 0.3, -0.5, 0.9], (3, 2))?,
        };
        let reg = orthogonal_regularization(std::slice::from_ref(&m), 0.3)?;
        assert!((reg.to_scalar::<f32>()? - 0.246_800_5).abs() < 1e-6);
        let grads = reg.backward()?;
        let torch_a = [
            -0.057_308_82,
            0.016_373_95,
            -0.035_896_74,
            -0.036_526_5,
            -0.021_097_2,
            0.020_782_32,
        ];
        let torch_b = [
            -0.046_78,
            -0.135_575_34,
            -0.078_832_96,
            -0.051_544_63,
            -0.131_677,
            0.064_539_05,
        ];
        for (v, expected) in [(&m.a, torch_a), (&m.b, torch_b)] {
            let g = grads
                .get(v)
                .map(|g| g.flatten_all()?.to_vec1::<f32>())
                .transpose()?;
            let g = g.unwrap_or_default();
            assert_eq!(g.len(), 6);
            for (x, y) in g.iter().zip(expected) {
                assert!((x - y).abs() < 1e-6, "{g:?} vs {expected:?}");
            }
        }

        assert_eq!(
            field(orthogonal_regularization(&[m], -1.0).unwrap_err()),
            "orth_reg_weight"
        );
        assert!(matches!(
            orthogonal_regularization(&[], 0.5),
            Err(PeftError::InvalidOperation(_))
        ));
        Ok(())
    }
}
