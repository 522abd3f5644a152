//! `peft_rs.Trainer`: the core's [`Trainer`] over a `PeftModel`, with numpy/torch batches and a
//! Python per-step callback. Compute runs without the GIL; the callback takes it back.

use std::path::PathBuf;

use peft_rs::train::{Batch, CheckpointPlan, LoraPlus, StepStats, Trainer, TrainerOptions};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::dlpack::{ArrayKind, tensor_from_py};
use crate::errors::{run, to_pyerr};
use crate::model::input;
use crate::peft_model::PyPeftModel;

#[pyclass(name = "Trainer", module = "peft_rs._core")]
pub struct PyTrainer {
    inner: Trainer,
    model: Py<PyPeftModel>,
}

fn batch(
    input_ids: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
    attention_mask: Option<&Bound<'_, PyAny>>,
    token_type_ids: Option<&Bound<'_, PyAny>>,
) -> PyResult<Batch> {
    Ok(Batch {
        input: input(input_ids, attention_mask, token_type_ids)?,
        labels: tensor_from_py(labels)?,
    })
}

fn stats_dict<'py>(py: Python<'py>, s: &StepStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("step", s.step)?;
    d.set_item("loss", s.loss)?;
    d.set_item("lr", s.lr)?;
    d.set_item("grad_norm", s.grad_norm)?;
    d.set_item("examples", s.examples)?;
    d.set_item("epoch", s.epoch)?;
    d.set_item("seconds", s.seconds)?;
    Ok(d)
}

