"""Reference models computed by peft_rs (candle), loading transformers-format directories
(`config.json` + `model.safetensors`, or shards with `model.safetensors.index.json`).

    model = peft_rs.models.BertModel.from_pretrained("minilm_dir")
    hidden = model(input_ids, attention_mask=mask)      # torch in -> torch out, numpy -> numpy
"""

from __future__ import annotations

from os import PathLike
from typing import Any, ClassVar

from ._core import ARCHITECTURES, Model


class _Architecture:
    """One transformers class: `from_pretrained` loads a directory as that architecture."""

    name: ClassVar[str]

    @classmethod
    def from_pretrained(cls, path: str | PathLike[str], dtype: Any = "float32") -> Model:
        return Model.from_pretrained(cls.name, path, dtype)


class BertModel(_Architecture):
    name = "BertModel"


class BertForSequenceClassification(_Architecture):
    name = "BertForSequenceClassification"

    @classmethod
    def from_pretrained(
        cls,
        path: str | PathLike[str],
        dtype: Any = "float32",
        num_labels: int | None = None,
        seed: int = 0,
    ) -> Model:
        """With `num_labels`, as transformers' `from_pretrained(path, num_labels=n)`: a checkpoint
        without a classification head (a plain BERT directory) gets a new one drawn from `seed`."""
        return Model.from_pretrained(cls.name, path, dtype, num_labels, seed)


class LlamaForCausalLM(_Architecture):
    name = "LlamaForCausalLM"


__all__ = ["ARCHITECTURES", "BertForSequenceClassification", "BertModel", "LlamaForCausalLM", "Model"]
