"""BOFT parity with the installed `peft`, both directions, with `init_weights=False` so the
rotations and scalings are not the identity; plus merge/unmerge properties.

PEFT builds more than one butterfly factor only when its CUDA extension (`fbd_cuda`) compiles;
otherwise (this CPU machine) it silently uses one factor whatever the config says. To test PEFT's
own multi-factor code on CPU, `fbd_extension` stands in for the extension with the block-diagonal
it computes (`torch.block_diag` per factor); everything else is PEFT's code.
"""

from __future__ import annotations

import contextlib
import copy
import re

import numpy as np
import peft.tuners.boft.layer as peft_boft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import BOFTConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import peft_rs
from conftest import (
    BF16_TOL,
    MLP,
    ConvModel,
    GPT2Like,
    Stack,
    assert_close,
    assert_loads_in_peft,
    assert_matches_peft,
    base_state_dict,
    make_model,
    peft_merged_state_dict,
)
from peft_rs import errors


class _BlockDiagExtension:
    """PEFT's `fbd_cuda` extension, computed with torch on any device: `(N, D, H, H)` blocks to
    `N` block-diagonal matrices `(N, D·H, D·H)`."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad, blocks):
        raise NotImplementedError("only forward passes are compared")


@contextlib.contextmanager
def fbd_extension(available: bool = True):
    """PEFT as it runs with (or without) its CUDA extension."""
    saved = peft_boft._FBD_CUDA
    peft_boft._FBD_CUDA = _BlockDiagExtension() if available else None
    try:
        yield
    finally:
        peft_boft._FBD_CUDA = saved


# case -> (model, config kwargs, whether PEFT runs with its extension, i.e. honours the factor)
CASES = {
    "linear": (MLP, {"target_modules": ["lin0", "lin1", "classifier"], "boft_block_size": 2}, False),
    "linear-block-num": (
        MLP,
        {"target_modules": ["lin0", "lin1", "classifier"], "boft_block_size": 0, "boft_block_num": 2},
        False,
    ),
    "bias-boft-only": (
        MLP,
        {"target_modules": ["lin0", "classifier"], "boft_block_size": 2, "bias": "boft_only"},
        False,
    ),
    "bias-all": (MLP, {"target_modules": ["lin1"], "boft_block_size": 5, "bias": "all"}, False),
    "modules-to-save": (
        MLP,
        {"target_modules": ["lin0"], "boft_block_size": 5, "modules_to_save": ["classifier"]},
        False,
    ),
    "layers-to-transform": (
        Stack,
        {"target_modules": ["q", "v"], "boft_block_size": 2, "layers_to_transform": [0, 2]},
        False,
    ),
    # Written by PEFT without its extension: the config says 2 factors, the file holds 1.
    "factor-2-cpu-file": (
        Stack,
        {"target_modules": ["q", "v"], "boft_block_size": 2, "boft_n_butterfly_factor": 2},
        False,
    ),
    "factor-2": (
        MLP,
        {"target_modules": ["lin1", "classifier"], "boft_block_size": 2, "boft_n_butterfly_factor": 2},
        True,
    ),
    "factor-3": (
        Stack,
        {"target_modules": ["q", "v"], "boft_block_size": 2, "boft_n_butterfly_factor": 3},
        True,
    ),
    "factor-2-block-num": (
        Stack,
        {
            "target_modules": ["q", "v"],
            "boft_block_size": 0,
            "boft_block_num": 2,
            "boft_n_butterfly_factor": 2,
        },
        True,
    ),
    "conv2d": (ConvModel, {"target_modules": ["conv", "conv_s2"], "boft_block_size": 3}, False),
    "conv2d-pointwise": (
        ConvModel,
        {"target_modules": ["pw"], "boft_block_size": 2, "bias": "boft_only"},
        False,
    ),
    "conv2d-factor-2": (
        ConvModel,
        {"target_modules": ["pw", "conv_s2"], "boft_block_size": 2, "boft_n_butterfly_factor": 2},
        True,
    ),
}


def boft_layers(peft_model):
    return {
        n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "boft_R")
    }


def make_peft_model(cls, kwargs, dtype=torch.float32):
    model = make_model(cls, dtype=dtype)
    base_sd = base_state_dict(model)
    peft_model = get_peft_model(model, BOFTConfig(init_weights=False, **kwargs)).eval()
    # Move every other trainable (modules_to_save, biases) away from the base model.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "boft_" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    return peft_model, base_sd


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_loads_and_matches(case, tmp_path):
    cls, kwargs, extension = CASES[case]
    with fbd_extension(extension):
        peft_model, base_sd = make_peft_model(cls, kwargs)
        peft_model.save_pretrained(tmp_path)
        adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
        assert adapter.peft_type == "BOFT"
        assert adapter.module_names() == sorted(boft_layers(peft_model))
        assert_matches_peft(adapter, peft_model, base_sd)
    factors = kwargs.get("boft_n_butterfly_factor", 1) if extension else 1
    assert all(t.shape[0] == factors for k, t in adapter.state_dict("torch").items() if k.endswith("boft_R"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_rs_file_loads_in_peft(case, tmp_path):
    cls, kwargs, extension = CASES[case]
    model = make_model(cls)
    base_sd = base_state_dict(model)
    config = peft_rs.BOFTConfig(init_weights=False, **kwargs)
    adapter = peft_rs.PeftAdapter.create(config, base_sd, peft_rs.module_types(model), seed=5)
    # A new adapter has the config's factor: PEFT reads it as it runs with its extension.
    with fbd_extension(extension or kwargs.get("boft_n_butterfly_factor", 1) > 1):
        saved = assert_loads_in_peft(adapter, cls, base_sd, tmp_path)
    factors = kwargs.get("boft_n_butterfly_factor", 1)
    assert all(t.shape[0] == factors for k, t in saved.items() if k.endswith("boft_R"))


@pytest.mark.parametrize("case", ["linear", "conv2d"])
def test_bf16_base_matches_peft(case, tmp_path):
    """A bf16 base: PEFT keeps the adapter in f32, merges in f32 and stores bf16 (our merged
    weights equal PEFT's), and computes the rotated input in bf16 (Linear) or the conv in f32
    (Conv2d); outputs agree to bf16 rounding."""
    cls, kwargs, _ = CASES[case]
    peft_model, base_sd = make_peft_model(cls, kwargs, dtype=torch.bfloat16)
    peft_model.save_pretrained(tmp_path)
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert all(v.dtype == torch.bfloat16 for v in base_sd.values())
    assert_matches_peft(adapter, peft_model, base_sd, tol=BF16_TOL)


def test_two_active_adapters_match_peft():
    """Several active BOFT adapters: PEFT rotates by the product of their rotations and multiplies
    their scalings; merging both gives the same layer."""
    kwargs_a = {"target_modules": ["lin1"], "boft_block_size": 4}
    kwargs_b = {"target_modules": ["lin1"], "boft_block_size": 0, "boft_block_num": 2}
    model = make_model(MLP)
    base_sd = base_state_dict(model)
    peft_model = get_peft_model(model, BOFTConfig(init_weights=False, **kwargs_a), adapter_name="a")
    peft_model.add_adapter("b", BOFTConfig(init_weights=False, **kwargs_b))
    peft_model.base_model.set_adapter(["a", "b"])
    peft_model.eval()
    peft_layer = peft_model.base_model.model.lin1
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = peft_layer(x)

    layer = peft_rs.AdaptedLayer(base_sd["lin1.weight"], None, kind="linear", module_name="lin1")
    for name, kwargs in (("a", kwargs_a), ("b", kwargs_b)):
        weights = {p: getattr(peft_layer, p)[name].detach().clone() for p in ("boft_R", "boft_s")}
        layer.add_adapter(name, peft_rs.BOFTConfig(init_weights=False, **kwargs), weights=weights)
    layer.set_adapter(["a", "b"])
    assert_close(layer(x), want)
    merged = peft_merged_state_dict(peft_model)["lin1.weight"]
    assert_close(layer.merged_weight(["a", "b"]), merged)
    layer.merge()
    assert_close(layer.base_weight, merged)
    assert_close(layer(x), want)


def test_full_dropout_in_training_matches_peft():
    """With boft_dropout=1 PEFT's multiplicative dropout replaces every block of the (single)
    factor by the identity in training, which leaves only the scaling: deterministic, so
    comparable. In eval mode the dropout is off."""
    kwargs = {"target_modules": ["lin0"], "boft_block_size": 2, "boft_dropout": 1.0}
    peft_model, base_sd = make_peft_model(MLP, kwargs)
    peft_layer = peft_model.base_model.model.lin0
    weights = {p: getattr(peft_layer, p)["default"].detach().clone() for p in ("boft_R", "boft_s")}
    layer = peft_rs.AdaptedLayer(
        base_sd["lin0.weight"], base_sd["lin0.bias"], kind="linear", module_name="lin0"
    )
    layer.add_adapter("default", peft_rs.BOFTConfig(init_weights=False, **kwargs), weights=weights)
    layer.set_adapter("default")
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    for training in (True, False):
        peft_layer.train(training)
        layer.train(training)
        with torch.no_grad():
            assert_close(layer(x), peft_layer(x), msg=f"training={training}")


def test_config_matches_peft():
    kwargs = {"target_modules": ["a", "b"], "boft_block_size": 8, "boft_dropout": 0.1, "bias": "boft_only"}
    ours = peft_rs.BOFTConfig(**kwargs).to_dict()
    theirs = BOFTConfig(**kwargs).to_dict()
    assert set(ours) == set(theirs)
    for key in theirs:
        if key not in ("target_modules", "peft_version"):
            assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"boft_block_size": 0, "boft_block_num": 0},
        {"boft_block_size": 4, "boft_block_num": 2},
        {"layers_pattern": "layers"},
    ],
)
def test_invalid_config_fails_like_peft(kwargs):
    with pytest.raises(ValueError) as peft_error:
        BOFTConfig(target_modules=["lin0"], **kwargs)
    with pytest.raises(errors.ConfigError, match=re.escape(str(peft_error.value).strip())):
        peft_rs.BOFTConfig(target_modules=["lin0"], **kwargs)


def test_out_of_range_fields_are_rejected():
    for kwargs, field in (
        ({"boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor"),
        ({"boft_dropout": 1.5}, "boft_dropout"),
        ({"boft_dropout": -0.1}, "boft_dropout"),
        ({"bias": "lora_only"}, "bias"),
        ({"boft_block_size": -2}, "boft_block_size"),
    ):
        with pytest.raises(errors.ConfigError, match=field):
            peft_rs.BOFTConfig(target_modules=["lin0"], **kwargs)


# (model, config kwargs, whether PEFT needs its extension to check the factor)
LAYER_ERRORS = {
    "size-not-divisor": (MLP, {"target_modules": ["lin0"], "boft_block_size": 3}, False),
    "num-not-divisor": (MLP, {"target_modules": ["lin0"], "boft_block_size": 0, "boft_block_num": 3}, False),
    "conv-size": (ConvModel, {"target_modules": ["conv"], "boft_block_size": 2}, False),
    "factor-too-large": (
        Stack,
        {"target_modules": ["q"], "boft_block_size": 2, "boft_n_butterfly_factor": 4},
        True,
    ),
    "factor-vs-block-num": (
        Stack,
        {"target_modules": ["q"], "boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 4},
        True,
    ),
    "odd-block-size": (
        MLP,
        {"target_modules": ["lin0"], "boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 2},
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(LAYER_ERRORS))
def test_invalid_layer_fails_like_peft(case):
    cls, kwargs, extension = LAYER_ERRORS[case]
    with fbd_extension(extension), pytest.raises(ValueError) as peft_error:
        get_peft_model(make_model(cls), BOFTConfig(**kwargs))
    model = make_model(cls)
    with pytest.raises(errors.ConfigError, match=re.escape(str(peft_error.value))):
        peft_rs.PeftAdapter.create(
            peft_rs.BOFTConfig(**kwargs), base_state_dict(model), peft_rs.module_types(model)
        )


def test_unsupported_layers_are_refused():
    model = make_model(GPT2Like)
    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(make_model(GPT2Like), BOFTConfig(target_modules=["c_attn"]))
    with pytest.raises(errors.InvalidOperationError, match="Conv1D"):
        peft_rs.PeftAdapter.create(
            peft_rs.BOFTConfig(target_modules=["c_attn"]), base_state_dict(model), peft_rs.module_types(model)
        )
    w = torch.randn(4, 2, 3, 3)
    layer = peft_rs.AdaptedLayer(w, kind="conv2d", dilation=2)
    with pytest.raises(errors.InvalidOperationError, match="dilat"):
        layer.add_adapter("a", peft_rs.BOFTConfig(boft_block_size=2))
    layer = peft_rs.AdaptedLayer(torch.randn(4, 1, 3, 3), kind="conv2d", groups=2)
    with pytest.raises(errors.InvalidOperationError, match="groups"):
        layer.add_adapter("a", peft_rs.BOFTConfig(boft_block_size=3))


def test_fan_in_fan_out_is_saved_false_for_linear_as_peft_does():
    kwargs = {"target_modules": ["lin0"], "boft_block_size": 2, "fan_in_fan_out": True}
    model = make_model(MLP)
    peft_model = get_peft_model(make_model(MLP), BOFTConfig(**kwargs))
    adapter = peft_rs.PeftAdapter.create(
        peft_rs.BOFTConfig(**kwargs), base_state_dict(model), peft_rs.module_types(model)
    )
    assert (
        adapter.config.to_dict()["fan_in_fan_out"]
        is peft_model.peft_config["default"].fan_in_fan_out
        is False
    )


def test_file_with_other_factor_names_the_shapes(tmp_path):
    """A file's `boft_R` may hold the config's factor (PEFT with its extension) or 1 (without);
    any other first dimension is an error naming expected and found shapes."""
    kwargs = {"target_modules": ["q"], "boft_block_size": 2, "boft_n_butterfly_factor": 2}
    peft_model, _ = make_peft_model(Stack, kwargs)
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.q.boft_R"
    assert tensors[key].shape == (1, 4, 2, 2)
    tensors[key] = tensors[key].repeat(3, 1, 1, 1)
    save_file(tensors, path)
    # Shapes are checked against the model's modules, when layers are built.
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    model = make_model(Stack)
    with pytest.raises(errors.ShapeError, match=r"layers\.0\.q\.boft_R.*\[2, 4, 2, 2\].*\[3, 4, 2, 2\]"):
        adapter.merge_into(base_state_dict(model), peft_rs.module_types(model))


def test_default_init_is_identity_as_in_peft():
    kwargs = {"target_modules": ["conv", "conv_s2"], "boft_block_size": 3}
    model = make_model(ConvModel)
    base_sd = base_state_dict(model)
    peft_merged = peft_merged_state_dict(get_peft_model(make_model(ConvModel), BOFTConfig(**kwargs)))
    adapter = peft_rs.PeftAdapter.create(peft_rs.BOFTConfig(**kwargs), base_sd, peft_rs.module_types(model))
    merged = adapter.merge_into(base_sd, peft_rs.module_types(model))
    for key, value in merged.items():
        assert torch.equal(value, base_sd[key]), key
        assert torch.equal(value, peft_merged[key]), key


@st.composite
def butterflies(draw):
    """A valid (factors, block_num, block_size) for a Linear layer, as PEFT's checks require."""
    factors = draw(st.integers(1, 3))
    if factors == 1:
        block_size, block_num = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    else:
        block_size = 2 * draw(st.integers(1, 2))
        block_num = max(2, 2 ** (factors - 1)) * draw(st.integers(1, 2))
    return factors, block_num, block_size


def peft_linear_layer(d_in, d_out, bias, factors, block_size, seed):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(d_in, d_out, bias=bias))
    kwargs = {"target_modules": ["lin"], "boft_block_size": block_size, "boft_n_butterfly_factor": factors}
    with fbd_extension(factors > 1):
        peft_model = get_peft_model(model, BOFTConfig(init_weights=False, **kwargs)).eval()
    return peft_model, kwargs


