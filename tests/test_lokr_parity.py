"""LoKr parity with the installed `peft`, in both directions: PEFT writes → peft_rs reads and
computes; peft_rs writes → PEFT reads and computes. Adapters are initialised away from identity
(`init_weights=False`), and the cases cover every form of the Kronecker factors: full or rank-r
`w1` (`decompose_both`) and `w2`, PEFT's `factorization` with and without `decompose_factor`
(whose factors come out unsorted), and the CP kernel of an effective Conv2d. Plus merge/unmerge
properties, identity inits, training-only dropouts and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoKrConfig, PeftModel, get_peft_model
from peft.tuners.lokr.layer import factorization
from safetensors.torch import load_file
from test_loha_parity import DilatedGroupedConv

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
    model_input,
    random_adapted_layer,
    rewrite_weights,
    tol,
)
from peft_rs import errors

MLP_TARGETS = ["lin0", "lin1", "classifier"]
CONV_TARGETS = ["conv", "pw", "conv_s2"]

CASES = {
    # r=2: lin0/lin1 factor w2 (2r < max(b, d) = 5), the classifier's w2 is full (2r >= 4).
    "mlp": (MLP, {"target_modules": MLP_TARGETS, "r": 2, "alpha": 5}),
    "mlp-full": (MLP, {"target_modules": MLP_TARGETS, "r": 8}),
    "decompose-both": (MLP, {"target_modules": MLP_TARGETS, "r": 1, "decompose_both": True}),
    # factorization(20, 5) = (5, 4) and (10, 5) = (5, 2): not sorted; 16 falls back to (4, 4).
    "decompose-factor": (MLP, {"target_modules": MLP_TARGETS, "r": 2, "decompose_factor": 5}),
    "decompose-both-factor": (
        MLP,
        {"target_modules": MLP_TARGETS, "r": 1, "decompose_both": True, "decompose_factor": 4},
    ),
    # Dropouts act in training only; these layers are compared in eval mode.
    "dropouts": (
        MLP,
        {
            "target_modules": ["lin0", "lin1"],
            "rank_dropout": 0.2,
            "module_dropout": 0.1,
            "rank_dropout_scale": True,
        },
    ),
    "modules-to-save": (MLP, {"target_modules": ["lin0"], "modules_to_save": ["classifier"]}),
    "patterns": (
        Stack,
        {
            "target_modules": ["q", "v"],
            "r": 4,
            "alpha": 8,
            "rank_pattern": {"layers.1.q": 1, "v": 2},
            "alpha_pattern": {"layers.2.v": 5},
        },
    ),
    "regex-target": (Stack, {"target_modules": r"model\.layers\.[12]\.v", "r": 1}),
    "conv2d": (ConvModel, {"target_modules": CONV_TARGETS, "r": 1}),
    "conv2d-full": (ConvModel, {"target_modules": CONV_TARGETS, "r": 4}),
    "conv2d-effective": (ConvModel, {"target_modules": CONV_TARGETS, "r": 1, "use_effective_conv2d": True}),
    "conv2d-decompose-both": (
        ConvModel,
        {"target_modules": CONV_TARGETS, "r": 1, "decompose_both": True, "decompose_factor": 4},
    ),
    "dilated-grouped": (DilatedGroupedConv, {"target_modules": ["conv", "grouped"], "r": 1}),
    "dilated-grouped-effective": (
        DilatedGroupedConv,
        {"target_modules": ["conv", "grouped"], "r": 1, "use_effective_conv2d": True},
    ),
}


def make_peft_model(cls, kwargs, dtype=torch.float32, init_weights=False):
    model = make_model(cls, dtype=dtype)
    base_sd = base_state_dict(model)
    peft_model = get_peft_model(model, LoKrConfig(init_weights=init_weights, **kwargs)).eval()
    # Move every other trainable (modules_to_save) away from the base model.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "lokr_" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    return peft_model, base_sd


def lokr_layers(peft_model):
    return {
        name.removeprefix("base_model.model."): m
        for name, m in peft_model.named_modules()
        if hasattr(m, "lokr_w1") and (m.lokr_w1 or m.lokr_w1_a)
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_loads_and_matches(case, tmp_path):
    cls, kwargs = CASES[case]
    peft_model, base_sd = make_peft_model(cls, kwargs)
    peft_model.save_pretrained(tmp_path)

    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert adapter.peft_type == "LOKR"
    layers = lokr_layers(peft_model)
    assert adapter.module_names() == sorted(layers)
    # The same tensors, under the same names, as PEFT's layers hold.
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for name, layer in layers.items():
        peft_names = {n for n in layer.adapter_layer_names if "default" in getattr(layer, n)}
        assert {
            k.rsplit(".", 1)[1] for k in saved if k.startswith(f"base_model.model.{name}.lokr")
        } == peft_names
    assert_matches_peft(adapter, peft_model, base_sd)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_rs_file_loads_in_peft(case, tmp_path):
    cls, kwargs = CASES[case]
    model = make_model(cls)
    base_sd = base_state_dict(model)
    config = peft_rs.LoKrConfig(init_weights=False, **kwargs)
    adapter = peft_rs.PeftAdapter.create(config, base_sd, peft_rs.module_types(model), seed=3)
    assert_loads_in_peft(adapter, cls, base_sd, tmp_path)
    with open(tmp_path / "adapter_config.json") as f:
        written = json.load(f)
    assert written["peft_type"] == "LOKR"
    loaded = PeftModel.from_pretrained(make_model(cls), tmp_path).peft_config["default"]
    for key in ("r", "alpha", "decompose_both", "decompose_factor", "rank_dropout_scale", "init_weights"):
        assert getattr(loaded, key) == written[key], key


@pytest.mark.parametrize("init", [True, "lycoris"])
@pytest.mark.parametrize(
    "cls,kwargs", [CASES["decompose-both"], CASES["conv2d-effective"], CASES["mlp-full"]]
)
def test_identity_inits_both_ways(init, cls, kwargs, tmp_path):
    """`true` zeroes w1 (or w1_a), `"lycoris"` zeroes w2 (or w2_b): ΔW = 0 in PEFT and here."""
    model = make_model(cls)
    base_sd = base_state_dict(model)
    adapter = peft_rs.PeftAdapter.create(
        peft_rs.LoKrConfig(init_weights=init, **kwargs), base_sd, peft_rs.module_types(model), seed=1
    )
    for key, value in adapter.merge_into(base_sd, peft_rs.module_types(model)).items():
        torch.testing.assert_close(value, base_sd[key], rtol=0, atol=0, msg=key)
    saved = assert_loads_in_peft(adapter, cls, base_sd, tmp_path / "ours")
    zero = ("lokr_w1", "lokr_w1_a") if init is True else ("lokr_w2", "lokr_w2_b")
    assert any(k.endswith(zero) for k in saved)
    assert all(v.abs().max() == 0 for k, v in saved.items() if k.endswith(zero))
    # PEFT's own init: the same tensors are zero, and peft_rs reads its file as the identity.
    peft_model, _ = make_peft_model(cls, kwargs, init_weights=init)
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k for k, v in theirs.items() if v.abs().max() == 0} == {k for k in theirs if k.endswith(zero)}
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path / "peft")
    x = model_input(model)
    reloaded = make_model(cls)
    reloaded.load_state_dict(adapter.merge_into(base_sd, peft_rs.module_types(model)))
    with torch.no_grad():
        assert_close(reloaded(x), model(x))


def test_bf16_base(tmp_path):
    """bf16 base weights: PEFT keeps LoKr tensors in f32, adds the f32 update to the bf16 base
    output and casts back; merging adds in f32 and stores bf16."""
    peft_model, base_sd = make_peft_model(MLP, CASES["decompose-both"][1], dtype=torch.bfloat16)
    peft_model.save_pretrained(tmp_path)
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert_matches_peft(adapter, peft_model, base_sd, tol=BF16_TOL)


def test_f64_base_matches_tightly(tmp_path):
    """f64 base: the adapter is f64 too, and LoKr's scaling (8/3 here) is a Python float."""
    kwargs = {"target_modules": MLP_TARGETS, "r": 3, "alpha": 8, "decompose_both": True}
    peft_model, base_sd = make_peft_model(MLP, kwargs, dtype=torch.float64)
    peft_model.save_pretrained(tmp_path)
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert_matches_peft(adapter, peft_model, base_sd, tol={"rtol": 1e-13, "atol": 1e-13})


