"""OFT parity with the installed `peft`, both directions, with `init_weights=False` so the rotations
are not the identity; plus PEFT's quirks (Conv2d patch forward, Cayley-Neumann term count) and
merge/unmerge properties.

Tolerances: f32 values within 1e-5 everywhere. Unmerging multiplies by an inverse, which peft_rs
computes by Gauss-Jordan elimination and PEFT by LAPACK (`torch.linalg.inv`): the results differ by
rounding, about cond(R)·2⁻²³ (1e-7 for these near-orthogonal R), still within 1e-5.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from peft import OFTConfig, PeftModel, get_peft_model
from peft.tuners.oft.layer import OFTLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

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
)
from peft_rs import errors

CASES = {
    # lin0 has 10 inputs: block size 4 is adjusted to 5, as PEFT does.
    "linear": (MLP, {"target_modules": ["lin0", "lin1", "classifier"], "oft_block_size": 4}),
    "linear-r": (MLP, {"target_modules": ["lin0", "lin1", "classifier"], "r": 2, "oft_block_size": 0}),
    # r=7 divides none of 10, 20, 16: adjusted per layer (to 5, 5, 8).
    "linear-r-adjusted": (
        MLP,
        {"target_modules": ["lin0", "lin1", "classifier"], "r": 7, "oft_block_size": 0},
    ),
    # The default block size 32 exceeds every layer: one block of the full width.
    "default-block-size": (MLP, {"target_modules": ["lin0", "lin1"]}),
    "exact-cayley": (
        MLP,
        {"target_modules": ["lin1", "classifier"], "oft_block_size": 4, "use_cayley_neumann": False},
    ),
    "neumann-2-terms": (
        MLP,
        {"target_modules": ["lin1"], "oft_block_size": 5, "num_cayley_neumann_terms": 2},
    ),
    "neumann-8-terms": (
        MLP,
        {"target_modules": ["lin1"], "oft_block_size": 5, "num_cayley_neumann_terms": 8},
    ),
    # eps small enough that PEFT's projection changes N(0, 0.1) weights.
    "coft": (MLP, {"target_modules": ["lin0", "lin1"], "oft_block_size": 5, "coft": True, "eps": 1e-2}),
    "block-share": (
        MLP,
        {"target_modules": ["lin1", "classifier"], "oft_block_size": 4, "block_share": True},
    ),
    "coft-block-share": (
        MLP,
        {"target_modules": ["lin1"], "oft_block_size": 4, "block_share": True, "coft": True, "eps": 0.05},
    ),
    "bias-oft-only": (
        MLP,
        {"target_modules": ["lin0", "classifier"], "oft_block_size": 2, "bias": "oft_only"},
    ),
    "bias-all": (MLP, {"target_modules": ["lin1"], "oft_block_size": 5, "bias": "all"}),
    "modules-to-save": (
        MLP,
        {"target_modules": ["lin0"], "oft_block_size": 5, "modules_to_save": ["classifier"]},
    ),
    "layers-to-transform": (
        Stack,
        {"target_modules": ["q", "v"], "oft_block_size": 2, "layers_to_transform": [0, 2]},
    ),
    "regex-targets": (Stack, {"target_modules": r".*\.(q|v)", "r": 2, "oft_block_size": 0}),
    "embedding": (EmbedModel, {"target_modules": ["emb", "lin0"], "oft_block_size": 4}),
    "embedding-exact-shared": (
        EmbedModel,
        {"target_modules": ["emb"], "oft_block_size": 6, "use_cayley_neumann": False, "block_share": True},
    ),
    # 1x1 kernels: PEFT's patch forward equals its merge.
    "conv2d-pointwise": (ConvModel, {"target_modules": ["pw"], "oft_block_size": 4, "bias": "oft_only"}),
    # 3x3 kernels on 9x9 inputs: overlapping patches, where PEFT's forward differs from its merge.
    "conv2d-overlapping": (ConvModel, {"target_modules": ["conv", "conv_s2"], "oft_block_size": 9}),
    "conv2d-overlapping-coft": (
        ConvModel,
        {"target_modules": ["conv"], "r": 3, "oft_block_size": 0, "coft": True, "eps": 1e-2},
    ),
}

# Cases whose PEFT model forward is not its merged model's forward (see test_conv2d_patch_quirk).
OVERLAPPING = {"conv2d-overlapping", "conv2d-overlapping-coft"}


def oft_layers(peft_model):
    return {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if hasattr(m, "oft_R") and (len(m.oft_R) or len(m.oft_embedding_R))
    }


def make_peft_model(cls, kwargs, dtype=torch.float32):
    model = make_model(cls, dtype=dtype)
    base_sd = base_state_dict(model)
    peft_model = get_peft_model(model, OFTConfig(init_weights=False, **kwargs)).eval()
    # Move every other trainable (modules_to_save, biases) away from the base model.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "oft_" not in name:
                p.add_((0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return peft_model, base_sd


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_loads_and_matches(case, tmp_path):
    cls, kwargs = CASES[case]
    peft_model, base_sd = make_peft_model(cls, kwargs)
    peft_model.save_pretrained(tmp_path)
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert adapter.peft_type == "OFT"
    assert adapter.module_names() == sorted(oft_layers(peft_model))
    assert_matches_peft(adapter, peft_model, base_sd)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_rs_file_loads_in_peft(case, tmp_path):
    cls, kwargs = CASES[case]
    model = make_model(cls)
    base_sd = base_state_dict(model)
    config = peft_rs.OFTConfig(init_weights=False, **kwargs)
    adapter = peft_rs.PeftAdapter.create(config, base_sd, peft_rs.module_types(model), seed=5)
    if case in OVERLAPPING:
        # PEFT's model output is its patch forward, not its merge: compare the tensors PEFT
        # loads, then its merge and its layer forwards.
        adapter.save_pretrained(tmp_path)
        saved = load_file(tmp_path / "adapter_model.safetensors")
        peft_model = PeftModel.from_pretrained(make_model(cls), tmp_path).eval()
        peft_sd = get_peft_model_state_dict(peft_model)
        assert set(peft_sd) == set(saved)
        for key, value in saved.items():
            assert_close(peft_sd[key], value, msg=key)
        assert_matches_peft(adapter, peft_model, base_sd)
    else:
        saved = assert_loads_in_peft(adapter, cls, base_sd, tmp_path)
    # Block sizes resolved as PEFT resolves them: the tensors PEFT creates for this config.
    fresh = get_peft_model_state_dict(get_peft_model(make_model(cls), OFTConfig(**kwargs)))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in fresh.items()}


def test_bf16_model_matches_peft(tmp_path):
    """A bf16 base: PEFT keeps OFT in f32, rotates the input in f32 and casts it back to bf16."""
    kwargs = {"target_modules": ["lin0", "lin1"], "oft_block_size": 5}
    peft_model, base_sd = make_peft_model(MLP, kwargs, dtype=torch.bfloat16)
    peft_model.save_pretrained(tmp_path)
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert all(v.dtype == torch.float32 for v in adapter.state_dict("torch").values())
    assert_matches_peft(adapter, peft_model, base_sd, tol=BF16_TOL)


def peft_layer_and_ours(module: nn.Module, kwargs: dict, kind: str, **conv):
    """PEFT's OFT layer on `module` (init_weights=False) and a peft_rs AdaptedLayer with the same
    tensors."""
    model = nn.Sequential()
    model.add_module("m", module)
    peft_model = get_peft_model(model, OFTConfig(init_weights=False, target_modules=["m"], **kwargs)).eval()
    peft_layer = peft_model.base_model.model.m
    base = peft_layer.get_base_layer()
    bias = None if getattr(base, "bias", None) is None else base.bias.detach().clone()
    layer = peft_rs.AdaptedLayer(base.weight.detach().clone(), bias, kind=kind, module_name="m", **conv)
    weights = {
        k.removesuffix(".default.weight") + ".weight": v.detach().clone()
        for k, v in peft_layer.named_parameters()
        if "oft_" in k
    }
    layer.add_adapter("default", peft_rs.OFTConfig(init_weights=False, **kwargs), weights=weights)
    layer.set_adapter("default")
    return peft_model, peft_layer, layer


@pytest.mark.parametrize(
    ("shape", "kernel", "padding", "overlapping"),
    [((3, 3), 3, 0, False), ((5, 6), 1, 0, False), ((6, 5), 3, 1, True), ((5, 5), 2, 0, True)],
)
def test_conv2d_patch_quirk(shape, kernel, padding, overlapping):
    """PEFT's Conv2d forward unfolds kxk patches (stride 1, no padding), rotates them and folds
    them back (summing overlaps, after a reordering view). With input spatial size equal to the
    kernel, or 1x1 kernels, that equals the merged layer; with overlapping patches it does not,
    not even for R = I. peft_rs computes PEFT's forward in every case."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel, padding=padding)
    kwargs = {"oft_block_size": 3}
    peft_model, peft_layer, layer = peft_layer_and_ours(conv, kwargs, "conv2d", padding=padding)
    x = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = peft_layer(x)
        peft_merged = copy.deepcopy(peft_model).merge_and_unload().m
        merged_out = peft_merged(x)
    assert_close(layer(x), want)
    assert_close(layer.merged_weight(), peft_merged.weight)
    layer.merge()
    assert_close(layer(x), merged_out)
    assert torch.allclose(merged_out, want, atol=1e-5) is not overlapping

    # At init (R = I) PEFT's forward still changes the input when patches overlap.
    identity = get_peft_model(
        nn.Sequential(copy.deepcopy(conv)), OFTConfig(target_modules=["0"], **kwargs)
    ).eval()
    ours = peft_rs.AdaptedLayer(conv.weight.detach(), conv.bias.detach(), kind="conv2d", padding=padding)
    ours.add_adapter("default", peft_rs.OFTConfig(**kwargs))
    with torch.no_grad():
        want = identity(x)
        plain = conv(x)
    assert_close(ours(x), want)
    assert torch.allclose(want, plain, atol=1e-6) is not overlapping


