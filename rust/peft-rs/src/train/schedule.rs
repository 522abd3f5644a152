//! Learning-rate schedules with transformers' names and values (`get_scheduler`): the factor
//! the base learning rate is multiplied by at each optimiser step.

use std::f64::consts::PI;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// `get_constant_schedule`.
    Constant,
    /// `get_constant_schedule_with_warmup`.
    ConstantWithWarmup,
    /// `get_linear_schedule_with_warmup`.
    Linear,
    /// `get_cosine_schedule_with_warmup` (half a cosine period).
    Cosine,
}

impl FromStr for ScheduleKind {
    type Err = PeftError;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            other => {
                return Err(PeftError::config(
                    "schedule",
                    format!(
                        "unknown schedule {other:?}; expected \"constant\", \"constant_with_warmup\", \"linear\" or \"cosine\""
                    ),
                ));
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup_steps: usize,
    /// Required by the decaying schedules.
    pub total_steps: Option<usize>,
}

impl Schedule {
    pub fn new(
        kind: ScheduleKind,
        warmup_steps: usize,
        total_steps: Option<usize>,
    ) -> Result<Self> {
        let decays = matches!(kind, ScheduleKind::Linear | ScheduleKind::Cosine);
        if decays && total_steps.is_none_or(|t| t == 0) {
            return Err(PeftError::config(
                "total_steps",
                format!("the {kind:?} schedule decays to zero at total_steps, which must be > 0"),
            ));
        }
        if kind == ScheduleKind::Constant && warmup_steps > 0 {
            return Err(PeftError::config(
                "warmup_steps",
                "the constant schedule has no warm-up; use \"constant_with_warmup\"",
            ));
        }
        Ok(Self {
            kind,
            warmup_steps,
            total_steps,
        })
    }

    /// The factor at optimiser step `step` (0 for the first step), as transformers' `LambdaLR`
    /// gives it after `step` calls of `scheduler.step()`.
    pub fn factor(&self, step: usize) -> f64 {
        let (step, warmup) = (step as f64, self.warmup_steps as f64);
        if self.kind != ScheduleKind::Constant && step < warmup {
            return step / warmup.max(1.0);
        }
        let total = self.total_steps.unwrap_or(0) as f64;
        let progress = (step - warmup) / (total - warmup).max(1.0);
        match self.kind {
            ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
            ScheduleKind::Cosine => (0.5 * (1.0 + (PI * progress).cos())).max(0.0),
        }
    }
}
