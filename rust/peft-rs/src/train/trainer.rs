//! [`Trainer`]: trains one adapter of a [`PeftModel`] with the optimiser PEFT users build
//! (AdamW; LoRA+ or LoRA-FA groups), transformers' schedules, clipping, accumulation, AdaLoRA's
//! rank allocation, and checkpoints that resume on the same trajectory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::base::ModuleKind;
use crate::config::PeftConfig;
use crate::error::{PeftError, Result};
use crate::methods::adalora::{ADALORA_A, ADALORA_B, ADALORA_E, AdaLoraConfig};
use crate::methods::lora::LoraConfig;
use crate::model::{ModelInput, PeftModel, TrainableParam};
use crate::rng::{DropoutRng, permutation};
use crate::train::Gradients;
use crate::train::adalora::{AdaLoraModule, RankAllocator, orthogonal_regularization};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::loss::Task;
use crate::train::optim::{AdamW, LoraFaPair, Param, ParamGroup, Rule, clip_grad_norm, grad_norm};
use crate::train::schedule::{Schedule, ScheduleKind};

/// LoRA+ (`peft.optimizers.create_loraplus_optimizer`): B matrices (and 1-D tensors) learn
/// `lr_ratio` times faster, LoRA embedding layers at `lr_embedding`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraPlus {
    pub lr_ratio: f64,
    pub lr_embedding: f64,
    /// PEFT's `loraplus_weight_decay` (its groups' decay; the trainer's is not used).
    pub weight_decay: f64,
}

/// How to train: transformers' `TrainingArguments` names where they exist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerOptions {
    pub lr: f64,
    /// Decoupled weight decay, on every tensor but biases (transformers' default grouping).
    pub weight_decay: f64,
    pub betas: (f64, f64),
    /// `None`: the optimiser's default (1e-8 for AdamW, 1e-6 for LoRA-FA, as PyTorch and PEFT).
    pub eps: Option<f64>,
    pub schedule: ScheduleKind,
    pub warmup_steps: usize,
    /// Optimiser steps the schedule spans (required by the decaying schedules and AdaLoRA).
    pub total_steps: Option<usize>,
    /// Clip the gradients' global norm to this (transformers' `max_grad_norm`).
    pub max_grad_norm: Option<f64>,
    /// Micro-batches per optimiser step: a step's batch is split into this many parts whose
    /// gradients add up to exactly the whole batch's.
    pub accumulation_steps: usize,
    pub loraplus: Option<LoraPlus>,
    /// LoRA-FA (`peft.optimizers.create_lorafa_optimizer`): A frozen, B's gradient projected.
    pub lora_fa: bool,
    /// Seeds the dropout stream and the data order.
    pub seed: u64,
}

impl Default for TrainerOptions {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: None,
            schedule: ScheduleKind::Linear,
            warmup_steps: 0,
            total_steps: None,
            max_grad_norm: Some(1.0),
            accumulation_steps: 1,
            loraplus: None,
            lora_fa: false,
            seed: 0,
        }
    }
}

/// One batch: the model's input and transformers' `labels` (`(batch,)` class ids for sequence
/// classification, `(batch, seq)` token ids with `-100` ignored for causal LMs).
#[derive(Debug, Clone)]
pub struct Batch {
    pub input: ModelInput,
    pub labels: Tensor,
}

impl Batch {
    /// Rows, after checking that the masks match the ids and the labels have one entry per row
    /// (sequence classification) or per token (causal LM).
    fn rows(&self) -> Result<usize> {
        let ids = self.input.input_ids.dims();
        if ids.len() != 2 {
            return Err(PeftError::shape("input_ids (batch, seq)", &[0, 0], ids));
        }
        for (what, t) in [
            ("attention_mask", &self.input.attention_mask),
            ("token_type_ids", &self.input.token_type_ids),
        ] {
            if let Some(t) = t
                && t.dims() != ids
            {
                return Err(PeftError::shape(what, ids, t.dims()));
            }
        }
        let labels = self.labels.dims();
        if labels.first() != Some(&ids[0])
            || (labels.len() == 2 && labels != ids)
            || labels.len() > 2
        {
            let expected: &[usize] = if labels.len() == 2 { ids } else { &ids[..1] };
            return Err(PeftError::shape("labels", expected, labels));
        }
        Ok(ids[0])
    }

