//! BERT as transformers 5 computes it in eval mode: [`BertModel`] (last hidden state) and
//! [`BertForSequenceClassification`] (logits), loaded from a transformers-format directory
//! (for example sentence-transformers' all-MiniLM-L6-v2).
//!
//! Every `nn.Linear` and `nn.Embedding` is a peft-rs [`Layer`] named by its transformers module
//! path, so adapters target it as PEFT would; LayerNorms are plain tensors. Dropout is the
//! identity (eval mode).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::Value;

use super::checkpoint::{read_model_config, var_builder};
use super::ops::{LayerNorm, softmax_last_dim};
use super::{HiddenAct, Layer, Model, ModelBuilder, ModelInput, Modules};
use crate::base::ModuleKind;
use crate::error::{PeftError, Result};
use crate::init::Initializer;

/// The `config.json` fields the forward depends on, with `BertConfig`'s defaults. Other keys
/// (dropout rates, `initializer_range`, `pad_token_id`...) only matter for training or init and
/// are ignored, as transformers keeps but does not use them in eval.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: HiddenAct,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// transformers 5 reads no other value (it silently computes absolute positions); a
    /// checkpoint trained with relative positions is refused rather than computed wrongly.
    pub position_embedding_type: PositionEmbedding,
    pub is_decoder: bool,
    pub add_cross_attention: bool,
    pub id2label: Option<BTreeMap<String, Value>>,
    pub num_labels: Option<usize>,
    /// The std of a newly initialised classification head.
    pub initializer_range: f64,
}

impl Default for BertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: HiddenAct::Gelu,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            position_embedding_type: PositionEmbedding::Absolute,
            is_decoder: false,
            add_cross_attention: false,
            id2label: None,
            num_labels: None,
            initializer_range: 0.02,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PositionEmbedding {
    #[serde(rename = "absolute")]
    Absolute,
}

