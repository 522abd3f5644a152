"""DoRA (`LoraConfig(use_dora=True)`) parity with the installed `peft` in both directions, with
magnitudes moved away from ‖W + sBA‖ so the renormalisation is exercised; exact unmerge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import peft_rs
from conftest import (
    MLP,
    ConvModel,
    EmbedModel,
    GPT2Like,
    assert_loads_in_peft,
    assert_matches_peft,
    base_state_dict,
    make_model,
)

CASES = {
    "linear": (MLP, {"target_modules": ["lin0", "lin1"]}),
    "conv1d": (GPT2Like, {"target_modules": ["c_attn", "c_proj"]}),
    "embedding": (EmbedModel, {"target_modules": ["emb", "lin0"]}),
    "conv2d": (ConvModel, {"target_modules": ["conv", "pw", "conv_s2"], "r": 4}),
    "rslora-patterns": (
        MLP,
        {"target_modules": ["lin0", "lin1"], "use_rslora": True, "rank_pattern": {"lin1": 3}},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_loads_and_matches(case, tmp_path):
    cls, kwargs = CASES[case]
    model = make_model(cls)
    base_sd = base_state_dict(model)
    peft_model = get_peft_model(model, LoraConfig(use_dora=True, init_lora_weights=False, **kwargs)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith(".lora_magnitude_vector") for k in saved)

    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert_matches_peft(adapter, peft_model, base_sd)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_rs_file_loads_in_peft(case, tmp_path):
    cls, kwargs = CASES[case]
    model = make_model(cls)
    base_sd = base_state_dict(model)
    config = peft_rs.LoraConfig(use_dora=True, init_lora_weights=False, **kwargs)
    adapter = peft_rs.PeftAdapter.create(config, base_sd, peft_rs.module_types(model), seed=2)
    assert_loads_in_peft(adapter, cls, base_sd, tmp_path)


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["linear", "conv1d", "embedding"]),
    d_in=st.integers(2, 16),
    d_out=st.integers(2, 16),
    r=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_merge_unmerge_round_trip_and_merged_forward(kind, d_in, d_out, r, seed):
    g = np.random.default_rng(seed)
    if kind == "embedding":
        w = g.standard_normal((d_in, d_out), dtype=np.float32)
        x = g.integers(0, d_in, size=(2, 3))
    else:
        w = g.standard_normal((d_in, d_out) if kind == "conv1d" else (d_out, d_in), dtype=np.float32)
        x = g.standard_normal((2, 3, d_in), dtype=np.float32)
    layer = peft_rs.AdaptedLayer(w, kind=kind)
    layer.add_adapter("default", peft_rs.LoraConfig(r=r, use_dora=True, init_lora_weights=False), seed=seed)
    m = layer.weights()["lora_magnitude_vector"]
    m *= g.uniform(0.5, 1.5, m.shape).astype(np.float32)  # shared with the layer: no copy
    unmerged = layer.forward(x)
    layer.merge()
    np.testing.assert_allclose(layer.forward(x), unmerged, rtol=1e-4, atol=1e-4)
    layer.unmerge()
    np.testing.assert_allclose(layer.base_weight, w, rtol=1e-4, atol=1e-5)


def test_identity_at_default_init():
    w = np.random.default_rng(0).standard_normal((6, 5), dtype=np.float32)
    x = np.random.default_rng(1).standard_normal((4, 5), dtype=np.float32)
    layer = peft_rs.AdaptedLayer(w)
    layer.add_adapter("default", peft_rs.LoraConfig(r=2, use_dora=True))
    np.testing.assert_allclose(layer.forward(x), x @ w.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.weights()["lora_magnitude_vector"], np.linalg.norm(w, axis=1), rtol=1e-6)