def test_neumann_three_and_four_terms_agree_as_in_peft():
    """PEFT's series for 3 and 4 terms is the same (I + 2Q + 2Q² + Q³); 5 terms differs."""
    outputs = {}
    for terms in (3, 4, 5):
        torch.manual_seed(0)
        kwargs = {"oft_block_size": 4, "num_cayley_neumann_terms": terms}
        _, peft_layer, layer = peft_layer_and_ours(nn.Linear(8, 3), kwargs, "linear")
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want = peft_layer(x)
        outputs[terms] = layer(x)
        assert_close(outputs[terms], want)
    assert torch.equal(outputs[3], outputs[4])
    assert not torch.allclose(outputs[4], outputs[5])


def test_neumann_and_exact_cayley_rotate_opposite_ways():
    """PEFT's Cayley-Neumann series approximates (I + Q)(I - Q)⁻¹; its exact Cayley is
    (I - Q)(I + Q)⁻¹, the inverse rotation. Seen on an identity base, whose merged weight is Rᵀ."""
    rotations = {}
    for neumann in (True, False):
        kwargs = {"oft_block_size": 4, "use_cayley_neumann": neumann, "num_cayley_neumann_terms": 12}
        torch.manual_seed(0)
        lin = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(8))
        peft_model, _, layer = peft_layer_and_ours(lin, kwargs, "linear")
        rotations[neumann] = layer.merged_weight().T
        assert_close(layer.merged_weight(), peft_merged_state_dict(peft_model)["m.weight"])
    assert_close(rotations[True] @ rotations[False], torch.eye(8), tol={"rtol": 0, "atol": 1e-5})