    /// Rows `start..start + len`.
    fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        let cut = |t: &Tensor| t.narrow(0, start, len);
        Ok(Self {
            input: ModelInput {
                input_ids: cut(&self.input.input_ids)?,
                attention_mask: self.input.attention_mask.as_ref().map(cut).transpose()?,
                token_type_ids: self.input.token_type_ids.as_ref().map(cut).transpose()?,
            },
            labels: cut(&self.labels)?,
        })
    }

    /// Without the trailing columns that are padding in every row (`attention_mask` 0): with
    /// right padding the real tokens' outputs do not depend on them, and a batch of short
    /// texts padded for the longest text of the whole dataset runs much faster.
    fn without_trailing_padding(self) -> Result<Self> {
        let Some(mask) = &self.input.attention_mask else {
            return Ok(self);
        };
        let seq = mask.dim(1)?;
        let used = mask
            .to_dtype(DType::F32)?
            .abs()?
            .max(0)?
            .to_vec1::<f32>()?
            .iter()
            .rposition(|v| *v != 0.0)
            .map_or(0, |last| last + 1);
        if used == seq || used == 0 {
            return Ok(self);
        }
        // Token labels on the dropped positions must carry no loss.
        if self.labels.rank() == 2 {
            let dropped = self
                .labels
                .narrow(1, used, seq - used)?
                .to_dtype(DType::I64)?;
            let ignored = dropped.flatten_all()?.to_vec1::<i64>()?;
            if ignored
                .iter()
                .any(|l| *l != crate::train::loss::IGNORE_INDEX)
            {
                return Ok(self);
            }
        }
        let cut = |t: &Tensor| t.narrow(1, 0, used);
        Ok(Self {
            input: ModelInput {
                input_ids: cut(&self.input.input_ids)?,
                attention_mask: Some(cut(mask)?),
                token_type_ids: self.input.token_type_ids.as_ref().map(cut).transpose()?,
            },
            labels: if self.labels.rank() == 2 {
                cut(&self.labels)?
            } else {
                self.labels
            },
        })
    }

    /// The rows `idx`, in that order.
    fn select(&self, idx: &[u32]) -> Result<Self> {
        let idx = Tensor::new(idx, self.input.input_ids.device())?;
        let pick = |t: &Tensor| t.index_select(&idx, 0);
        Ok(Self {
            input: ModelInput {
                input_ids: pick(&self.input.input_ids)?,
                attention_mask: self.input.attention_mask.as_ref().map(pick).transpose()?,
                token_type_ids: self.input.token_type_ids.as_ref().map(pick).transpose()?,
            },
            labels: pick(&self.labels)?,
        })
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Optimiser steps done, this one included.
    pub step: usize,
    /// The batch's mean loss (with AdaLoRA's orthogonal regularisation, as PEFT reports it).
    pub loss: f64,
    /// The learning rate of the base group at this step.
    pub lr: f64,
    /// The gradients' global norm before clipping.
    pub grad_norm: f64,
    pub examples: usize,
    /// The epoch (from 0) when training with [`Trainer::fit`].
    pub epoch: usize,
    pub seconds: f64,
}

/// A run of [`Trainer::fit_step`]s ([`Trainer::start_fit`]).
#[derive(Debug, Clone)]
pub struct Fit<'a> {
    data: &'a Batch,
    epochs: usize,
    batch_size: usize,
    checkpoints: Option<CheckpointPlan>,
}

/// Where [`Trainer::fit`] writes checkpoints: `dir/checkpoint-<step>` every `every` steps (if
/// set) and at the end.
#[derive(Debug, Clone)]
pub struct CheckpointPlan {
    pub dir: PathBuf,
    pub every: Option<usize>,
}

