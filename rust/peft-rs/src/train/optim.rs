//! AdamW with parameter groups, as PyTorch's `torch.optim.AdamW` computes it, and PEFT's
//! LoRA-FA optimiser (`peft.optimizers.LoraFAOptimizer`, transformers' `AdamW` with B's gradient
//! projected); gradient clipping by global norm as `torch.nn.utils.clip_grad_norm_`.

use candle_core::{DType, Tensor, Var};

use crate::error::{PeftError, Result};
use crate::linalg::inverse;
use crate::train::Gradients;

/// One trainable tensor: its PEFT state-dict key and its variable.
#[derive(Debug, Clone)]
pub struct Param {
    pub key: String,
    pub var: Var,
}

/// Parameters sharing a learning rate and weight decay (a PyTorch param group).
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// What the group is, for reports (`"decay"`, `"loraplus_B"`...).
    pub name: String,
    pub params: Vec<Param>,
    /// The learning rate before the schedule's factor.
    pub lr: f64,
    pub weight_decay: f64,
}

/// A LoRA module's `(A, B)` pair as LoRA-FA sees it: A frozen, B's gradient projected with
/// `(A Aᵀ + δI)⁻¹ / scaling²`.
#[derive(Debug, Clone)]
pub struct LoraFaPair {
    pub a: Var,
    /// Index of B in the group's parameters.
    pub b: usize,
    pub scaling: f64,
}

/// Which update rule the optimiser applies.
#[derive(Debug, Clone)]
pub enum Rule {
    /// `torch.optim.AdamW`: decoupled weight decay first, then the bias-corrected Adam step.
    AdamW,
    /// `peft.optimizers.LoraFAOptimizer` (transformers' `AdamW` with `correct_bias`): the step
    /// size carries the bias corrections, weight decay comes after the step; B's gradient of
    /// each pair is projected first.
    LoraFa { pairs: Vec<LoraFaPair> },
}

/// Adam's moving averages of one parameter, and its f32 master copy when the parameter itself
/// is f16/bf16 (updates accumulate in f32 and are rounded once per step).
#[derive(Debug, Clone)]
struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    master: Option<Tensor>,
}

/// AdamW over parameter groups. Moments are kept in f32 (or f64 for f64 parameters), and
/// f16/bf16 parameters have f32 master weights.
#[derive(Debug)]
pub struct AdamW {
    groups: Vec<ParamGroup>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    rule: Rule,
    /// Steps taken (PyTorch's per-parameter `state["step"]`; every parameter steps together).
    step: usize,
    /// Per group, per parameter; `None` until the parameter first gets a gradient.
    moments: Vec<Vec<Option<Moments>>>,
}

impl AdamW {
    pub fn new(groups: Vec<ParamGroup>, betas: (f64, f64), eps: f64, rule: Rule) -> Result<Self> {
        for (what, beta) in [("betas[0]", betas.0), ("betas[1]", betas.1)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(PeftError::config(
                    what,
                    format!("must be in [0, 1), found {beta}"),
                ));
            }
        }
        if eps.is_nan() || eps < 0.0 {
            return Err(PeftError::config(
                "eps",
                format!("must be >= 0, found {eps}"),
            ));
        }
        for g in &groups {
            if [g.lr, g.weight_decay]
                .iter()
                .any(|v| v.is_nan() || *v < 0.0)
            {
                return Err(PeftError::config(
                    "lr",
                    format!(
                        "group {:?}: lr and weight_decay must be >= 0, found {} and {}",
                        g.name, g.lr, g.weight_decay
                    ),
                ));
            }
        }
        let moments = groups.iter().map(|g| vec![None; g.params.len()]).collect();
        Ok(Self {
            groups,
            beta1: betas.0,
            beta2: betas.1,
            eps,
            rule,
            step: 0,
            moments,
        })
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    pub fn step_count(&self) -> usize {
        self.step
    }

