"""Writes golden LoRA adapters made by the real `peft` package, with the numbers PEFT computes
for them, into rust/peft-rs/tests/golden/ (read by the Rust tests, which run without Python).

Each case directory holds:
  adapter/              PEFT's save_pretrained output
  base.safetensors      the base model's state_dict
  expected.safetensors  "merged.<key>": PEFT's merge_and_unload state_dict;
                        "input.<module>" / "output.<module>": a LoRA layer's input and output
  meta.json             Conv2d hyper-parameters per module

Run: python tests/generate_golden.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from conftest import (
    MLP,
    ConvModel,
    EmbedModel,
    GPT2Like,
    Stack,
    base_state_dict,
    make_model,
    module_input,
    peft_merged_state_dict,
)

OUT = Path(__file__).resolve().parents[1] / "rust" / "peft-rs" / "tests" / "golden"

CASES = {
    "linear": (MLP, {"target_modules": ["lin0", "classifier"], "lora_bias": True, "modules_to_save": None}),
    "modules_to_save": (MLP, {"target_modules": ["lin0"], "modules_to_save": ["classifier"]}),
    "patterns_rslora": (
        Stack,
        {
            "target_modules": ["q", "v"],
            "r": 4,
            "use_rslora": True,
            "rank_pattern": {"layers.1.q": 2},
            "alpha_pattern": {"v": 5},
        },
    ),
    "conv1d": (GPT2Like, {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
    "embedding": (EmbedModel, {"target_modules": ["emb", "lin0"]}),
    "conv2d": (ConvModel, {"target_modules": ["conv", "pw", "conv_s2"], "r": 4}),
}


def main() -> None:
    for name, (cls, kwargs) in CASES.items():
        case = OUT / name
        case.mkdir(parents=True, exist_ok=True)
        model = make_model(cls, seed=11)
        base = base_state_dict(model)
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **kwargs)).eval()
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if p.requires_grad and "lora_" not in pname:
                    p.add_(0.05)
        peft_model.save_pretrained(case / "adapter")
        (case / "adapter" / "README.md").unlink(missing_ok=True)
        expected = {f"merged.{k}": v for k, v in peft_merged_state_dict(peft_model).items()}
        meta = {}
        for mname, module in peft_model.base_model.model.named_modules():
            if not (getattr(module, "lora_A", None) or getattr(module, "lora_embedding_A", None)):
                continue
            x = module_input(module)
            with torch.no_grad():
                expected[f"input.{mname}"] = x
                expected[f"output.{mname}"] = module(x)
            base_layer = module.get_base_layer()
            if isinstance(base_layer, nn.Conv2d):
                meta[mname] = {"stride": base_layer.stride[0], "padding": base_layer.padding[0]}
        save_file(base, case / "base.safetensors")
        save_file({k: v.contiguous() for k, v in expected.items()}, case / "expected.safetensors")
        (case / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        print(f"wrote {case}")


if __name__ == "__main__":
    main()
