"""AdaLoRA parity with the installed `peft`: an adapter trained with PEFT's rank allocator (so
its file is cut to the kept ranks, one layer down to rank 0) is reproduced by peft_rs; and an
adapter written by peft_rs at pruned ranks loads in PEFT with the same outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import AdaLoraConfig, get_peft_model
from safetensors.torch import load_file

import peft_rs
from conftest import (
    MLP,
    ConvModel,
    GPT2Like,
    assert_loads_in_peft,
    assert_matches_peft,
    base_state_dict,
    make_model,
    model_input,
)
from peft_rs import errors

SCHEDULE = {"init_r": 6, "target_r": 2, "total_step": 10, "tinit": 1, "tfinal": 2, "deltaT": 1}


def train_with_peft(cls, targets, **kwargs):
    model = make_model(cls)
    base_sd = base_state_dict(model)
    config = AdaLoraConfig(target_modules=targets, lora_alpha=16, **SCHEDULE, **kwargs)
    peft_model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(0)
    x = model_input(model, (8,))
    target = peft_model(x).detach() + torch.randn(peft_model(x).shape, generator=g)
    for step in range(SCHEDULE["total_step"]):
        loss = ((peft_model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad()
    return peft_model.eval(), base_sd


@pytest.mark.parametrize(
    "cls,targets",
    [
        (MLP, ["lin0", "lin1", "classifier"]),
        (GPT2Like, ["c_attn", "c_proj"]),
        (ConvModel, ["conv", "pw", "conv_s2"]),
    ],
)
def test_pruned_peft_adapter_loads_and_matches(cls, targets, tmp_path):
    peft_model, base_sd = train_with_peft(cls, targets)
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    ranks = {k: v.shape[0] for k, v in saved.items() if k.endswith("lora_E")}
    assert min(ranks.values()) < SCHEDULE["init_r"], ranks  # the file really is truncated

    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert adapter.peft_type == "ADALORA"
    assert_matches_peft(adapter, peft_model, base_sd)


def test_peft_rs_adapter_loads_in_peft(tmp_path):
    model = make_model(MLP)
    base_sd = base_state_dict(model)
    pattern = {"lin0.lora_E": [True, False, True, True, False, False], "lin1.lora_E": [False] * 6}
    config = peft_rs.AdaLoraConfig(
        target_modules=["lin0", "lin1"],
        init_lora_weights=False,
        rank_pattern=pattern,
        lora_alpha=12,
        **SCHEDULE,
    )
    adapter = peft_rs.PeftAdapter.create(config, base_sd, peft_rs.module_types(model), seed=4)
    saved = assert_loads_in_peft(adapter, MLP, base_sd, tmp_path)
    assert saved["base_model.model.lin0.lora_A"].shape == (3, 10)
    assert saved["base_model.model.lin1.lora_B"].shape == (16, 0)  # rank 0: a zero-size tensor


def test_config_matches_peft_and_validates():
    ours = peft_rs.AdaLoraConfig(target_modules=["a"], total_step=10).to_dict()
    theirs = AdaLoraConfig(target_modules=["a"], total_step=10).to_dict()
    assert set(ours) == set(theirs)
    for key in (
        "init_r",
        "target_r",
        "tinit",
        "tfinal",
        "deltaT",
        "beta1",
        "beta2",
        "orth_reg_weight",
        "total_step",
    ):
        assert ours[key] == theirs[key], key
    with pytest.raises(errors.ConfigError, match="total_step"):
        peft_rs.AdaLoraConfig(target_modules=["a"])
    with pytest.raises(errors.ConfigError, match="use_dora"):
        peft_rs.AdaLoraConfig(target_modules=["a"], total_step=10, use_dora=True)
    with pytest.raises(errors.ConfigError, match="rank_pattern"):
        peft_rs.AdaLoraConfig(
            target_modules=["a"], total_step=10, init_r=3, rank_pattern={"a.lora_E": [True]}
        )


def test_inconsistent_rank_pattern_in_file(tmp_path):
    peft_model, _ = train_with_peft(MLP, ["lin0", "lin1"])
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["rank_pattern"] = {k: [True] * SCHEDULE["init_r"] for k in cfg["rank_pattern"]}
    path.write_text(json.dumps(cfg))
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)  # the tensors are checked per layer
    model = make_model(MLP)
    with pytest.raises(errors.ShapeError, match=r"lora_[ABE].*rank 6"):
        adapter.merge_into(base_state_dict(model), peft_rs.module_types(model))


def adalora_layer(w, config, seed=0):
    layer = peft_rs.AdaptedLayer(w, module_name="m")  # "m": the module rank_pattern names
    layer.add_adapter("default", config, seed=seed)
    return layer


def test_identity_at_default_init_and_merge_round_trip():
    g = np.random.default_rng(0)
    w = g.standard_normal((7, 5), dtype=np.float32)
    x = g.standard_normal((3, 5), dtype=np.float32)
    layer = adalora_layer(w, peft_rs.AdaLoraConfig(total_step=10, init_r=4))
    np.testing.assert_allclose(layer.forward(x), x @ w.T, rtol=1e-5, atol=1e-6)
    layer = adalora_layer(w, peft_rs.AdaLoraConfig(total_step=10, init_r=4, init_lora_weights=False))
    y = layer.forward(x)
    layer.merge()
    np.testing.assert_allclose(layer.forward(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(layer.base_weight, w, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    init_r=st.integers(1, 6),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_properties(d_in, d_out, init_r, seed, data):
    mask = data.draw(st.lists(st.booleans(), min_size=init_r, max_size=init_r))
    g = np.random.default_rng(seed)
    w = g.standard_normal((d_out, d_in), dtype=np.float32)
    pattern = {"m.lora_E": mask}
    kwargs = {"total_step": 10, "init_r": init_r, "rank_pattern": pattern}
    identity = adalora_layer(w, peft_rs.AdaLoraConfig(**kwargs), seed=seed)
    x = g.standard_normal((2, 3, d_in), dtype=np.float32)
    np.testing.assert_allclose(identity.forward(x), x @ w.T, rtol=1e-5, atol=1e-5)
    layer = adalora_layer(w, peft_rs.AdaLoraConfig(init_lora_weights=False, **kwargs), seed=seed)
    assert layer.weights()["lora_E"].shape == (sum(mask), 1)
    y = layer.forward(x)
    layer.merge()
    np.testing.assert_allclose(layer.forward(x), y, rtol=1e-4, atol=1e-4)
    layer.unmerge()
    np.testing.assert_allclose(layer.base_weight, w, rtol=1e-5, atol=1e-5)