#[pymethods]
impl PyTrainer {
    /// A trainer for one adapter of `model` (default: its only active adapter). Options have
    /// transformers' / PEFT's names and defaults.
    #[new]
    #[pyo3(signature = (
        model, *, adapter_name=None, lr=2e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=None,
        schedule="linear", warmup_steps=0, total_steps=None, max_grad_norm=Some(1.0),
        accumulation_steps=1, loraplus_lr_ratio=None, loraplus_lr_embedding=1e-6,
        loraplus_weight_decay=0.0, lora_fa=false, seed=0
    ),
    text_signature = "(model, *, adapter_name=None, lr=0.0002, weight_decay=0.0, betas=(0.9, 0.999), eps=None, schedule='linear', warmup_steps=0, total_steps=None, max_grad_norm=1.0, accumulation_steps=1, loraplus_lr_ratio=None, loraplus_lr_embedding=1e-06, loraplus_weight_decay=0.0, lora_fa=False, seed=0)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: Py<PyPeftModel>,
        adapter_name: Option<String>,
        lr: f64,
        weight_decay: f64,
        betas: (f64, f64),
        eps: Option<f64>,
        schedule: &str,
        warmup_steps: usize,
        total_steps: Option<usize>,
        max_grad_norm: Option<f64>,
        accumulation_steps: usize,
        loraplus_lr_ratio: Option<f64>,
        loraplus_lr_embedding: f64,
        loraplus_weight_decay: f64,
        lora_fa: bool,
        seed: u64,
    ) -> PyResult<Self> {
        let options = TrainerOptions {
            lr,
            weight_decay,
            betas,
            eps,
            schedule: schedule.parse().map_err(to_pyerr)?,
            warmup_steps,
            total_steps,
            max_grad_norm,
            accumulation_steps,
            loraplus: loraplus_lr_ratio.map(|lr_ratio| LoraPlus {
                lr_ratio,
                lr_embedding: loraplus_lr_embedding,
                weight_decay: loraplus_weight_decay,
            }),
            lora_fa,
            seed,
        };
        let inner = {
            let mut guard = model.borrow_mut(py);
            let peft = guard.get_mut()?;
            run(py, || Trainer::new(peft, adapter_name.as_deref(), options))?
        };
        Ok(Self { inner, model })
    }

    /// One optimiser step on a batch (split into `accumulation_steps` micro-batches); returns
    /// `{"step", "loss", "lr", "grad_norm", "examples", "epoch", "seconds"}`.
    #[pyo3(signature = (input_ids, labels, attention_mask=None, token_type_ids=None))]
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        labels: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        token_type_ids: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let batch = batch(input_ids, labels, attention_mask, token_type_ids)?;
        let mut guard = self.model.borrow_mut(py);
        let peft = guard.get_mut()?;
        let trainer = &mut self.inner;
        let stats = run(py, || trainer.step(peft, &batch))?;
        stats_dict(py, &stats)
    }

    /// The batch's mean loss in eval mode (no dropout; AdaLoRA's regulariser included).
    #[pyo3(signature = (input_ids, labels, attention_mask=None, token_type_ids=None))]
    fn evaluate_loss(
        &self,
        py: Python<'_>,
        input_ids: &Bound<'_, PyAny>,
        labels: &Bound<'_, PyAny>,
        attention_mask: Option<&Bound<'_, PyAny>>,
        token_type_ids: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<f64> {
        let batch = batch(input_ids, labels, attention_mask, token_type_ids)?;
        let guard = self.model.borrow(py);
        let peft = guard.get()?;
        let trainer = &self.inner;
        run(py, || trainer.evaluate_loss(peft, &batch))
    }

    /// `(loss, {key: gradient})` for a batch in training mode, updating nothing; keys as in
    /// PEFT's saved files, arrays of `input_ids`' kind.
    #[pyo3(signature = (input_ids, labels, attention_mask=None, token_type_ids=None))]
    fn gradients<'py>(
        &self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        labels: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        token_type_ids: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(f64, Bound<'py, PyDict>)> {
        let kind = ArrayKind::of(input_ids)?;
        let batch = batch(input_ids, labels, attention_mask, token_type_ids)?;
        let guard = self.model.borrow(py);
        let peft = guard.get()?;
        let trainer = &self.inner;
        let (loss, grads) = run(py, || trainer.gradients(peft, &batch))?;
        let d = PyDict::new(py);
        for (k, g) in grads {
            d.set_item(k, kind.wrap(py, g)?)?;
        }
        Ok((loss, d))
    }

    /// Trains for `epochs` over the rows of the arrays in batches of `batch_size`, shuffled per
    /// epoch from the seed; `callback(stats)` after every step, with the model free to use (an
    /// exception it raises, or Ctrl-C, stops training and propagates; the trainer stays
    /// consistent and a later `train` call with the same data continues). With
    /// `checkpoint_dir`, writes `checkpoint-<step>` every `save_every` steps (before the
    /// callback of that step) and at the end. After `load_checkpoint`, continues where the
    /// checkpoint stopped. Returns every step's stats.
    #[pyo3(signature = (
        input_ids, labels, attention_mask=None, token_type_ids=None, *, epochs=1, batch_size=16,
        callback=None, checkpoint_dir=None, save_every=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn train<'py>(
        &mut self,
        py: Python<'py>,
        input_ids: &Bound<'py, PyAny>,
        labels: &Bound<'py, PyAny>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        token_type_ids: Option<&Bound<'py, PyAny>>,
        epochs: usize,
        batch_size: usize,
        callback: Option<Py<PyAny>>,
        checkpoint_dir: Option<PathBuf>,
        save_every: Option<usize>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let data = batch(input_ids, labels, attention_mask, token_type_ids)?;
        let plan = checkpoint_dir.map(|dir| CheckpointPlan {
            dir,
            every: save_every,
        });
        let trainer = &mut self.inner;
        let fit = run(py, || trainer.start_fit(&data, epochs, batch_size, plan))?;
        let mut history = Vec::new();
        loop {
            // The model is borrowed for one step only: the callback may use it (evaluate, save).
            let stats = {
                let mut guard = self.model.borrow_mut(py);
                let peft = guard.get_mut()?;
                let trainer = &mut self.inner;
                run(py, || trainer.fit_step(peft, &fit))?
            };
            let Some(stats) = stats else {
                break;
            };
            let d = stats_dict(py, &stats)?;
            history.push(d.clone());
            py.check_signals()?;
            if let Some(cb) = &callback {
                cb.call1(py, (d,))?;
            }
        }
        Ok(history)
    }

    /// Writes a checkpoint directory (PEFT-loadable adapter + optimiser and trainer state)
    /// atomically.
    fn save_checkpoint(&self, py: Python<'_>, path: PathBuf) -> PyResult<PathBuf> {
        let guard = self.model.borrow(py);
        let peft = guard.get()?;
        let trainer = &self.inner;
        run(py, || trainer.save_checkpoint(peft, &path))
    }

    /// Restores a checkpoint made with the same options: adapter tensors, optimiser, schedule,
    /// dropout stream, data position (and AdaLoRA's allocator).
    fn load_checkpoint(&mut self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let mut guard = self.model.borrow_mut(py);
        let peft = guard.get_mut()?;
        let trainer = &mut self.inner;
        run(py, || trainer.load_checkpoint(peft, &path))
    }

    /// Optimiser steps done.
    #[getter]
    fn global_step(&self) -> usize {
        self.inner.global_step()
    }

    #[getter]
    fn total_steps(&self) -> Option<usize> {
        self.inner.options().total_steps
    }

    /// The base learning rate the next step uses.
    #[getter]
    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }

    #[getter]
    fn adapter_name(&self) -> &str {
        self.inner.adapter_name()
    }

    /// The optimiser's groups: `[{"name", "lr", "weight_decay", "params": [keys]}]`.
    fn param_groups<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.inner
            .optimizer()
            .groups()
            .iter()
            .map(|g| {
                let d = PyDict::new(py);
                d.set_item("name", &g.name)?;
                d.set_item("lr", g.lr)?;
                d.set_item("weight_decay", g.weight_decay)?;
                let keys: Vec<&str> = g.params.iter().map(|p| p.key.as_str()).collect();
                d.set_item("params", keys)?;
                Ok(d)
            })
            .collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "Trainer(adapter={:?}, step={})",
            self.inner.adapter_name(),
            self.inner.global_step()
        )
    }
}