def test_module_dropout_is_never_applied_as_in_peft():
    """PEFT builds a multiplicative dropout for module_dropout > 0 but its forward never calls it."""
    torch.manual_seed(0)
    peft_model, peft_layer, layer = peft_layer_and_ours(
        nn.Linear(12, 5), {"oft_block_size": 3, "module_dropout": 0.9}, "linear"
    )
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    peft_model.train()
    layer.train()
    with torch.no_grad():
        want = peft_layer(x)
    assert_close(layer(x), want)
    layer.eval()
    assert_close(layer(x), want)


def test_grouped_conv2d_runs_forward_but_does_not_merge_as_in_peft():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 1, groups=2)
    _, peft_layer, layer = peft_layer_and_ours(conv, {"oft_block_size": 2}, "conv2d", groups=2)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(layer(x), peft_layer(x))
    with pytest.raises(RuntimeError):
        peft_layer.merge()
    with pytest.raises(errors.InvalidOperationError, match="groups"):
        layer.merge()


def test_config_matches_peft():
    kwargs = {
        "target_modules": ["a", "b"],
        "oft_block_size": 8,
        "module_dropout": 0.1,
        "bias": "oft_only",
        "coft": True,
        "eps": 1e-3,
        "block_share": True,
        "use_cayley_neumann": False,
        "num_cayley_neumann_terms": 7,
        "init_weights": False,
    }
    ours = peft_rs.OFTConfig(**kwargs).to_dict()
    theirs = OFTConfig(**kwargs).to_dict()
    assert set(ours) == set(theirs)
    for key in theirs:
        if key not in ("target_modules", "peft_version"):
            assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    defaults = peft_rs.OFTConfig(target_modules=["a"]).to_dict()
    for key, value in OFTConfig(target_modules=["a"]).to_dict().items():
        if key not in ("target_modules", "peft_version"):
            assert defaults[key] == value, key