def test_config_matches_peft():
    kwargs = {
        "r": 6,
        "alpha": 12,
        "rank_dropout": 0.1,
        "module_dropout": 0.2,
        "rank_dropout_scale": True,
        "use_effective_conv2d": True,
        "decompose_both": True,
        "decompose_factor": 4,
        "target_modules": ["lin0", "lin1"],
        "rank_pattern": {"lin1": 2},
        "alpha_pattern": {"lin0": 5},
        "modules_to_save": ["classifier"],
        "init_weights": "lycoris",
    }
    ours = peft_rs.LoKrConfig(**kwargs).to_dict()
    theirs = json.loads(json.dumps(LoKrConfig(**kwargs).to_dict(), default=sorted))
    assert set(ours) == set(theirs)
    for key in theirs:
        if key in ("peft_version", "target_modules"):
            continue
        assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    defaults = peft_rs.LoKrConfig().to_dict()
    for key, value in LoKrConfig().to_dict().items():
        if key != "peft_version":
            assert defaults[key] == value, key
    assert peft_rs.LoKrConfig.from_dict(LoKrConfig(**kwargs).to_dict()).decompose_factor == 4


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"r": 0}, "r"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
        ({"alpha": "8"}, "alpha"),
        ({"rank_dropout": 1.5}, "rank_dropout"),
        ({"module_dropout": 1.0}, "module_dropout"),
        ({"decompose_both": "yes"}, "decompose_both"),
        ({"decompose_factor": 2.5}, "decompose_factor"),
        ({"rank_dropout_scale": 1}, "rank_dropout_scale"),
        # PEFT would treat any other string as `True`; here it is a mistake.
        ({"init_weights": "gaussian"}, "init_weights"),
        ({"target_modules": ["q"], "layers_pattern": "layers"}, "layers_pattern"),
        ({"use_dora": True}, "use_dora"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(errors.ConfigError, match=f"`{field}`"):
        peft_rs.LoKrConfig(**kwargs)


@pytest.mark.parametrize("cls,target", [(GPT2Like, "c_attn"), (EmbedModel, "emb")])
def test_unsupported_layers_are_refused_as_in_peft(cls, target):
    """PEFT adapts nn.Linear/Conv1d/Conv2d only: transformers Conv1D and nn.Embedding raise."""
    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(make_model(cls), LoKrConfig(target_modules=[target]))
    model = make_model(cls)
    config = peft_rs.LoKrConfig(target_modules=[target])
    with pytest.raises(errors.InvalidOperationError, match="LoKr does not support"):
        peft_rs.PeftAdapter.create(config, base_state_dict(model), peft_rs.module_types(model))


def test_wrong_shape_in_file_names_the_key(tmp_path):
    config = LoKrConfig(target_modules=["lin0"], r=2, init_weights=False)
    get_peft_model(make_model(MLP), config).save_pretrained(tmp_path)
    model = make_model(MLP)
    key = "base_model.model.lin0.lokr_w2_b"

    def transpose(t):
        t[key] = t[key].T.contiguous()

    rewrite_weights(tmp_path, transpose)
    with pytest.raises(errors.ShapeError, match=key.replace(".", r"\.")):
        adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
        adapter.merge_into(base_state_dict(model), peft_rs.module_types(model))


def test_decompose_factor_changed_in_config_names_the_key(tmp_path):
    """Tensors saved for one factorization do not fit another: the error names the tensor."""
    config = LoKrConfig(target_modules=["lin0"], r=8, init_weights=False)
    get_peft_model(make_model(MLP), config).save_pretrained(tmp_path)
    model = make_model(MLP)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"decompose_factor": -1', '"decompose_factor": 5'))
    with pytest.raises(errors.ShapeError, match=r"lin0\.lokr_w[12]"):
        adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
        adapter.merge_into(base_state_dict(model), peft_rs.module_types(model))


# ---- properties of peft_rs's own layers (no PEFT needed) ----


def build(kind, d_in, d_out, r, seed, init=False, **extra):
    config = peft_rs.LoKrConfig(r=r, alpha=2 * r + 1, init_weights=init, **extra)
    return random_adapted_layer(config, kind, d_in, d_out, seed)


layer_args = {
    "kind": st.sampled_from(["linear", "conv2d"]),
    "d_in": st.integers(1, 24),
    "d_out": st.integers(1, 24),
    "r": st.integers(1, 6),
    "seed": st.integers(0, 2**16),
    "decompose_both": st.booleans(),
    "decompose_factor": st.sampled_from([-1, 2, 3, 4]),
    "use_effective_conv2d": st.booleans(),
}


@settings(max_examples=40, deadline=None)
@given(**layer_args)
def test_merge_unmerge_round_trip_and_merged_forward(kind, d_in, d_out, r, seed, **options):
    layer, w, x = build(kind, d_in, d_out, r, seed, **options)
    unmerged = layer.forward(x)
    expected = layer.merged_weight()
    assert np.abs(expected - w).max() > 0  # the adapter is not the identity
    layer.merge()
    np.testing.assert_allclose(layer.base_weight, expected, rtol=1e-5, atol=tol(w, expected))
    np.testing.assert_allclose(layer.forward(x), unmerged, rtol=1e-5, atol=tol(unmerged))
    layer.unmerge()
    np.testing.assert_allclose(layer.base_weight, w, rtol=1e-5, atol=tol(w, expected))


@settings(max_examples=30, deadline=None)
@given(init=st.sampled_from([True, "lycoris"]), **layer_args)
def test_identity_inits(init, kind, d_in, d_out, r, seed, **options):
    layer, w, x = build(kind, d_in, d_out, r, seed, init=init, **options)
    np.testing.assert_array_equal(layer.merged_weight(), w)
    layer.enable_adapters(False)
    base = layer.forward(x)
    layer.enable_adapters(True)
    np.testing.assert_allclose(layer.forward(x), base, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    d_in=st.integers(1, 64),
    d_out=st.integers(1, 64),
    r=st.integers(1, 8),
    both=st.booleans(),
    factor=st.sampled_from([-1, 2, 3, 4, 5, 8]),
)
def test_tensor_shapes_follow_peft(d_in, d_out, r, both, factor):
    """Names and shapes of a Linear's tensors are PEFT's (`factorization`, `use_w1`, `use_w2`)."""
    layer = peft_rs.AdaptedLayer(np.zeros((d_out, d_in), np.float32))
    layer.add_adapter("default", peft_rs.LoKrConfig(r=r, decompose_both=both, decompose_factor=factor))
    (a, b), (c, d) = factorization(d_out, factor), factorization(d_in, factor)
    want = (
        {"lokr_w1": (a, c)}
        if not (both and r < max(a, c) / 2)
        else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    )
    want |= {"lokr_w2": (b, d)} if not r < max(b, d) / 2 else {"lokr_w2_a": (b, r), "lokr_w2_b": (r, d)}
    assert {k: v.shape for k, v in layer.weights("default").items()} == want


def test_dropouts_act_in_training_only():
    layer, _, x = build("linear", 8, 16, 2, 1, rank_dropout=0.5, module_dropout=0.3)
    eval_out = layer.forward(x)
    layer.train()
    outs = [layer.forward(x) for _ in range(20)]
    assert any(not np.allclose(o, eval_out, atol=1e-6) for o in outs)
    layer.eval()
    np.testing.assert_array_equal(layer.forward(x), eval_out)