@settings(max_examples=40, deadline=None)
@given(butterfly=butterflies(), d_out=st.integers(1, 12), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_random_layers_match_peft_and_round_trip(butterfly, d_out, bias, seed):
    """Against PEFT: the forward and the merged weight. Then: merged forward == unmerged forward,
    and unmerging restores the base weight."""
    factors, block_num, block_size = butterfly
    d_in = block_num * block_size
    peft_model, kwargs = peft_linear_layer(d_in, d_out, bias, factors, block_size, seed)
    peft_layer = peft_model.base_model.model.lin
    base = peft_layer.get_base_layer()
    weight, b = base.weight.detach().clone(), None if base.bias is None else base.bias.detach().clone()
    layer = peft_rs.AdaptedLayer(weight, b, kind="linear", module_name="lin")
    params = {p: getattr(peft_layer, p)["default"].detach().clone() for p in ("boft_R", "boft_s")}
    assert params["boft_R"].shape == (factors, block_num, block_size, block_size)
    layer.add_adapter("default", peft_rs.BOFTConfig(init_weights=False, **kwargs), weights=params)
    layer.set_adapter("default")
    x = torch.randn(3, d_in, generator=torch.Generator().manual_seed(seed))
    with fbd_extension(factors > 1), torch.no_grad():
        want = peft_layer(x)
        peft_merged = copy.deepcopy(peft_model).merge_and_unload().lin.weight
    got = layer(x)
    assert_close(got, want)
    layer.merge()
    assert_close(layer.base_weight, peft_merged)
    assert_close(layer(x), got)
    layer.unmerge()
    assert_close(layer.base_weight, weight)


@settings(max_examples=30, deadline=None)
@given(butterfly=butterflies(), seed=st.integers(0, 2**16))
def test_rotation_is_orthogonal(butterfly, seed):
    """With boft_s = 1 and an identity base weight, the merged weight is Rᵀ: orthogonal."""
    factors, block_num, block_size = butterfly
    d = block_num * block_size
    g = np.random.default_rng(seed)
    weights = {
        "boft_R": g.normal(0, 0.5, (factors, block_num, block_size, block_size)).astype(np.float32),
        "boft_s": np.ones((d, 1), np.float32),
    }
    layer = peft_rs.AdaptedLayer(np.eye(d, dtype=np.float32), kind="linear")
    config = peft_rs.BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=factors)
    layer.add_adapter("default", config, weights=weights)
    rotation_t = np.asarray(layer.merged_weight("default"))
    np.testing.assert_allclose(rotation_t @ rotation_t.T, np.eye(d), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(butterfly=butterflies(), d_out=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_default_init_is_identity(butterfly, d_out, seed):
    factors, block_num, block_size = butterfly
    d_in = block_num * block_size
    g = np.random.default_rng(seed)
    w = g.standard_normal((d_out, d_in), dtype=np.float32)
    b = g.standard_normal(d_out, dtype=np.float32)
    x = g.standard_normal((2, d_in), dtype=np.float32)
    layer = peft_rs.AdaptedLayer(w, b, kind="linear")
    layer.add_adapter(
        "default", peft_rs.BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=factors)
    )
    layer.set_adapter("default")
    np.testing.assert_allclose(layer(x), x @ w.T + b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(layer.merged_weight("default"), w)