    /// One update with every group's learning rate multiplied by `lr_factor` (the schedule's).
    /// Parameters without a gradient are left alone, as in PyTorch.
    pub fn step(&mut self, grads: &Gradients, lr_factor: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bias1 = 1.0 - b1.powi(t);
        let bias2 = 1.0 - b2.powi(t);
        for (gi, group) in self.groups.iter().enumerate() {
            let lr = group.lr * lr_factor;
            for (pi, param) in group.params.iter().enumerate() {
                let projected = match &self.rule {
                    Rule::LoraFa { pairs } if gi == 0 => match pairs.iter().find(|p| p.b == pi) {
                        Some(pair) => grads
                            .get(param.var.as_tensor())
                            .map(|g| project_lora_fa(g, pair))
                            .transpose()?,
                        None => None,
                    },
                    _ => None,
                };
                let Some(grad) = projected.or_else(|| grads.get(param.var.as_tensor()).cloned())
                else {
                    continue;
                };
                let p = &param.var;
                let dtype = moment_dtype(p.dtype());
                let grad = grad.to_dtype(dtype)?;
                if self.moments[gi][pi].is_none() {
                    let master = (p.dtype() != dtype)
                        .then(|| p.as_tensor().to_dtype(dtype))
                        .transpose()?;
                    self.moments[gi][pi] = Some(Moments {
                        exp_avg: grad.zeros_like()?,
                        exp_avg_sq: grad.zeros_like()?,
                        master,
                    });
                }
                let m = self.moments[gi][pi].as_mut().expect("set above");
                m.exp_avg = ((&m.exp_avg * b1)? + (&grad * (1.0 - b1))?)?;
                m.exp_avg_sq = ((&m.exp_avg_sq * b2)? + (grad.sqr()? * (1.0 - b2))?)?;
                let mut value = match &m.master {
                    Some(master) => master.clone(),
                    None => p.as_tensor().to_dtype(dtype)?,
                };
                match self.rule {
                    Rule::AdamW => {
                        if group.weight_decay != 0.0 {
                            value = (value * (1.0 - lr * group.weight_decay))?;
                        }
                        let denom = ((m.exp_avg_sq.sqrt()? / bias2.sqrt())? + self.eps)?;
                        let update = (m.exp_avg.div(&denom)? * (lr / bias1))?;
                        value = (value - update)?;
                    }
                    Rule::LoraFa { .. } => {
                        let denom = (m.exp_avg_sq.sqrt()? + self.eps)?;
                        let step_size = lr * bias2.sqrt() / bias1;
                        value = (value - (m.exp_avg.div(&denom)? * step_size)?)?;
                        if group.weight_decay > 0.0 {
                            value = (&value - (&value * (lr * group.weight_decay))?)?;
                        }
                    }
                }
                p.set(&value.to_dtype(p.dtype())?)?;
                if m.master.is_some() {
                    m.master = Some(value);
                }
            }
        }
        Ok(())
    }

    /// The moments by parameter key (`<key>.exp_avg`, `<key>.exp_avg_sq`, and `<key>.master`
    /// for half-precision parameters), for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (group, moments) in self.groups.iter().zip(&self.moments) {
            for (param, m) in group.params.iter().zip(moments) {
                if let Some(m) = m {
                    out.push((format!("{}.exp_avg", param.key), m.exp_avg.clone()));
                    out.push((format!("{}.exp_avg_sq", param.key), m.exp_avg_sq.clone()));
                    if let Some(master) = &m.master {
                        out.push((format!("{}.master", param.key), master.clone()));
                    }
                }
            }
        }
        out
    }

    /// Restores [`AdamW::state`] and the step count. Every tensor must belong to a parameter of
    /// this optimiser with its shape; a parameter without moments starts fresh (it had no
    /// gradient yet).
    pub fn load_state(&mut self, step: usize, tensors: &[(String, Tensor)]) -> Result<()> {
        let mut fresh: Vec<Vec<Option<Moments>>> = self
            .groups
            .iter()
            .map(|g| vec![None; g.params.len()])
            .collect();
        let mut used = 0;
        for (gi, group) in self.groups.iter().enumerate() {
            for (pi, param) in group.params.iter().enumerate() {
                let find = |suffix: &str| {
                    let key = format!("{}.{suffix}", param.key);
                    tensors.iter().find(|(k, _)| *k == key).map(|(_, t)| t)
                };
                match (find("exp_avg"), find("exp_avg_sq")) {
                    (Some(a), Some(b)) => {
                        for t in [a, b] {
                            if t.dims() != param.var.dims() {
                                return Err(PeftError::shape(
                                    format!("optimizer state of {}", param.key),
                                    param.var.dims(),
                                    t.dims(),
                                ));
                            }
                        }
                        let dtype = moment_dtype(param.var.dtype());
                        let device = param.var.device();
                        let master = match find("master") {
                            Some(t) if dtype != param.var.dtype() => {
                                used += 1;
                                t.to_dtype(dtype)?.to_device(device)?
                            }
                            _ => param.var.as_tensor().to_dtype(dtype)?,
                        };
                        fresh[gi][pi] = Some(Moments {
                            exp_avg: a.to_dtype(dtype)?.to_device(device)?,
                            exp_avg_sq: b.to_dtype(dtype)?.to_device(device)?,
                            master: (dtype != param.var.dtype()).then_some(master),
                        });
                        used += 2;
                    }
                    (None, None) => {}
                    _ => {
                        return Err(PeftError::MissingKey {
                            key: format!("{}.exp_avg / .exp_avg_sq", param.key),
                            context: "optimizer state has one moment without the other".into(),
                        });
                    }
                }
            }
        }
        if used != tensors.len() {
            let unknown = tensors
                .iter()
                .find(|(k, _)| {
                    !self.groups.iter().flat_map(|g| &g.params).any(|p| {
                        ["exp_avg", "exp_avg_sq", "master"]
                            .iter()
                            .any(|s| *k == format!("{}.{s}", p.key))
                    })
                })
                .map(|(k, _)| k.clone())
                .unwrap_or_default();
            return Err(PeftError::UnexpectedKey {
                key: unknown,
                context: "optimizer state for a parameter this trainer does not train".into(),
            });
        }
        self.moments = fresh;
        self.step = step;
        Ok(())
    }
}