@pytest.mark.parametrize(
    "kwargs",
    [{"r": 0, "oft_block_size": 0}, {"r": 4}, {"r": 2, "oft_block_size": 8}, {"layers_pattern": "layers"}],
)
def test_invalid_config_fails_like_peft(kwargs):
    with pytest.raises(ValueError) as peft_error:
        OFTConfig(target_modules=["lin0"], **kwargs)
    with pytest.raises(errors.ConfigError, match=re.escape(str(peft_error.value).strip())):
        peft_rs.OFTConfig(target_modules=["lin0"], **kwargs)


def test_out_of_range_fields_are_rejected():
    for kwargs, field in (
        ({"module_dropout": 1.5}, "module_dropout"),
        ({"module_dropout": -0.1}, "module_dropout"),
        ({"eps": -1.0}, "eps"),
        ({"bias": "lora_only"}, "bias"),
        ({"oft_block_size": -2}, "oft_block_size"),
        ({"r": -1, "oft_block_size": 0}, "r"),
        ({"num_cayley_neumann_terms": -1}, "num_cayley_neumann_terms"),
        ({"init_weights": "gaussian"}, "init_weights"),
    ):
        with pytest.raises(errors.ConfigError, match=field):
            peft_rs.OFTConfig(target_modules=["lin0"], **kwargs)


def test_unsupported_layers_are_refused():
    model = make_model(GPT2Like)
    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(make_model(GPT2Like), OFTConfig(target_modules=["c_attn"]))
    with pytest.raises(errors.InvalidOperationError, match="Conv1D"):
        peft_rs.PeftAdapter.create(
            peft_rs.OFTConfig(target_modules=["c_attn"]), base_state_dict(model), peft_rs.module_types(model)
        )
    with pytest.raises(ValueError, match="dilation"):
        get_peft_model(nn.Sequential(nn.Conv2d(2, 4, 3, dilation=2)), OFTConfig(target_modules=["0"]))
    layer = peft_rs.AdaptedLayer(torch.randn(4, 2, 3, 3), kind="conv2d", dilation=2)
    with pytest.raises(errors.InvalidOperationError, match="dilation"):
        layer.add_adapter("a", peft_rs.OFTConfig(oft_block_size=2))
    # PEFT sizes the rotation with kernel_size[0]² and fails on a non-square kernel's input.
    peft_model = get_peft_model(nn.Sequential(nn.Conv2d(2, 4, (1, 3))), OFTConfig(target_modules=["0"]))
    with pytest.raises(RuntimeError):
        peft_model(torch.randn(1, 2, 4, 4))
    layer = peft_rs.AdaptedLayer(torch.randn(4, 2, 1, 3), kind="conv2d")
    with pytest.raises(errors.InvalidOperationError, match="square"):
        layer.add_adapter("a", peft_rs.OFTConfig(oft_block_size=2))


def test_fan_in_fan_out_is_saved_false_for_linear_as_peft_does():
    kwargs = {"target_modules": ["lin0"], "oft_block_size": 2, "fan_in_fan_out": True}
    model = make_model(MLP)
    peft_model = get_peft_model(make_model(MLP), OFTConfig(**kwargs))
    adapter = peft_rs.PeftAdapter.create(
        peft_rs.OFTConfig(**kwargs), base_state_dict(model), peft_rs.module_types(model)
    )
    assert (
        adapter.config.to_dict()["fan_in_fan_out"]
        is peft_model.peft_config["default"].fan_in_fan_out
        is False
    )


@pytest.mark.parametrize("cls", [MLP, EmbedModel, ConvModel])
def test_default_init_is_identity_as_in_peft(cls):
    targets = {MLP: ["lin0", "lin1"], EmbedModel: ["emb", "lin0"], ConvModel: ["pw", "conv_s2"]}[cls]
    kwargs = {"target_modules": targets, "oft_block_size": 4}
    model = make_model(cls)
    base_sd = base_state_dict(model)
    peft_merged = peft_merged_state_dict(get_peft_model(make_model(cls), OFTConfig(**kwargs)))
    types = peft_rs.module_types(model)
    adapter = peft_rs.PeftAdapter.create(peft_rs.OFTConfig(**kwargs), base_sd, types)
    assert all(not v.any() for v in adapter.state_dict("torch").values())
    merged = adapter.merge_into(base_sd, types)
    for key, value in merged.items():
        assert torch.equal(value, base_sd[key]), key
        assert torch.equal(value, peft_merged[key]), key


