"""LoRA parity with the installed `peft`, in both directions: PEFT writes → peft_rs reads and
computes; peft_rs writes → PEFT reads and computes. Adapters are initialised away from identity
(`init_lora_weights=False`) and non-LoRA trainables are perturbed, so every number is tested."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

import peft_rs
from conftest import (
    BF16_TOL,
    MLP,
    ConvModel,
    EmbedModel,
    GPT2Like,
    Stack,
    assert_close,
    assert_loads_in_peft,
    assert_matches_peft,
    base_state_dict,
    make_model,
    peft_merged_state_dict,
    peft_module_types,
)

CASES = {
    "list-targets": (MLP, {"target_modules": ["lin0", "lin1"]}),
    "regex-target": (Stack, {"target_modules": r"model\.layers\.[02]\.q"}),
    "modules-to-save": (MLP, {"target_modules": ["lin0"], "modules_to_save": ["classifier"]}),
    "rslora": (MLP, {"target_modules": ["lin0", "lin1"], "use_rslora": True, "lora_alpha": 12}),
    "patterns": (
        Stack,
        {
            "target_modules": ["q", "v"],
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": {"layers.1.q": 2, "v": 6},
            "alpha_pattern": {"layers.2.v": 3},
        },
    ),
    "layers-to-transform": (Stack, {"target_modules": ["q", "v"], "layers_to_transform": [0, 2]}),
    "lora-bias": (MLP, {"target_modules": ["lin0", "classifier"], "lora_bias": True}),
    "bias-all": (MLP, {"target_modules": ["lin0"], "bias": "all"}),
    "bias-lora-only": (MLP, {"target_modules": ["lin0", "classifier"], "bias": "lora_only"}),
    "dropout": (MLP, {"target_modules": ["lin0"], "lora_dropout": 0.3}),
    "conv1d": (GPT2Like, {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
    # PEFT sets fan_in_fan_out=True itself for Conv1D targets (and saves it); so must we.
    "conv1d-auto": (GPT2Like, {"target_modules": ["c_attn", "c_proj"]}),
    "embedding": (EmbedModel, {"target_modules": ["emb", "lin0"]}),
    "conv2d": (ConvModel, {"target_modules": ["conv", "pw", "conv_s2"], "r": 4}),
}


def make_peft_model(cls, kwargs, dtype=torch.float32, adapter_name="default"):
    model = make_model(cls, dtype=dtype)
    base_sd = base_state_dict(model)
    config = LoraConfig(init_lora_weights=False, **kwargs)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name).eval()
    # Move every other trainable (modules_to_save, biases) away from the base model.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    return peft_model, base_sd


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_loads_and_matches(case, tmp_path):
    cls, kwargs = CASES[case]
    peft_model, base_sd = make_peft_model(cls, kwargs)
    peft_model.save_pretrained(tmp_path)

    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert adapter.peft_type == "LORA"
    lora_layers = {
        name.removeprefix("base_model.model."): m
        for name, m in peft_model.named_modules()
        if (hasattr(m, "lora_A") and m.lora_A) or (hasattr(m, "lora_embedding_A") and m.lora_embedding_A)
    }
    assert adapter.module_names() == sorted(lora_layers)

    assert_matches_peft(adapter, peft_model, base_sd)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_rs_file_loads_in_peft(case, tmp_path):
    cls, kwargs = CASES[case]
    model = make_model(cls)
    base_sd = base_state_dict(model)
    config = peft_rs.LoraConfig(init_lora_weights=False, **kwargs)
    adapter = peft_rs.PeftAdapter.create(config, base_sd, peft_rs.module_types(model), seed=3)
    assert_loads_in_peft(adapter, cls, base_sd, tmp_path)
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "LORA"


def test_named_adapter_subfolder(tmp_path):
    peft_model, base_sd = make_peft_model(MLP, {"target_modules": ["lin0"]}, adapter_name="other")
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path, adapter_name="other")
    assert adapter.adapter_name == "other"
    expected = peft_merged_state_dict(peft_model)
    for key, value in adapter.merge_into(base_sd, peft_module_types(peft_model)).items():
        assert_close(value, expected[key], msg=key)
    out = tmp_path / "resaved"
    written = adapter.save_pretrained(out)
    # The directory written is returned, and it is the named sub-folder (as PEFT), not `out`.
    assert os.fspath(written) == str(out / "other")
    assert sorted(os.listdir(out)) == ["other"]
    assert sorted(os.listdir(out / "other")) == ["adapter_config.json", "adapter_model.safetensors"]
    reloaded = PeftModel.from_pretrained(make_model(MLP), written, adapter_name="other")
    theirs = get_peft_model_state_dict(reloaded, adapter_name="other")
    ours = adapter.state_dict(framework="torch")
    assert set(theirs) == set(ours)
    for key, value in ours.items():
        assert_close(theirs[key], value, msg=key)


def test_legacy_bin_checkpoint(tmp_path):
    peft_model, base_sd = make_peft_model(MLP, {"target_modules": ["lin0", "lin1"]})
    peft_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    expected = peft_merged_state_dict(peft_model)
    for key, value in adapter.merge_into(base_sd, peft_module_types(peft_model)).items():
        assert_close(value, expected[key], msg=key)


@pytest.mark.parametrize("cls,kwargs", [CASES["list-targets"], CASES["embedding"], CASES["conv1d"]])
def test_bf16_base(cls, kwargs, tmp_path):
    """bf16 base weights: PEFT keeps adapters in f32, computes in f32 and casts back."""
    peft_model, base_sd = make_peft_model(cls, kwargs, dtype=torch.bfloat16)
    peft_model.save_pretrained(tmp_path)
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert all(v.dtype == torch.bfloat16 for v in base_sd.values())
    # Same keys, dtypes (bf16 kept) and values as PEFT's merged model and bf16 layer outputs.
    assert_matches_peft(adapter, peft_model, base_sd, tol=BF16_TOL)


def test_config_round_trip_with_peft(tmp_path):
    """Every field PEFT writes is written by us, with the same values, and vice versa."""
    kwargs = {
        "r": 6,
        "lora_alpha": 12,
        "target_modules": ["lin0", "lin1"],
        "lora_dropout": 0.05,
        "use_rslora": True,
        "rank_pattern": {"lin1": 2},
        "alpha_pattern": {"lin0": 5},
        "modules_to_save": ["classifier"],
        "bias": "lora_only",
        "init_lora_weights": "gaussian",
    }
    ours = peft_rs.LoraConfig(**kwargs).to_dict()
    theirs = json.loads(json.dumps(LoraConfig(**kwargs).to_dict(), default=sorted))
    assert set(ours) == set(theirs)
    for key in theirs:
        if key in ("peft_version", "target_modules", "modules_to_save"):
            continue
        assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    # A PEFT dict (with sets and enums) is accepted as is.
    assert peft_rs.LoraConfig.from_dict(LoraConfig(**kwargs).to_dict()).r == 6


def test_numpy_in_numpy_out(tmp_path):
    peft_model, base_sd = make_peft_model(MLP, {"target_modules": ["lin0"]})
    peft_model.save_pretrained(tmp_path)
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    np_sd = {k: v.numpy() for k, v in base_sd.items()}
    types = peft_module_types(peft_model)
    merged = adapter.merge_into(np_sd, types)
    assert all(isinstance(v, np.ndarray) for v in merged.values())
    assert merged["lin1.weight"] is np_sd["lin1.weight"]  # untouched entries are passed through
    expected = peft_merged_state_dict(peft_model)
    np.testing.assert_allclose(merged["lin0.weight"], expected["lin0.weight"].numpy(), rtol=1e-5, atol=1e-5)
    x = np.random.default_rng(0).standard_normal((4, 10), dtype=np.float32)
    y = adapter.forward("lin0", x, np_sd, types)
    assert isinstance(y, np.ndarray)
    with torch.no_grad():
        want = peft_model.base_model.model.lin0(torch.from_numpy(x))
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-5, atol=1e-5)
