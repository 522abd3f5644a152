//! The losses transformers' task models compute from `labels`, as a sum and a count so that
//! micro-batches add up to exactly the loss of the whole batch.

use candle_core::{D, DType, Tensor};

use crate::error::{PeftError, Result};

/// transformers' label value for positions that carry no loss.
pub const IGNORE_INDEX: i64 = -100;

/// What a model is trained to do, from its transformers class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// `*ForSequenceClassification`: logits `(batch, num_labels)`, labels `(batch,)`; cross
    /// entropy, or mean squared error when `num_labels == 1` (regression).
    SequenceClassification,
    /// `*ForCausalLM`: logits `(batch, seq, vocab)`, labels `(batch, seq)` predicting the next
    /// token (shifted inside), `-100` ignored.
    CausalLm,
}

impl Task {
    pub fn for_architecture(architecture: &str) -> Result<Self> {
        if architecture.ends_with("ForSequenceClassification") {
            Ok(Self::SequenceClassification)
        } else if architecture.ends_with("ForCausalLM") {
            Ok(Self::CausalLm)
        } else {
            Err(PeftError::InvalidOperation(format!(
                "{architecture} has no training objective; train a model with a task head \
                 (a *ForSequenceClassification or *ForCausalLM class)"
            )))
        }
    }

    /// How many items of `labels` carry a loss (rows, or tokens after the shift that are not
    /// `-100`).
    pub fn count(&self, labels: &Tensor) -> Result<usize> {
        Ok(match self {
            Self::SequenceClassification => labels.dim(0)?,
            Self::CausalLm => {
                let seq = labels.dim(1)?;
                if seq < 2 {
                    return Ok(0);
                }
                let next = labels.narrow(1, 1, seq - 1)?.to_dtype(DType::I64)?;
                next.ne(IGNORE_INDEX)?
                    .to_dtype(DType::U32)?
                    .sum_all()?
                    .to_scalar::<u32>()? as usize
            }
        })
    }

    /// The summed loss over the items of this batch and how many items carry a loss (rows, or
    /// predicted tokens). The mean loss of several batches is `Σ sums / Σ counts`.
    pub fn loss_sum(&self, logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
        match self {
            Self::SequenceClassification => classification_loss_sum(logits, labels),
            Self::CausalLm => causal_lm_loss_sum(logits, labels),
        }
    }
}

fn classification_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (rows, classes) = logits.dims2()?;
    if labels.dims() != [rows] {
        return Err(PeftError::shape("labels", &[rows], labels.dims()));
    }
    let logits = logits.to_dtype(DType::F32)?;
    if classes == 1 {
        let target = labels.to_dtype(DType::F32)?;
        let diff = logits.squeeze(1)?.sub(&target)?;
        return Ok((diff.sqr()?.sum_all()?, rows));
    }
    let labels = labels.to_dtype(DType::I64)?;
    check_label_range(&labels, classes, false)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&labels.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    Ok((picked.sum_all()?.neg()?, rows))
}

fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (rows, seq, vocab) = logits.dims3()?;
    if labels.dims() != [rows, seq] {
        return Err(PeftError::shape("labels", &[rows, seq], labels.dims()));
    }
    if seq < 2 {
        return Ok((Tensor::zeros((), DType::F32, logits.device())?, 0));
    }
    // Position t predicts label t + 1.
    let logits = logits
        .narrow(1, 0, seq - 1)?
        .to_dtype(DType::F32)?
        .reshape((rows * (seq - 1), vocab))?;
    let labels = labels
        .narrow(1, 1, seq - 1)?
        .to_dtype(DType::I64)?
        .flatten_all()?;
    check_label_range(&labels, vocab, true)?;
    let keep = labels.ne(IGNORE_INDEX)?;
    let count = keep.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize;
    let safe = keep.where_cond(&labels, &labels.zeros_like()?)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs
        .gather(&safe.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    let kept = picked.mul(&keep.to_dtype(DType::F32)?)?;
    Ok((kept.sum_all()?.neg()?, count))
}

/// Labels must index a class (or be `-100` where that is allowed): a wrong label is an error
/// naming it, not a silent gather out of range.
fn check_label_range(labels: &Tensor, classes: usize, allow_ignore: bool) -> Result<()> {
    let values = labels.to_vec1::<i64>()?;
    if let Some(bad) = values
        .iter()
        .find(|v| !((0..classes as i64).contains(v) || (allow_ignore && **v == IGNORE_INDEX)))
    {
        return Err(PeftError::InvalidOperation(format!(
            "label {bad} is out of range: the model has {classes} classes{}",
            if allow_ignore {
                " (or -100 to ignore a position)"
            } else {
                ""
            }
        )));
    }
    Ok(())
}