/// Trains one adapter of a [`PeftModel`]. The model is passed to each call rather than owned,
/// so the same model serves inference between steps; the trainer checks every step that the
/// adapter's tensors are still the ones it optimises.
pub struct Trainer {
    adapter: String,
    task: Task,
    options: TrainerOptions,
    schedule: Schedule,
    optimizer: AdamW,
    /// The tensors that train, in model order.
    params: Vec<TrainableParam>,
    allocator: Option<(RankAllocator, AdaLoraConfig)>,
    rng: Arc<DropoutRng>,
    step: usize,
    /// Position in [`Trainer::fit`]'s data: (epoch, batches done in it).
    position: (usize, usize),
    /// Identifies the data a [`Trainer::fit`] ran on (a resumed run must use the same).
    data_fingerprint: Option<String>,
}

impl Trainer {
    /// A trainer for `adapter` (default: the model's only active adapter).
    pub fn new(
        model: &mut PeftModel,
        adapter: Option<&str>,
        options: TrainerOptions,
    ) -> Result<Self> {
        let adapter = match adapter {
            Some(a) => a.to_string(),
            None => match model.active_adapters() {
                [one] => one.clone(),
                [] => {
                    return Err(PeftError::InvalidOperation(
                        "the model has no active adapter to train".into(),
                    ));
                }
                several => {
                    return Err(PeftError::InvalidOperation(format!(
                        "several adapters are active ({several:?}); name the one to train"
                    )));
                }
            },
        };
        let config = model.config(&adapter)?.clone();
        if !model.active_adapters().contains(&adapter) {
            return Err(PeftError::InvalidOperation(format!(
                "adapter {adapter:?} is not active; activate it with set_adapter before training"
            )));
        }
        if model.is_merged() {
            return Err(PeftError::InvalidOperation(
                "the model has merged adapters; unmerge them before training".into(),
            ));
        }
        let task = Task::for_architecture(model.model().architecture())?;
        if options.accumulation_steps == 0 {
            return Err(PeftError::config(
                "accumulation_steps",
                "must be >= 1, found 0",
            ));
        }
        if let Some(norm) = options.max_grad_norm
            && (norm.is_nan() || norm <= 0.0)
        {
            return Err(PeftError::config(
                "max_grad_norm",
                format!("must be > 0 (or None to not clip), found {norm}"),
            ));
        }
        if options.lora_fa && options.loraplus.is_some() {
            return Err(PeftError::config(
                "lora_fa",
                "LoRA-FA and LoRA+ build different optimisers; choose one",
            ));
        }
        if let Some(plus) = options.loraplus
            && (plus.lr_ratio.is_nan() || plus.lr_ratio < 1.0)
        {
            return Err(PeftError::config(
                "loraplus_lr_ratio",
                format!(
                    "must be >= 1 (B learns faster than A), found {}",
                    plus.lr_ratio
                ),
            ));
        }
        let schedule = Schedule::new(options.schedule, options.warmup_steps, options.total_steps)?;
        if options.lora_fa {
            check_lora_fa(model, &adapter, &config)?;
            model.set_frozen(&adapter, Some("lora_A.weight"), true)?;
        }
        let params: Vec<TrainableParam> = model
            .trainable_parameters(&adapter)?
            .into_iter()
            .filter(|p| !p.frozen)
            .collect();
        if params.is_empty() {
            return Err(PeftError::InvalidOperation(format!(
                "adapter {adapter:?} has no trainable tensor (all frozen)"
            )));
        }
        let allocator = adalora_allocator(&config, &params, options.total_steps)?;
        let (groups, rule, eps) = optimizer_groups(model, &adapter, &config, &params, &options)?;
        let optimizer = AdamW::new(groups, options.betas, options.eps.unwrap_or(eps), rule)?;
        Ok(Self {
            adapter,
            task,
            rng: Arc::new(DropoutRng::new(options.seed)),
            options,
            schedule,
            optimizer,
            params,
            allocator,
            step: 0,
            position: (0, 0),
            data_fingerprint: None,
        })
    }

    pub fn adapter_name(&self) -> &str {
        &self.adapter
    }

    pub fn options(&self) -> &TrainerOptions {
        &self.options
    }