fn moment_dtype(param: DType) -> DType {
    if param == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// LoRA-FA's gradient of B: `g (A Aᵀ + 1e-8 I)⁻¹ / scaling²`. PEFT computes it under bf16
/// autocast when the machine supports bf16 (every machine PyTorch runs on the CPU of): the
/// product's inputs and result are rounded to bf16, and so are they here.
fn project_lora_fa(grad: &Tensor, pair: &LoraFaPair) -> Result<Tensor> {
    let a = pair.a.as_tensor().to_dtype(DType::F32)?;
    let r = a.dim(0)?;
    let gram = a.matmul(&a.t()?)?;
    let eye = Tensor::eye(r, DType::F32, a.device())?;
    let reg = (gram + (eye * 1e-8)?)?;
    let inv = inverse(&reg.unsqueeze(0)?)?.squeeze(0)?;
    let bf = |t: &Tensor| t.to_dtype(DType::BF16);
    let product = bf(grad)?
        .to_dtype(DType::F32)?
        .matmul(&bf(&inv)?.to_dtype(DType::F32)?)?;
    let scaled = (bf(&product)?.to_dtype(DType::F32)? * (1.0 / (pair.scaling * pair.scaling)))?;
    Ok(bf(&scaled)?.to_dtype(grad.dtype())?)
}

/// `torch.nn.utils.clip_grad_norm_`: scales every gradient by `max_norm / (total + 1e-6)` when
/// that is below 1, with `total` the 2-norm of all gradients together; returns `total`.
pub fn clip_grad_norm(grads: &mut Gradients, params: &[&Tensor], max_norm: f64) -> Result<f64> {
    let total = grad_norm(grads, params)?;
    let coef = (max_norm / (total + 1e-6)).min(1.0);
    if coef < 1.0 {
        for p in params {
            if let Some(g) = grads.get(p) {
                let scaled = (g * coef)?;
                grads.insert(p, scaled);
            }
        }
    }
    Ok(total)
}

/// The 2-norm of every gradient together, summed on the device and read once.
pub fn grad_norm(grads: &Gradients, params: &[&Tensor]) -> Result<f64> {
    let mut sum: Option<Tensor> = None;
    for g in params.iter().filter_map(|p| grads.get(p)) {
        let sq = g.to_dtype(DType::F64)?.sqr()?.sum_all()?;
        sum = Some(match sum {
            Some(s) => (s + sq)?,
            None => sq,
        });
    }
    Ok(match sum {
        Some(s) => s.to_scalar::<f64>()?.sqrt(),
        None => 0.0,
    })
}
