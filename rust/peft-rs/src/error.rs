//! The one error type of the crate. Every variant says what was expected and what was found, so a
//! caller (or the Python bindings, which map each variant to its own exception class) can act on it.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, PeftError>;

#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A tensor had the wrong shape.
    #[error("shape mismatch for {what}: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        what: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A key that must be present is not: a tensor (in a file, a state dict or a layer), an
    /// adapter name, a module in the model's module types.
    #[error("missing key `{key}`{}", context_suffix(.context))]
    MissingKey { key: String, context: String },

    /// A tensor that nothing expects was found.
    #[error("unexpected tensor `{key}`{}", context_suffix(.context))]
    UnexpectedKey { key: String, context: String },

    /// A config value is not accepted (out of range, unknown option, or a feature not implemented).
    #[error("invalid config value for `{field}`: {reason}")]
    InvalidConfig { field: String, reason: String },

    /// The adapter type of a file or config is not one this library reads.
    #[error("unsupported peft_type {found:?}; supported: {supported}")]
    UnsupportedPeftType { found: String, supported: String },

    /// A dtype that cannot be used where it was given.
    #[error("dtype error for {what}: expected {expected}, found {found}")]
    DType {
        what: String,
        expected: String,
        found: String,
    },

    /// An operation that the layer's current state or kind does not allow.
    #[error("{0}")]
    InvalidOperation(String),

    /// Merging would write NaN or infinite values (`safe_merge`).
    #[error(
        "merging adapter into `{module}` produced NaN or infinite values; the weight was left unchanged"
    )]
    NonFiniteMerge { module: String },

    #[error("file not found: {}", .path.display())]
    FileNotFound { path: PathBuf },

    #[error("I/O error on {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid JSON in {}: {source}", .path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A weights file that cannot be parsed (truncated, corrupted, unsupported dtype).
    #[error("invalid weights file {}: {reason}", .path.display())]
    InvalidWeightsFile { path: PathBuf, reason: String },

    /// A shared library (a BLAS) that cannot be opened or lacks what is needed of it.
    #[error("cannot use the library {}: {reason}", .path.display())]
    Library { path: PathBuf, reason: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn context_suffix(context: &str) -> String {
    if context.is_empty() {
        String::new()
    } else {
        format!(" ({context})")
    }
}

impl PeftError {
    pub(crate) fn config(field: &str, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn shape(what: impl Into<String>, expected: &[usize], found: &[usize]) -> Self {
        Self::ShapeMismatch {
            what: what.into(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Self::FileNotFound {
                path: path.to_path_buf(),
            }
        } else {
            Self::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}
