//! One file per method: its config and its [`crate::method::LayerAdapter`]. Each is listed once
//! in [`crate::registry`].

pub mod adalora;
pub mod boft;
pub mod ia3;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod lycoris;
pub mod oft;
pub mod vera;

use crate::base::ModuleKind;
use crate::error::{PeftError, Result};

/// PEFT forces `fan_in_fan_out` to true for transformers `Conv1D` targets and to false for
/// `nn.Linear` ones, and saves the result.
pub(crate) fn adapt_fan_in_fan_out(fan_in_fan_out: &mut bool, kinds: &[ModuleKind]) -> Result<()> {
    let conv1d = kinds.contains(&ModuleKind::Conv1D);
    let linear = kinds.contains(&ModuleKind::Linear);
    if conv1d && linear {
        return Err(PeftError::config(
            "fan_in_fan_out",
            "the targets mix nn.Linear and transformers Conv1D layers; an adapter file records one layout",
        ));
    }
    if conv1d || linear {
        *fan_in_fan_out = conv1d;
    }
    Ok(())
}