@st.composite
def oft_linear(draw):
    """A Linear layer and an OFT config for it: `r` or `oft_block_size` (possibly one PEFT
    adjusts), with the rotation options drawn too."""
    d_in = draw(st.integers(2, 24))
    by_r = draw(st.booleans())
    value = draw(st.integers(1, d_in + 2))
    adjusted = (
        value if d_in % value == 0 and value <= d_in else OFTLayer.adjust_oft_parameters(None, d_in, value)
    )
    block_size = d_in // adjusted if by_r else adjusted
    assume(block_size >= 2)  # a block of size 1 has no parameters (an empty tensor)
    kwargs = {"r": value, "oft_block_size": 0} if by_r else {"oft_block_size": value}
    kwargs.update(
        use_cayley_neumann=draw(st.booleans()),
        num_cayley_neumann_terms=draw(st.integers(0, 7)),
        block_share=draw(st.booleans()),
        coft=draw(st.booleans()),
        eps=draw(st.sampled_from([6e-5, 1e-2, 0.5])),
    )
    return d_in, draw(st.integers(1, 12)), draw(st.booleans()), kwargs


@settings(max_examples=60, deadline=None)
@given(case=oft_linear(), seed=st.integers(0, 2**16))
def test_random_linear_layers_match_peft_and_round_trip(case, seed):
    """Against PEFT: the forward, the merged weight, the merged forward and the unmerged weight.
    Then: merged forward == unmerged forward (as PEFT's), unmerge restores the base weight."""
    d_in, d_out, bias, kwargs = case
    torch.manual_seed(seed)
    _, peft_layer, layer = peft_layer_and_ours(nn.Linear(d_in, d_out, bias=bias), kwargs, "linear")
    base_weight = layer.base_weight.clone()
    x = torch.randn(3, d_in, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = peft_layer(x)
        peft_layer.merge()
        peft_merged_weight = peft_layer.get_base_layer().weight.detach().clone()
        peft_merged_out = peft_layer(x)
        peft_layer.unmerge()
        peft_unmerged = peft_layer.get_base_layer().weight.detach().clone()
    assert_close(layer(x), want)
    assert_close(layer.merged_weight(), peft_merged_weight)
    layer.merge()
    assert_close(layer.base_weight, peft_merged_weight)
    assert_close(layer(x), peft_merged_out)
    assert_close(layer(x), want)
    layer.unmerge()
    assert_close(layer.base_weight, peft_unmerged)
    assert_close(layer.base_weight, base_weight)


@settings(max_examples=30, deadline=None)
@given(
    blocks=st.integers(1, 4),
    block_size=st.integers(2, 6),
    by_r=st.booleans(),
    block_share=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_exact_cayley_is_orthogonal(blocks, block_size, by_r, block_share, seed):
    """With use_cayley_neumann=False, R is orthogonal; on an identity base the merged weight is Rᵀ.
    `r` and the matching `oft_block_size` give the same layer."""
    d = blocks * block_size
    kwargs = {"r": blocks, "oft_block_size": 0} if by_r else {"oft_block_size": block_size}
    kwargs.update(use_cayley_neumann=False, block_share=block_share)
    torch.manual_seed(seed)
    lin = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d))
    peft_model, _, layer = peft_layer_and_ours(lin, kwargs, "linear")
    r = layer.merged_weight().T
    assert_close(r @ r.T, torch.eye(d), tol={"rtol": 0, "atol": 1e-5})
    assert_close(r.T, peft_merged_state_dict(peft_model)["m.weight"])
    stored = blocks if not block_share else 1
    assert tuple(layer.weights()["oft_R.weight"].shape) == (stored, block_size * (block_size - 1) // 2)


@settings(max_examples=30, deadline=None)
@given(d_in=st.integers(2, 16), d_out=st.integers(1, 8), block=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_identity_at_init(d_in, d_out, block, seed):
    """init_weights=True: zeros, R = I, the layer is exactly its base layer."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
    layer = peft_rs.AdaptedLayer(w, b, kind="linear")
    layer.add_adapter("default", peft_rs.OFTConfig(oft_block_size=block))
    x = torch.randn(4, d_in, generator=g)
    adapted = layer(x)
    layer.enable_adapters(False)
    assert torch.equal(adapted, layer(x))
    assert_close(adapted, torch.nn.functional.linear(x, w, b))
    assert torch.equal(layer.merged_weight(["default"]), w)
