"""VeRA parity with the installed `peft` in both directions, with and without saved projections;
the projections regenerated from `projection_prng_key` equal torch's generator bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import VeraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import peft_rs
from conftest import (
    MLP,
    GPT2Like,
    Stack,
    assert_loads_in_peft,
    assert_matches_peft,
    base_state_dict,
    make_model,
)
from peft_rs import errors

CASES = {
    "mlp": (MLP, {"target_modules": ["lin0", "lin1"], "r": 6}),
    "mlp-no-projection": (MLP, {"target_modules": ["lin0", "lin1"], "r": 6, "save_projection": False}),
    "stack-seed": (Stack, {"target_modules": ["q", "v"], "r": 4, "projection_prng_key": 1234}),
    "conv1d": (GPT2Like, {"target_modules": ["c_attn", "c_proj"], "r": 5, "save_projection": False}),
}


def vera_layer(w, seed=0, **kwargs):
    """A VeRA layer on the Linear weight `w`. Its projections are shared by the model's layers, so
    it comes from a one-module model's PeftAdapter (an AdaptedLayer alone has no shared tensors)."""
    config = peft_rs.VeraConfig(target_modules=["m"], **kwargs)
    adapter = peft_rs.PeftAdapter.create(config, {"m.weight": w}, {"m": "linear"}, seed=seed)
    return adapter, adapter.layer("m", {"m.weight": w}, {"m": "linear"})


@pytest.mark.parametrize("seed,r,in_max,out_max", [(0, 4, 20, 20), (7, 16, 33, 9), (2**31 + 5, 3, 1000, 700)])
def test_projections_are_torch_bit_exact(seed, r, in_max, out_max):
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.empty(r, in_max)
    b = torch.empty(out_max, r)
    bound_a = 3**0.5 * (2**0.5 / in_max**0.5)
    bound_b = 3**0.5 * (2**0.5 / r**0.5)
    a.uniform_(-bound_a, bound_a, generator=g)
    b.uniform_(-bound_b, bound_b, generator=g)
    w = np.zeros((out_max, in_max), np.float32)
    adapter, layer = vera_layer(w, r=r, projection_prng_key=seed, init_weights=False)
    sd = adapter.state_dict(framework="torch")
    assert torch.equal(sd["base_model.vera_A"], a)
    assert torch.equal(sd["base_model.vera_B"], b)
    delta = torch.from_numpy(layer.merged_weight() - w)
    lam_b = torch.from_numpy(layer.weights()["vera_lambda_b"])
    lam_d = torch.from_numpy(layer.weights()["vera_lambda_d"])
    want = (lam_b[:, None] * b) @ (lam_d[:, None] * a)
    torch.testing.assert_close(delta, want, rtol=1e-6, atol=1e-6)


def test_layer_without_shared_projections_is_refused():
    layer = peft_rs.AdaptedLayer(np.zeros((3, 4), np.float32), module_name="m")
    with pytest.raises(errors.MissingKeyError, match="vera_A"):
        layer.add_adapter("default", peft_rs.VeraConfig(target_modules=["m"]))


def test_projections_equal_peft_buffers():
    model = make_model(MLP)
    base_sd, types = base_state_dict(model), peft_rs.module_types(model)
    peft_model = get_peft_model(
        model, VeraConfig(target_modules=["lin0", "lin1"], r=6, projection_prng_key=3)
    )
    vera_a = peft_model.base_model.vera_A["default"]
    vera_b = peft_model.base_model.vera_B["default"]
    config = peft_rs.VeraConfig(target_modules=["lin0", "lin1"], r=6, projection_prng_key=3)
    adapter = peft_rs.PeftAdapter.create(config, base_sd, types)
    sd = adapter.state_dict(framework="torch")
    assert torch.equal(sd["base_model.vera_A"], vera_a)
    assert torch.equal(sd["base_model.vera_B"], vera_b)


def perturbed_peft_model(cls, kwargs):
    model = make_model(cls)
    base_sd = base_state_dict(model)
    peft_model = get_peft_model(model, VeraConfig(init_weights=False, **kwargs)).eval()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "vera_lambda" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return peft_model, base_sd


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_loads_and_matches(case, tmp_path):
    cls, kwargs = CASES[case]
    peft_model, base_sd = perturbed_peft_model(cls, kwargs)
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert ("base_model.vera_A" in saved) == kwargs.get("save_projection", True)

    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert adapter.peft_type == "VERA"
    assert_matches_peft(adapter, peft_model, base_sd)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_rs_file_loads_in_peft(case, tmp_path):
    cls, kwargs = CASES[case]
    model = make_model(cls)
    base_sd = base_state_dict(model)
    adapter = peft_rs.PeftAdapter.create(
        peft_rs.VeraConfig(init_weights=False, **kwargs), base_sd, peft_rs.module_types(model), seed=1
    )
    assert_loads_in_peft(adapter, cls, base_sd, tmp_path)


def test_missing_shared_projection_is_named(tmp_path):
    peft_model, _ = perturbed_peft_model(MLP, {"target_modules": ["lin0", "lin1"], "r": 6})
    peft_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.vera_B"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(errors.MissingKeyError, match=r"base_model\.vera_B"):
        peft_rs.PeftAdapter.from_pretrained(tmp_path)


def test_identity_at_default_init():
    w = np.random.default_rng(0).standard_normal((6, 5), dtype=np.float32)
    x = np.random.default_rng(1).standard_normal((3, 5), dtype=np.float32)
    _, layer = vera_layer(w, r=4)
    np.testing.assert_allclose(layer.forward(x), x @ w.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layer.weights()["vera_lambda_d"], np.full(4, 0.1, np.float32))


@settings(max_examples=30, deadline=None)
@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), r=st.integers(1, 8), seed=st.integers(0, 1000))
def test_properties(d_in, d_out, r, seed):
    g = np.random.default_rng(seed)
    w = g.standard_normal((d_out, d_in), dtype=np.float32)
    x = g.standard_normal((2, 3, d_in), dtype=np.float32)
    _, identity = vera_layer(w, r=r, projection_prng_key=seed)
    np.testing.assert_allclose(identity.forward(x), x @ w.T, rtol=1e-5, atol=1e-5)
    _, layer = vera_layer(w, seed=seed, r=r, projection_prng_key=seed, init_weights=False)
    y = layer.forward(x)
    layer.merge()
    np.testing.assert_allclose(layer.forward(x), y, rtol=1e-4, atol=1e-4)
    layer.unmerge()
    np.testing.assert_allclose(layer.base_weight, w, rtol=1e-5, atol=1e-5)
