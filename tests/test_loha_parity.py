"""LoHa parity with the installed `peft`, in both directions: PEFT writes → peft_rs reads and
computes; peft_rs writes → PEFT reads and computes. Adapters are initialised away from identity
(`init_weights=False`) and other trainables are perturbed, so every number is tested. Plus
merge/unmerge properties, identity init, training-only dropouts and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoHaConfig, PeftModel, get_peft_model
from torch import nn

import peft_rs
from conftest import (
    BF16_TOL,
    MLP,
    ConvModel,
    EmbedModel,
    GPT2Like,
    Stack,
    assert_loads_in_peft,
    assert_matches_peft,
    base_state_dict,
    make_model,
    random_adapted_layer,
    rewrite_weights,
    tol,
)
from peft_rs import errors


class DilatedGroupedConv(ConvModel):
    """Conv2d layers with dilation and groups (a ConvModel, so the shared helpers give it
    ConvModel's input)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.conv = nn.Conv2d(3, 6, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped(torch.relu(self.conv(x)))


CASES = {
    "mlp": (MLP, {"target_modules": ["lin0", "lin1", "classifier"], "r": 4, "alpha": 6}),
    "modules-to-save": (MLP, {"target_modules": ["lin0"], "modules_to_save": ["classifier"]}),
    "regex-target": (Stack, {"target_modules": r"model\.layers\.[02]\.q", "r": 3}),
    "layers-to-transform": (Stack, {"target_modules": ["q", "v"], "layers_to_transform": [0, 2]}),
    "patterns": (
        Stack,
        {
            "target_modules": ["q", "v"],
            "r": 4,
            "alpha": 8,
            "rank_pattern": {"layers.1.q": 2, "v": 3},
            "alpha_pattern": {"layers.2.v": 5},
        },
    ),
    # Dropouts act in training only; these layers are compared in eval mode.
    "dropouts": (MLP, {"target_modules": ["lin0", "lin1"], "rank_dropout": 0.3, "module_dropout": 0.2}),
    "conv2d": (ConvModel, {"target_modules": ["conv", "pw", "conv_s2"], "r": 3}),
    # The 1x1 `pw` keeps the flat form: PEFT ignores use_effective_conv2d for 1x1 kernels.
    "conv2d-effective": (
        ConvModel,
        {"target_modules": ["conv", "pw", "conv_s2"], "r": 3, "use_effective_conv2d": True},
    ),
    "dilated-grouped": (DilatedGroupedConv, {"target_modules": ["conv", "grouped"], "r": 2}),
    "dilated-grouped-effective": (
        DilatedGroupedConv,
        {"target_modules": ["conv", "grouped"], "r": 2, "use_effective_conv2d": True},
    ),
}


def make_peft_model(cls, kwargs, dtype=torch.float32):
    model = make_model(cls, dtype=dtype)
    base_sd = base_state_dict(model)
    peft_model = get_peft_model(model, LoHaConfig(init_weights=False, **kwargs)).eval()
    # Move every other trainable (modules_to_save) away from the base model.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "hada_" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    return peft_model, base_sd


def loha_layers(peft_model):
    return {
        name.removeprefix("base_model.model."): m
        for name, m in peft_model.named_modules()
        if hasattr(m, "hada_w1_a") and m.hada_w1_a
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_loads_and_matches(case, tmp_path):
    cls, kwargs = CASES[case]
    peft_model, base_sd = make_peft_model(cls, kwargs)
    peft_model.save_pretrained(tmp_path)

    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert adapter.peft_type == "LOHA"
    assert adapter.module_names() == sorted(loha_layers(peft_model))
    assert_matches_peft(adapter, peft_model, base_sd)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_rs_file_loads_in_peft(case, tmp_path):
    cls, kwargs = CASES[case]
    model = make_model(cls)
    base_sd = base_state_dict(model)
    config = peft_rs.LoHaConfig(init_weights=False, **kwargs)
    adapter = peft_rs.PeftAdapter.create(config, base_sd, peft_rs.module_types(model), seed=3)
    assert_loads_in_peft(adapter, cls, base_sd, tmp_path)
    with open(tmp_path / "adapter_config.json") as f:
        written = json.load(f)
    assert written["peft_type"] == "LOHA"
    loaded = PeftModel.from_pretrained(make_model(cls), tmp_path).peft_config["default"]
    for key in ("r", "alpha", "rank_pattern", "alpha_pattern", "use_effective_conv2d", "init_weights"):
        assert getattr(loaded, key) == written[key], key


def test_bf16_base(tmp_path):
    """bf16 base weights: PEFT keeps LoHa tensors in f32, adds the f32 update to the bf16 base
    output and casts back; merging adds in f32 and stores bf16."""
    peft_model, base_sd = make_peft_model(MLP, CASES["mlp"][1], dtype=torch.bfloat16)
    peft_model.save_pretrained(tmp_path)
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert_matches_peft(adapter, peft_model, base_sd, tol=BF16_TOL)


def test_f64_base_matches_tightly(tmp_path):
    """f64 base: the adapter is f64 too. PEFT passes LoHa's scaling (8/3 here) as a float32
    tensor, so even f64 deltas use it rounded to f32; peft_rs does the same, to 1e-13."""
    peft_model, base_sd = make_peft_model(
        MLP, {"target_modules": ["lin0", "lin1"], "r": 3, "alpha": 8}, torch.float64
    )
    peft_model.save_pretrained(tmp_path)
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert_matches_peft(adapter, peft_model, base_sd, tol={"rtol": 1e-13, "atol": 1e-13})


def test_config_matches_peft():
    kwargs = {
        "r": 6,
        "alpha": 12,
        "rank_dropout": 0.1,
        "module_dropout": 0.2,
        "use_effective_conv2d": True,
        "target_modules": ["lin0", "lin1"],
        "rank_pattern": {"lin1": 2},
        "alpha_pattern": {"lin0": 5},
        "modules_to_save": ["classifier"],
        "init_weights": False,
    }
    ours = peft_rs.LoHaConfig(**kwargs).to_dict()
    theirs = json.loads(json.dumps(LoHaConfig(**kwargs).to_dict(), default=sorted))
    assert set(ours) == set(theirs)
    for key in theirs:
        if key in ("peft_version", "target_modules"):
            continue
        assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    # Defaults, and PEFT's own dict (with sets and enums) accepted as is.
    defaults = peft_rs.LoHaConfig().to_dict()
    for key, value in LoHaConfig().to_dict().items():
        if key != "peft_version":
            assert defaults[key] == value, key
    assert peft_rs.LoHaConfig.from_dict(LoHaConfig(**kwargs).to_dict()).r == 6


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"r": 0}, "r"),
        ({"r": "8"}, "r"),
        ({"alpha": float("nan")}, "alpha"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
        ({"alpha_pattern": {"q": "x"}}, "alpha_pattern"),
        ({"rank_dropout": 1.0}, "rank_dropout"),
        ({"module_dropout": -0.1}, "module_dropout"),
        # LoHa's init_weights is a bool; "lycoris" is LoKr's.
        ({"init_weights": "lycoris"}, "init_weights"),
        ({"target_modules": ["q"], "layers_pattern": "layers"}, "layers_pattern"),
        ({"target_modules": ".*q", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"use_dora": True}, "use_dora"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(errors.ConfigError, match=f"`{field}`"):
        peft_rs.LoHaConfig(**kwargs)


@pytest.mark.parametrize("cls,target", [(GPT2Like, "c_attn"), (EmbedModel, "emb")])
def test_unsupported_layers_are_refused_as_in_peft(cls, target):
    """PEFT adapts nn.Linear/Conv1d/Conv2d only: transformers Conv1D and nn.Embedding raise."""
    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(make_model(cls), LoHaConfig(target_modules=[target]))
    model = make_model(cls)
    config = peft_rs.LoHaConfig(target_modules=[target])
    with pytest.raises(errors.InvalidOperationError, match="LoHa does not support"):
        peft_rs.PeftAdapter.create(config, base_state_dict(model), peft_rs.module_types(model))


def saved_loha_mlp(path):
    """PEFT's LoHa file for the MLP; returns a fresh MLP (PEFT wraps the layers of the one it adapts)."""
    config = LoHaConfig(target_modules=["lin0", "lin1"], init_weights=False)
    get_peft_model(make_model(MLP), config).save_pretrained(path)
    return make_model(MLP)


def test_wrong_shape_in_file_names_the_key(tmp_path):
    model = saved_loha_mlp(tmp_path)
    key = "base_model.model.lin0.hada_w1_b"

    def shrink(t):
        t[key] = t[key][:, :-1].contiguous()

    rewrite_weights(tmp_path, shrink)
    with pytest.raises(errors.ShapeError, match=key.replace(".", r"\.")):
        adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
        adapter.merge_into(base_state_dict(model), peft_rs.module_types(model))


def test_missing_tensor_in_file_names_the_key(tmp_path):
    model = saved_loha_mlp(tmp_path)
    key = "base_model.model.lin1.hada_w2_a"
    rewrite_weights(tmp_path, lambda t: t.pop(key))
    with pytest.raises(errors.MissingKeyError, match=key.replace(".", r"\.")):
        adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
        adapter.merge_into(base_state_dict(model), peft_rs.module_types(model))


def test_effective_conv_file_with_flat_config_names_the_key(tmp_path):
    """A CP-form file whose config says use_effective_conv2d=false cannot be read as flat."""
    config = LoHaConfig(target_modules=["conv"], use_effective_conv2d=True, init_weights=False)
    get_peft_model(make_model(ConvModel), config).save_pretrained(tmp_path)
    model = make_model(ConvModel)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"use_effective_conv2d": true', '"use_effective_conv2d": false'))
    with pytest.raises((errors.ShapeError, errors.UnexpectedKeyError), match=r"conv\.hada_"):
        adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
        adapter.merge_into(base_state_dict(model), peft_rs.module_types(model))


# ---- properties of peft_rs's own layers (no PEFT needed) ----


def build(kind, d_in, d_out, r, seed, effective=False, init=False, **extra):
    config = peft_rs.LoHaConfig(
        r=r, alpha=2 * r + 1, init_weights=init, use_effective_conv2d=effective, **extra
    )
    return random_adapted_layer(config, kind, d_in, d_out, seed)


layer_args = {
    "kind": st.sampled_from(["linear", "conv2d"]),
    "d_in": st.integers(1, 12),
    "d_out": st.integers(1, 12),
    "r": st.integers(1, 5),
    "seed": st.integers(0, 2**16),
    "effective": st.booleans(),
}


@settings(max_examples=40, deadline=None)
@given(**layer_args)
def test_merge_unmerge_round_trip_and_merged_forward(kind, d_in, d_out, r, seed, effective):
    layer, w, x = build(kind, d_in, d_out, r, seed, effective)
    unmerged = layer.forward(x)
    expected = layer.merged_weight()
    assert np.abs(expected - w).max() > 0  # the adapter is not the identity
    layer.merge()
    assert layer.merged_adapters == ["default"]
    np.testing.assert_allclose(layer.base_weight, expected, rtol=1e-5, atol=tol(w, expected))
    np.testing.assert_allclose(layer.forward(x), unmerged, rtol=1e-5, atol=tol(unmerged))
    layer.unmerge()
    assert not layer.merged
    np.testing.assert_allclose(layer.base_weight, w, rtol=1e-5, atol=tol(w, expected))


@settings(max_examples=30, deadline=None)
@given(**layer_args)
def test_default_init_is_identity(kind, d_in, d_out, r, seed, effective):
    layer, w, x = build(kind, d_in, d_out, r, seed, effective, init=True)
    np.testing.assert_array_equal(layer.merged_weight(), w)
    assert np.abs(layer.weights()["hada_w2_b"]).max() == 0
    layer.enable_adapters(False)
    base = layer.forward(x)
    layer.enable_adapters(True)
    np.testing.assert_allclose(layer.forward(x), base, rtol=1e-6, atol=1e-6)


def test_effective_conv_tensors():
    """The CP form stores t1/t2 and transposed `a` factors; a 1x1 kernel keeps the flat form."""
    layer, _, _ = build("conv2d", 4, 6, 2, 0, effective=True)
    shapes = {k: v.shape for k, v in layer.weights().items()}
    assert shapes == {
        "hada_t1": (2, 2, 3, 3),
        "hada_t2": (2, 2, 3, 3),
        "hada_w1_a": (2, 6),
        "hada_w1_b": (2, 4),
        "hada_w2_a": (2, 6),
        "hada_w2_b": (2, 4),
    }
    pointwise = peft_rs.AdaptedLayer(np.ones((6, 4, 1, 1), np.float32), kind="conv2d")
    pointwise.add_adapter("default", peft_rs.LoHaConfig(r=2, use_effective_conv2d=True))
    assert sorted(pointwise.weights("default")) == ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]


def test_dropouts_act_in_training_only():
    layer, _, x = build("linear", 8, 16, 3, 1, rank_dropout=0.5, module_dropout=0.3)
    eval_out = layer.forward(x)
    layer.train()
    outs = [layer.forward(x) for _ in range(20)]
    # Rank dropout zeroes whole output rows of ΔW at random, module dropout skips ΔW at random.
    assert any(not np.allclose(o, eval_out, atol=1e-6) for o in outs)
    layer.eval()
    np.testing.assert_array_equal(layer.forward(x), eval_out)


def test_no_dropout_training_equals_eval():
    layer, _, x = build("conv2d", 3, 4, 2, 2, effective=True)
    eval_out = layer.forward(x)
    layer.train()
    np.testing.assert_allclose(layer.forward(x), eval_out, rtol=1e-6, atol=1e-6)