    /// Optimiser steps done.
    pub fn global_step(&self) -> usize {
        self.step
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The base learning rate at the next step (`lr` times the schedule's factor).
    pub fn learning_rate(&self) -> f64 {
        self.options.lr * self.schedule.factor(self.step)
    }

    /// One optimiser step on `batch` (split into `accumulation_steps` micro-batches).
    pub fn step(&mut self, model: &mut PeftModel, batch: &Batch) -> Result<StepStats> {
        let start = Instant::now();
        self.check_model(model)?;
        let rows = batch.rows()?;
        let parts = self.options.accumulation_steps;
        if rows < parts {
            return Err(PeftError::InvalidOperation(format!(
                "a batch of {rows} rows cannot be split into accumulation_steps={parts} micro-batches"
            )));
        }
        let (loss, mut grads) =
            self.with_training(model, |t, m| t.loss_and_grads(m, batch, parts))?;
        let tensors: Vec<&Tensor> = self.params.iter().map(|p| p.var.as_tensor()).collect();
        let norm = match self.options.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, &tensors, max)?,
            None => grad_norm(&grads, &tensors)?,
        };
        let lr = self.learning_rate();
        self.optimizer
            .step(&grads, self.schedule.factor(self.step))?;
        if let Some((allocator, config)) = &mut self.allocator {
            let modules = adalora_modules(&self.params)?;
            if let Some(pattern) =
                allocator.update_and_allocate(self.step as u64, &modules, &grads)?
            {
                let mut json = config.adalora.rank_pattern.take().unwrap_or_default();
                json.clear();
                for (k, v) in pattern {
                    json.insert(k, serde_json::Value::from(v));
                }
                config.adalora.rank_pattern = Some(json);
                let mut value = model.config(&self.adapter)?.to_json();
                value["rank_pattern"] = serde_json::Value::Object(
                    config.adalora.rank_pattern.clone().unwrap_or_default(),
                );
                model.replace_config(&self.adapter, PeftConfig::from_json(value)?)?;
            }
        }
        self.step += 1;
        Ok(StepStats {
            step: self.step,
            loss,
            lr,
            grad_norm: norm,
            examples: rows,
            epoch: self.position.0,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// The batch's mean loss in eval mode (no dropout), as the training step reports it.
    pub fn evaluate_loss(&self, model: &PeftModel, batch: &Batch) -> Result<f64> {
        crate::params::no_grad(|| self.loss_without_grad(model, batch))
    }

    fn loss_without_grad(&self, model: &PeftModel, batch: &Batch) -> Result<f64> {
        batch.rows()?;
        let (sum, count) = self
            .task
            .loss_sum(&model.forward(&batch.input)?, &batch.labels)?;
        let mut loss = sum.to_dtype(DType::F64)?.to_scalar::<f64>()? / count.max(1) as f64;
        if let Some((_, config)) = &self.allocator {
            let modules = adalora_modules(&self.params)?;
            loss += orthogonal_regularization(&modules, config.adalora.orth_reg_weight)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(loss)
    }

    /// The loss of `batch` and its gradient for every trainable tensor (by PEFT key), in
    /// training mode, without updating anything: what a gradient check compares.
    pub fn gradients(
        &self,
        model: &PeftModel,
        batch: &Batch,
    ) -> Result<(f64, Vec<(String, Tensor)>)> {
        self.check_model(model)?;
        let (loss, grads) = self.with_training(model, |t, m| t.loss_and_grads(m, batch, 1))?;
        let out = self
            .params
            .iter()
            .filter_map(|p| {
                grads
                    .get(p.var.as_tensor())
                    .map(|g| (p.key.clone(), g.clone()))
            })
            .collect();
        Ok((loss, out))
    }

    fn with_training<T>(
        &self,
        model: &PeftModel,
        f: impl FnOnce(&Self, &PeftModel) -> Result<T>,
    ) -> Result<T> {
        model.set_training(true, &self.rng);
        let out = f(self, model);
        model.set_training(false, &self.rng);
        out
    }

    /// The mean loss over `batch` and its summed gradients, from `parts` micro-batches. Each
    /// micro-batch's loss sum is divided by the whole batch's item count, so the gradients add
    /// up to the whole batch's exactly; AdaLoRA's regulariser is added once per micro-batch
    /// divided by `parts`, as transformers' accumulation does with PEFT's per-forward term.
    fn loss_and_grads(
        &self,
        model: &PeftModel,
        batch: &Batch,
        parts: usize,
    ) -> Result<(f64, Gradients)> {
        let rows = batch.rows()?;
        let total = self.task.count(&batch.labels)?.max(1) as f64;
        let mut grads = Gradients::default();
        let mut loss = 0f64;
        let mut start = 0;
        for part in 0..parts {
            let len = rows / parts + usize::from(part < rows % parts);
            let micro = batch.narrow(start, len)?;
            start += len;
            let (sum, _) = self
                .task
                .loss_sum(&model.forward(&micro.input)?, &micro.labels)?;
            let mut objective = (sum / total)?;
            if let Some((_, config)) = &self.allocator {
                let modules = adalora_modules(&self.params)?;
                let reg = orthogonal_regularization(&modules, config.adalora.orth_reg_weight)?;
                objective = objective.add(&(reg.to_dtype(DType::F32)? / parts as f64)?)?;
            }
            loss += objective.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let store = objective.backward()?;
            for p in &self.params {
                if let Some(g) = store.get(p.var.as_tensor()) {
                    let sum = match grads.get(p.var.as_tensor()) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    grads.insert(p.var.as_tensor(), sum);
                }
            }
        }
        Ok((loss, grads))
    }

    /// The adapter's tensors must still be the variables this trainer optimises: a hot swap,
    /// reload or delete replaces them, and training on would update tensors the model no
    /// longer uses.
    fn check_model(&self, model: &PeftModel) -> Result<()> {
        if model.is_merged() {
            return Err(PeftError::InvalidOperation(
                "the model has merged adapters; unmerge them before training".into(),
            ));
        }
        let current = model.trainable_parameters(&self.adapter)?;
        let same = self.params.iter().all(|p| {
            current
                .iter()
                .any(|c| c.key == p.key && c.var.as_tensor().id() == p.var.as_tensor().id())
        });
        if !same {
            return Err(PeftError::InvalidOperation(format!(
                "adapter {:?} was replaced or reloaded since this trainer was made; make a new trainer",
                self.adapter
            )));
        }
        Ok(())
    }

    /// Trains for `epochs` over `data` in batches of `batch_size`, in an order drawn per epoch
    /// from the seed. Continues from the position a loaded checkpoint recorded. `on_step` runs
    /// after every step; an error from it stops training (checkpoints written stay intact).
    pub fn fit(
        &mut self,
        model: &mut PeftModel,
        data: &Batch,
        epochs: usize,
        batch_size: usize,
        checkpoints: Option<&CheckpointPlan>,
        on_step: &mut dyn FnMut(&StepStats) -> Result<()>,
    ) -> Result<Vec<StepStats>> {
        let fit = self.start_fit(data, epochs, batch_size, checkpoints.cloned())?;
        let mut history = Vec::new();
        while let Some(stats) = self.fit_step(model, &fit)? {
            history.push(stats);
            on_step(&stats)?;
        }
        Ok(history)
    }

    /// Checks a run of [`Trainer::fit_step`] over `data` (the same data and batch size as the
    /// checkpoint it resumes, if any) and describes it.
    pub fn start_fit<'a>(
        &mut self,
        data: &'a Batch,
        epochs: usize,
        batch_size: usize,
        checkpoints: Option<CheckpointPlan>,
    ) -> Result<Fit<'a>> {
        if batch_size == 0 {
            return Err(PeftError::config("batch_size", "must be >= 1, found 0"));
        }
        if checkpoints.as_ref().is_some_and(|p| p.every == Some(0)) {
            return Err(PeftError::config("save_every", "must be >= 1, found 0"));
        }
        let rows = data.rows()?;
        if rows == 0 {
            return Err(PeftError::InvalidOperation("no training examples".into()));
        }
        let fingerprint = checkpoint::fingerprint(data, batch_size)?;
        match &self.data_fingerprint {
            Some(f) if *f != fingerprint => {
                return Err(PeftError::InvalidOperation(
                    "the checkpoint was made on other data or another batch size; resume with the same data and batch size".into(),
                ));
            }
            _ => self.data_fingerprint = Some(fingerprint),
        }
        Ok(Fit {
            data,
            epochs,
            batch_size,
            checkpoints,
        })
    }

    /// The next step of `fit` (the batch at the trainer's data position), with its checkpoint
    /// when one is due; `None` once every epoch is done (after writing the final checkpoint).
    /// The model is free between steps, for evaluation or saving.
    pub fn fit_step(&mut self, model: &mut PeftModel, fit: &Fit<'_>) -> Result<Option<StepStats>> {
        let rows = fit.data.rows()?;
        let per_epoch = rows.div_ceil(fit.batch_size);
        let (epoch, done) = self.position;
        if epoch >= fit.epochs {
            if let Some(plan) = &fit.checkpoints {
                let last = plan.dir.join(format!("checkpoint-{}", self.step));
                if !last.exists() {
                    self.save_checkpoint(model, &last)?;
                }
            }
            return Ok(None);
        }
        let order = permutation(rows, self.options.seed, epoch as u64);
        let idx: Vec<u32> = order[done * fit.batch_size..((done + 1) * fit.batch_size).min(rows)]
            .iter()
            .map(|&i| i as u32)
            .collect();
        let batch = fit.data.select(&idx)?.without_trailing_padding()?;
        let mut stats = self.step(model, &batch)?;
        stats.epoch = epoch;
        self.position = if done + 1 == per_epoch {
            (epoch + 1, 0)
        } else {
            (epoch, done + 1)
        };
        if let Some(plan) = &fit.checkpoints
            && plan.every.is_some_and(|n| self.step.is_multiple_of(n))
        {
            self.save_checkpoint(model, &plan.dir.join(format!("checkpoint-{}", self.step)))?;
        }
        Ok(Some(stats))
    }

    /// Writes a checkpoint directory atomically: the adapter as PEFT saves it (loadable by
    /// `PeftModel.from_pretrained`), plus the full trainable tensors, optimiser moments,
    /// allocator state and `trainer_state.json` (step, data position, dropout stream).
    pub fn save_checkpoint(&self, model: &PeftModel, dir: &Path) -> Result<PathBuf> {
        let mut tensors: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|p| (format!("param.{}", p.key), p.var.as_tensor().clone()))
            .collect();
        tensors.extend(
            self.optimizer
                .state()
                .into_iter()
                .map(|(k, t)| (format!("optimizer.{k}"), t)),
        );
        if let Some((allocator, _)) = &self.allocator {
            tensors.extend(
                allocator
                    .state()
                    .into_iter()
                    .map(|(k, t)| (format!("rank_allocator.{k}"), t)),
            );
        }
        let state = TrainerState {
            global_step: self.step,
            optimizer_step: self.optimizer.step_count(),
            epoch: self.position.0,
            batches_done: self.position.1,
            rng_seed: self.rng.seed(),
            rng_position: self.rng.position(),
            adapter_name: self.adapter.clone(),
            options: self.options.clone(),
            data_fingerprint: self.data_fingerprint.clone(),
            adapter_config: model.config(&self.adapter)?.to_json(),
        };
        checkpoint::write(dir, &state, &tensors, |staging| {
            model.save_pretrained(staging, Some(&[self.adapter.as_str()]))?;
            Ok(())
        })?;
        Ok(dir.to_path_buf())
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`] with the same options:
    /// the adapter's tensors, optimiser, schedule position, dropout stream, data position and
    /// (AdaLoRA) allocator state and rank pattern. Everything is checked before anything is
    /// written.
    pub fn load_checkpoint(&mut self, model: &mut PeftModel, dir: &Path) -> Result<()> {
        self.check_model(model)?;
        let (state, tensors) = checkpoint::read(dir)?;
        if state.adapter_name != self.adapter {
            return Err(PeftError::InvalidOperation(format!(
                "{} trains adapter {:?}, this trainer {:?}",
                dir.display(),
                state.adapter_name,
                self.adapter
            )));
        }
        checkpoint::check_options(&state.options, &self.options)?;
        let mut params = Vec::new();
        let mut moments = Vec::new();
        let mut allocator_state = Vec::new();
        for (key, t) in tensors {
            if let Some(k) = key.strip_prefix("param.") {
                params.push((k.to_string(), t));
            } else if let Some(k) = key.strip_prefix("optimizer.") {
                moments.push((k.to_string(), t));
            } else if let Some(k) = key.strip_prefix("rank_allocator.") {
                allocator_state.push((k.to_string(), t));
            } else {
                return Err(PeftError::UnexpectedKey {
                    key,
                    context: format!("{}: not a trainer checkpoint tensor", dir.display()),
                });
            }
        }
        let mut staged = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let t = params
                .iter()
                .find(|(k, _)| *k == p.key)
                .map(|(_, t)| t)
                .ok_or_else(|| PeftError::MissingKey {
                    key: p.key.clone(),
                    context: format!("{}: checkpoint of the trained tensors", dir.display()),
                })?;
            if t.dims() != p.var.dims() {
                return Err(PeftError::shape(
                    format!("{} (checkpoint)", p.key),
                    p.var.dims(),
                    t.dims(),
                ));
            }
            staged.push(t.to_dtype(p.var.dtype())?.to_device(p.var.device())?);
        }
        if let Some((k, _)) = params
            .iter()
            .find(|(k, _)| !self.params.iter().any(|p| p.key == *k))
        {
            return Err(PeftError::UnexpectedKey {
                key: k.clone(),
                context: format!("{}: a tensor this trainer does not train", dir.display()),
            });
        }
        self.optimizer.load_state(state.optimizer_step, &moments)?;
        if let Some((allocator, config)) = &mut self.allocator {
            allocator.load_state(&allocator_state)?;
            let restored = PeftConfig::from_json(state.adapter_config.clone())?;
            *config = AdaLoraConfig::from_json(restored.to_json())?;
            model.replace_config(&self.adapter, restored)?;
        }
        for (p, t) in self.params.iter().zip(staged) {
            p.var.set(&t)?;
        }
        self.step = state.global_step;
        self.position = (state.epoch, state.batches_done);
        self.rng = Arc::new(DropoutRng::new(state.rng_seed));
        self.rng.set_position(state.rng_position);
        self.data_fingerprint = state.data_fingerprint;
        Ok(())
    }
}

/// The allocator of an AdaLoRA adapter, which needs `total_step` equal to the trainer's.
fn adalora_allocator(
    config: &PeftConfig,
    params: &[TrainableParam],
    total_steps: Option<usize>,
) -> Result<Option<(RankAllocator, AdaLoraConfig)>> {
    if config.peft_type() != "ADALORA" {
        return Ok(None);
    }
    let adalora = AdaLoraConfig::from_json(config.to_json())?;
    let configured = adalora.adalora.total_step;
    if let (Some(c), Some(t)) = (configured, total_steps)
        && c as usize != t
    {
        return Err(PeftError::config(
            "total_step",
            format!(
                "AdaLoRA's budget schedule spans total_step={c} steps but the trainer runs total_steps={t}"
            ),
        ));
    }
    let allocator = RankAllocator::new(&adalora, &adalora_modules(params)?)?;
    Ok(Some((allocator, adalora)))
}

/// The AdaLoRA modules among `params`, in model order.
fn adalora_modules(params: &[TrainableParam]) -> Result<Vec<AdaLoraModule>> {
    let mut modules: Vec<AdaLoraModule> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for p in params.iter().filter(|p| !p.is_copy) {
        if seen.contains(&p.module.as_str()) {
            continue;
        }
        seen.push(&p.module);
        let find = |name: &str| {
            params
                .iter()
                .find(|q| q.module == p.module && q.name == name)
                .map(|q| q.var.clone())
                .ok_or_else(|| PeftError::MissingKey {
                    key: format!("{}.{name}", p.module),
                    context: "AdaLoRA module tensors".into(),
                })
        };
        modules.push(AdaLoraModule {
            module: p.module.clone(),
            a: find(ADALORA_A)?,
            e: find(ADALORA_E)?,
            b: find(ADALORA_B)?,
        });
    }
    Ok(modules)
}

/// LoRA-FA applies to plain LoRA: PEFT pairs each module's `lora*` tensors as (A, B), which
/// DoRA's magnitude and embedding LoRA (whose A it does not freeze) break.
fn check_lora_fa(model: &PeftModel, adapter: &str, config: &PeftConfig) -> Result<()> {
    if config.peft_type() != "LORA" {
        return Err(PeftError::config(
            "lora_fa",
            format!(
                "LoRA-FA trains LoRA adapters; {adapter:?} is {}",
                config.peft_type()
            ),
        ));
    }
    let lora = LoraConfig::from_json(config.to_json())?;
    if lora.use_dora {
        return Err(PeftError::config(
            "lora_fa",
            "LoRA-FA does not apply to DoRA adapters",
        ));
    }
    let params = model.trainable_parameters(adapter)?;
    if params
        .iter()
        .any(|p| !p.is_copy && p.kind == ModuleKind::Embedding)
    {
        return Err(PeftError::config(
            "lora_fa",
            "LoRA-FA does not apply to LoRA on embedding layers (PEFT would pair their tensors wrongly)",
        ));
    }
    if params
        .iter()
        .any(|p| !p.is_copy && p.name.ends_with("bias"))
    {
        return Err(PeftError::config(
            "lora_fa",
            "LoRA-FA does not apply to LoRA with a trained bias (lora_bias)",
        ));
    }
    Ok(())
}

/// The optimiser's groups, rule and default eps for `options`.
fn optimizer_groups(
    model: &PeftModel,
    adapter: &str,
    config: &PeftConfig,
    params: &[TrainableParam],
    options: &TrainerOptions,
) -> Result<(Vec<ParamGroup>, Rule, f64)> {
    let param = |p: &TrainableParam| Param {
        key: p.key.clone(),
        var: p.var.clone(),
    };
    let group =
        |name: &str, lr: f64, weight_decay: f64, members: Vec<&TrainableParam>| ParamGroup {
            name: name.to_string(),
            params: members.into_iter().map(param).collect(),
            lr,
            weight_decay,
        };
    // transformers' default: no decay for biases (nor norms, which adapters never train).
    let decays = |p: &TrainableParam| !p.name.contains("bias");
    if options.lora_fa {
        let lora = LoraConfig::from_json(config.to_json())?;
        let all = model.trainable_parameters(adapter)?;
        let mut pairs = Vec::new();
        for (i, p) in params.iter().enumerate() {
            if p.is_copy || p.name != "lora_B.weight" {
                continue;
            }
            let a = all
                .iter()
                .find(|q| q.module == p.module && q.name == "lora_A.weight")
                .ok_or_else(|| PeftError::MissingKey {
                    key: format!("{}.lora_A.weight", p.module),
                    context: "LoRA-FA pairs every lora_B with its lora_A".into(),
                })?;
            let (r, alpha) = lora.rank_and_alpha(&p.module)?;
            pairs.push(LoraFaPair {
                a: a.var.clone(),
                b: i,
                scaling: lora.scaling(r, alpha),
            });
        }
        let groups = vec![group(
            "lora_fa",
            options.lr,
            options.weight_decay,
            params.iter().collect(),
        )];
        return Ok((groups, Rule::LoraFa { pairs }, 1e-6));
    }
    let groups = match options.loraplus {
        None => {
            let (decay, no_decay): (Vec<_>, Vec<_>) = params.iter().partition(|p| decays(p));
            vec![
                group("decay", options.lr, options.weight_decay, decay),
                group("no_decay", options.lr, 0.0, no_decay),
            ]
        }
        Some(plus) => {
            let (mut a, mut emb, mut b, mut b_no_decay) = (vec![], vec![], vec![], vec![]);
            for p in params {
                let ndim = p.var.rank();
                if !p.is_copy && p.kind == ModuleKind::Embedding {
                    emb.push(p);
                } else if p.name.starts_with("lora_B") || ndim == 1 {
                    if decays(p) {
                        b.push(p)
                    } else {
                        b_no_decay.push(p)
                    }
                } else {
                    a.push(p);
                }
            }
            let fast = options.lr * plus.lr_ratio;
            vec![
                group("loraplus_A", options.lr, plus.weight_decay, a),
                group(
                    "loraplus_embedding",
                    plus.lr_embedding,
                    plus.weight_decay,
                    emb,
                ),
                group("loraplus_B", fast, plus.weight_decay, b),
                group("loraplus_B_no_decay", fast, 0.0, b_no_decay),
            ]
        }
    };
    Ok((
        groups
            .into_iter()
            .filter(|g| !g.params.is_empty())
            .collect(),
        Rule::AdamW,
        1e-8,
    ))
}
