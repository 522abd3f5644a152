//! Every method peft-rs implements, by PEFT's `peft_type`: one line per method.

use crate::error::{PeftError, Result};
use crate::method::MethodEntry;
use crate::methods::{adalora, boft, ia3, loha, lokr, lora, oft, vera};

pub const METHODS: &[MethodEntry] = &[
    lora::ENTRY,
    adalora::ENTRY,
    ia3::ENTRY,
    vera::ENTRY,
    boft::ENTRY,
    loha::ENTRY,
    lokr::ENTRY,
    oft::ENTRY,
];

/// The method registered for `peft_type`.
pub fn method(peft_type: &str) -> Result<&'static MethodEntry> {
    METHODS
        .iter()
        .find(|m| m.peft_type == peft_type)
        .ok_or_else(|| PeftError::UnsupportedPeftType {
            found: peft_type.to_string(),
            supported: METHODS
                .iter()
                .map(|m| m.peft_type)
                .collect::<Vec<_>>()
                .join(", "),
        })
}