impl BertConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config: Self = read_model_config(dir)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let heads = self.num_attention_heads;
        if heads == 0 || !self.hidden_size.is_multiple_of(heads) {
            return Err(PeftError::config(
                "num_attention_heads",
                format!(
                    "The hidden size ({}) is not a multiple of the number of attention heads ({heads})",
                    self.hidden_size
                ),
            ));
        }
        if self.is_decoder || self.add_cross_attention {
            let field = if self.is_decoder {
                "is_decoder"
            } else {
                "add_cross_attention"
            };
            return Err(PeftError::config(
                field,
                "BERT as a decoder (causal attention, cross-attention) is not implemented; \
                 peft-rs's BERT is the bidirectional encoder",
            ));
        }
        self.num_labels().map(|_| ())
    }

    /// transformers' rule: `len(id2label)` when present (a different `num_labels` is an error),
    /// else `num_labels`, else 2.
    pub fn num_labels(&self) -> Result<usize> {
        match (&self.id2label, self.num_labels) {
            (Some(map), Some(n)) if map.len() != n => Err(PeftError::config(
                "num_labels",
                format!(
                    "You passed `num_labels={n}` which is incompatible to the `id2label` map of length `{}`.",
                    map.len()
                ),
            )),
            (Some(map), _) => Ok(map.len()),
            (None, n) => Ok(n.unwrap_or(2)),
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Where the task class keeps its `BertModel` (transformers' `base_model_prefix`).
const BASE_PREFIX: &str = "bert";

/// The model directory's weights, looked up by the module paths of the class being built.
///
/// A checkpoint may store BERT's tensors with or without the `bert.` prefix whatever class it is
/// loaded as (MiniLM's `BertModel` file has none; a `BertForSequenceClassification` file has
/// it), and transformers adds or strips the prefix on load. The module paths, which name the
/// [`Layer`]s that adapters target, must stay those of the class being built, so the builder is
/// not re-rooted (that would rename the layers); instead its lookups are renamed to the
/// checkpoint's keys here, the one place where module paths and checkpoint keys differ.
fn checkpoint_weights(
    dir: &Path,
    dtype: DType,
    device: &Device,
    prefixed_class: bool,
) -> Result<VarBuilder<'static>> {
    let vb = var_builder(dir, dtype, device)?;
    let probe = "embeddings.word_embeddings.weight";
    let prefixed_checkpoint = vb.contains_tensor(&format!("{BASE_PREFIX}.{probe}"));
    if !prefixed_checkpoint && !vb.contains_tensor(probe) {
        return Err(PeftError::MissingKey {
            key: probe.into(),
            context: format!("{}: not a BERT checkpoint", dir.display()),
        });
    }
    Ok(match (prefixed_class, prefixed_checkpoint) {
        (false, true) => vb.rename_f(|name| format!("{BASE_PREFIX}.{name}")),
        (true, false) => vb.rename_f(|name| {
            let bare = name
                .strip_prefix(BASE_PREFIX)
                .and_then(|n| n.strip_prefix('.'));
            bare.unwrap_or(name).to_string()
        }),
        _ => vb,
    })
}

/// `BertEmbeddings`: word + token type + position, then LayerNorm.
struct Embeddings {
    word: Layer,
    position: Layer,
    token_type: Layer,
    norm: LayerNorm,
    max_positions: usize,
}

impl Embeddings {
    fn new(b: &ModelBuilder, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word: b.pp("word_embeddings").embedding(cfg.vocab_size, h)?,
            position: b
                .pp("position_embeddings")
                .embedding(cfg.max_position_embeddings, h)?,
            token_type: b
                .pp("token_type_embeddings")
                .embedding(cfg.type_vocab_size, h)?,
            norm: layer_norm(b, "LayerNorm", cfg)?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        if seq > self.max_positions {
            return Err(PeftError::InvalidOperation(format!(
                "sequence length {seq} exceeds max_position_embeddings ({})",
                self.max_positions
            )));
        }
        // Positions 0..seq for every row (padding does not shift them), one row per batch row so
        // that a mixed batch can route each row of an adapted position embedding.
        let positions = Tensor::arange(0u32, seq as u32, input_ids.device())?
            .unsqueeze(0)?
            .broadcast_as((batch, seq))?
            .contiguous()?;
        let x = (self.word.forward(input_ids)? + self.token_type.forward(token_type_ids)?)?;
        let x = (x + self.position.forward(&positions)?)?;
        self.norm.forward(&x)
    }
}

/// `BertLayer` (post-LayerNorm): self-attention, then the feed-forward block.
struct EncoderLayer {
    query: Layer,
    key: Layer,
    value: Layer,
    attention_out: Layer,
    attention_norm: LayerNorm,
    intermediate: Layer,
    output: Layer,
    output_norm: LayerNorm,
    heads: usize,
    head_dim: usize,
    act: HiddenAct,
}

impl EncoderLayer {
    fn new(b: &ModelBuilder, cfg: &BertConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let attn = b.pp("attention");
        let qkv = attn.pp("self");
        let attn_out = attn.pp("output");
        Ok(Self {
            query: qkv.pp("query").linear(h, h, true)?,
            key: qkv.pp("key").linear(h, h, true)?,
            value: qkv.pp("value").linear(h, h, true)?,
            attention_out: attn_out.pp("dense").linear(h, h, true)?,
            attention_norm: layer_norm(&attn_out, "LayerNorm", cfg)?,
            intermediate: b.pp("intermediate").pp("dense").linear(h, i, true)?,
            output: b.pp("output").pp("dense").linear(i, h, true)?,
            output_norm: layer_norm(&b.pp("output"), "LayerNorm", cfg)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let attended = self.attention_out.forward(&self.attention(x, mask)?)?;
        let a = self.attention_norm.forward(&(attended + x)?)?;
        let i = self.act.apply(&self.intermediate.forward(&a)?)?;
        let out = self.output.forward(&i)?;
        self.output_norm.forward(&(out + a)?)
    }

    /// Scaled dot-product attention over all (unmasked) positions. Scores and softmax are
    /// computed in f32 and the probabilities cast back, as PyTorch's softmax (eager) and fused
    /// attention (sdpa, transformers' default) do internally in f16/bf16.
    fn attention(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (batch, seq, hidden) = x.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((batch, seq, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = softmax_last_dim(&scores)?.to_dtype(x.dtype())?;
        let context = probs.matmul(&v)?.transpose(1, 2)?;
        Ok(context.reshape((batch, seq, hidden))?)
    }
}

fn layer_norm(b: &ModelBuilder, name: &str, cfg: &BertConfig) -> Result<LayerNorm> {
    // candle's fused layer norm computes in f32 and rounds once, as nn.LayerNorm does in f16/bf16.
    LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, b.vb().pp(name))
}

/// The additive mask `(batch, 1, 1, seq)` in f32: 0 where `attention_mask` is nonzero (keep),
/// f32's lowest value elsewhere, like transformers' eager bidirectional mask.
fn additive_mask(attention_mask: &Tensor, batch: usize, seq: usize) -> Result<Tensor> {
    let found = attention_mask.dims();
    if found != [batch, seq] {
        return Err(PeftError::shape("attention_mask", &[batch, seq], found));
    }
    let keep = attention_mask.ne(&attention_mask.zeros_like()?)?;
    let device = attention_mask.device();
    let zero = Tensor::zeros((batch, seq), DType::F32, device)?;
    let blocked = Tensor::full(f32::MIN, (batch, seq), device)?;
    Ok(keep
        .where_cond(&zero, &blocked)?
        .reshape((batch, 1, 1, seq))?)
}

/// The encoder shared by both classes: embeddings, layers and the pooler.
struct Bert {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    pooler: Option<Layer>,
}

impl Bert {
    /// `require_pooler`: whether `pooler.dense` must be in the checkpoint. `BertModel` builds it
    /// only when the checkpoint has it (its output is the last hidden state; transformers would initialise a
    /// missing pooler randomly).
    fn new(b: &ModelBuilder, cfg: &BertConfig, require_pooler: bool) -> Result<Self> {
        let embeddings = Embeddings::new(&b.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(&b.pp("encoder").pp("layer").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let pooler = b.pp("pooler").pp("dense");
        let pooler = if require_pooler || pooler.vb().contains_tensor("weight") {
            Some(pooler.linear(cfg.hidden_size, cfg.hidden_size, true)?)
        } else {
            None
        };
        Ok(Self {
            embeddings,
            layers,
            pooler,
        })
    }

    /// The last hidden state `(batch, seq, hidden)`.
    fn forward(&self, input: &ModelInput) -> Result<Tensor> {
        let ids = &input.input_ids;
        let (batch, seq) = ids.dims2().map_err(|_| {
            PeftError::InvalidOperation(format!(
                "input_ids must have shape (batch, seq), found {:?}",
                ids.dims()
            ))
        })?;
        let token_types = match &input.token_type_ids {
            Some(t) if t.dims() != [batch, seq] => {
                return Err(PeftError::shape("token_type_ids", &[batch, seq], t.dims()));
            }
            Some(t) => t.clone(),
            None => Tensor::zeros((batch, seq), DType::U32, ids.device())?,
        };
        let mask = match &input.attention_mask {
            Some(m) => Some(additive_mask(m, batch, seq)?),
            None => None,
        };
        let mut x = self.embeddings.forward(ids, &token_types)?;
        for layer in &self.layers {
            x = layer.forward(&x, mask.as_ref())?;
        }
        Ok(x)
    }

    /// `tanh(dense(hidden[:, 0]))`: the first token of each row, whatever the padding.
    fn pool(&self, hidden: &Tensor) -> Result<Tensor> {
        let dense = self.pooler.as_ref().ok_or_else(|| PeftError::MissingKey {
            key: "pooler.dense.weight".into(),
            context: "the checkpoint has no pooler".into(),
        })?;
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
        Ok(dense.forward(&first)?.tanh()?)
    }
}

/// transformers' `BertModel`: returns the last hidden state `(batch, seq, hidden)`.
pub struct BertModel {
    bert: Bert,
    modules: Modules,
}

impl BertModel {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = BertConfig::from_dir(dir)?;
        let b = ModelBuilder::new(checkpoint_weights(dir, dtype, device, false)?);
        Ok(Self {
            bert: Bert::new(&b, &cfg, false)?,
            modules: b.modules(),
        })
    }

    pub fn load_boxed(dir: &Path, dtype: DType, device: &Device) -> Result<Box<dyn Model>> {
        Ok(Box::new(Self::load(dir, dtype, device)?))
    }
}

impl Model for BertModel {
    fn forward(&self, input: &ModelInput) -> Result<Tensor> {
        self.bert.forward(input)
    }

    fn modules(&self) -> &Modules {
        &self.modules
    }

    fn architecture(&self) -> &'static str {
        "BertModel"
    }
}

/// transformers' `BertForSequenceClassification`: `classifier(dropout(pooler_output))`, logits
/// `(batch, num_labels)`.
pub struct BertForSequenceClassification {
    bert: Bert,
    classifier: Layer,
    modules: Modules,
}

impl BertForSequenceClassification {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_head(dir, dtype, device, None)
    }

    /// transformers' `from_pretrained(dir, num_labels=n)` for a fine-tuning start: a
    /// `classifier` missing from the checkpoint (a plain `BertModel` directory) is initialised
    /// as transformers does (weight `N(0, initializer_range²)`, bias 0), drawn from `seed`; a
    /// checkpoint head of another size is an error.
    pub fn load_with_head(
        dir: &Path,
        dtype: DType,
        device: &Device,
        new_head: Option<(usize, u64)>,
    ) -> Result<Self> {
        let mut cfg = BertConfig::from_dir(dir)?;
        if let Some((num_labels, _)) = new_head {
            cfg.num_labels = Some(num_labels);
            cfg.id2label = None;
        }
        let b = ModelBuilder::new(checkpoint_weights(dir, dtype, device, true)?);
        let bert = Bert::new(&b.pp(BASE_PREFIX), &cfg, true)?;
        let head = b.pp("classifier");
        let num_labels = cfg.num_labels()?;
        let classifier = match new_head {
            Some((_, seed)) if !head.vb().contains_tensor("weight") => {
                let mut init = Initializer::new(seed);
                let weight = init
                    .normal(&[num_labels, cfg.hidden_size], cfg.initializer_range, dtype)?
                    .to_device(device)?;
                let bias = Tensor::zeros(num_labels, dtype, device)?;
                head.new_layer(ModuleKind::Linear, weight, Some(bias))?
            }
            _ if !head.vb().contains_tensor("weight") => {
                return Err(PeftError::MissingKey {
                    key: "classifier.weight".into(),
                    context: format!(
                        "{}: a BertForSequenceClassification checkpoint needs its classification head (or give num_labels to start a new one)",
                        dir.display()
                    ),
                });
            }
            _ => head.linear(cfg.hidden_size, num_labels, true)?,
        };
        Ok(Self {
            bert,
            classifier,
            modules: b.modules(),
        })
    }

    pub fn load_boxed(dir: &Path, dtype: DType, device: &Device) -> Result<Box<dyn Model>> {
        Ok(Box::new(Self::load(dir, dtype, device)?))
    }
}

impl Model for BertForSequenceClassification {
    fn forward(&self, input: &ModelInput) -> Result<Tensor> {
        let hidden = self.bert.forward(input)?;
        // Dropout is the identity in eval mode.
        self.classifier.forward(&self.bert.pool(&hidden)?)
    }

    fn modules(&self) -> &Modules {
        &self.modules
    }

    fn architecture(&self) -> &'static str {
        "BertForSequenceClassification"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::deserialize_fields;
    use serde_json::json;

    fn parse(value: Value) -> Result<BertConfig> {
        let cfg: BertConfig = deserialize_fields(value)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn field_of(err: PeftError) -> String {
        match err {
            PeftError::InvalidConfig { field, .. } => field,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn defaults_and_unknown_fields_as_transformers() {
        let cfg = parse(json!({"hidden_size": 384, "gradient_checkpointing": false})).unwrap();
        assert_eq!(cfg.hidden_size, 384);
        assert_eq!(cfg.num_attention_heads, 12);
        assert_eq!(cfg.layer_norm_eps, 1e-12);
        assert_eq!(cfg.hidden_act, HiddenAct::Gelu);
        assert_eq!(cfg.num_labels().unwrap(), 2);
    }

    #[test]
    fn activation_names() {
        for (name, act) in [
            ("gelu", HiddenAct::Gelu),
            ("gelu_new", HiddenAct::GeluTanh),
            ("gelu_pytorch_tanh", HiddenAct::GeluTanh),
            ("relu", HiddenAct::Relu),
            ("swish", HiddenAct::Silu),
        ] {
            assert_eq!(parse(json!({"hidden_act": name})).unwrap().hidden_act, act);
        }
        let err = parse(json!({"hidden_act": "gelu_fast"})).unwrap_err();
        assert!(err.to_string().contains("gelu_fast"), "{err}");
        assert_eq!(field_of(err), "hidden_act");
    }

    #[test]
    fn num_labels_follow_id2label() {
        let labels = json!({"0": "neg", "1": "neutral", "2": "pos"});
        assert_eq!(
            parse(json!({"id2label": labels}))
                .unwrap()
                .num_labels()
                .unwrap(),
            3
        );
        assert_eq!(
            parse(json!({"num_labels": 5}))
                .unwrap()
                .num_labels()
                .unwrap(),
            5
        );
        let err = parse(json!({"id2label": labels, "num_labels": 2})).unwrap_err();
        assert_eq!(field_of(err), "num_labels");
    }

    #[test]
    fn unsupported_settings_are_refused() {
        for (config, field) in [
            (
                json!({"position_embedding_type": "relative_key"}),
                "position_embedding_type",
            ),
            (
                json!({"hidden_size": 100, "num_attention_heads": 12}),
                "num_attention_heads",
            ),
            (json!({"num_attention_heads": 0}), "num_attention_heads"),
            (json!({"is_decoder": true}), "is_decoder"),
            (json!({"hidden_size": "big"}), "hidden_size"),
        ] {
            assert_eq!(field_of(parse(config).unwrap_err()), field);
        }
    }
}
