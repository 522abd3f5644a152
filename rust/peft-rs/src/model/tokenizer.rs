//! Text to model inputs through the `tokenizers` crate, reading a model directory's
//! `tokenizer.json`, padded and truncated as transformers' `tokenizer(texts, padding=True,
//! truncation=..., max_length=...)` does.

use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};

use crate::error::{PeftError, Result};
use crate::model::ModelInput;

pub const TOKENIZER_FILE: &str = "tokenizer.json";

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// The tokenizer of a transformers-format directory (`tokenizer.json`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            return Err(PeftError::FileNotFound { path });
        }
        let mut inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| PeftError::InvalidWeightsFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        // Pad to the longest text of each batch with the file's pad token (transformers'
        // `padding=True`), whatever fixed padding the file asks for.
        let padding = inner.get_padding().cloned().unwrap_or_default();
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_to_multiple_of: None,
            ..padding
        }));
        Ok(Self { inner })
    }

    /// Token ids, attention mask and token type ids `(texts, longest)`; with `max_length`,
    /// longer texts are cut to it (special tokens included), as transformers' `truncation=True`.
    pub fn encode(&self, texts: &[&str], max_length: Option<usize>) -> Result<ModelInput> {
        if texts.is_empty() {
            return Err(PeftError::InvalidOperation(
                "nothing to tokenize: the list of texts is empty".into(),
            ));
        }
        let mut tokenizer = self.inner.clone();
        let truncation = max_length.map(|max_length| TruncationParams {
            max_length,
            ..Default::default()
        });
        tokenizer
            .with_truncation(truncation)
            .map_err(|e| PeftError::InvalidOperation(format!("truncation: {e}")))?;
        let encodings = tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| PeftError::InvalidOperation(format!("tokenizing: {e}")))?;
        let rows = encodings.len();
        let width = encodings.first().map_or(0, |e| e.len());
        let field = |get: fn(&tokenizers::Encoding) -> &[u32]| -> Result<Tensor> {
            let values: Vec<i64> = encodings
                .iter()
                .flat_map(|e| get(e).iter().map(|&v| i64::from(v)))
                .collect();
            Ok(Tensor::from_vec(values, (rows, width), &Device::Cpu)?)
        };
        Ok(ModelInput {
            input_ids: field(tokenizers::Encoding::get_ids)?,
            attention_mask: Some(field(tokenizers::Encoding::get_attention_mask)?),
            token_type_ids: Some(field(tokenizers::Encoding::get_type_ids)?),
        })
    }
}
