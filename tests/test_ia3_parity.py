"""IA³ parity with the installed `peft`, both directions, with `init_ia3_weights=False` so the
scaling vectors are not the identity; plus merge/unmerge properties."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import IA3Config, get_peft_model

import peft_rs
from conftest import (
    MLP,
    ConvModel,
    EmbConv1D,
    GPT2Like,
    Stack,
    assert_loads_in_peft,
    assert_matches_peft,
    base_state_dict,
    make_model,
)
from peft_rs import errors

CASES = {
    "mlp": (MLP, {"target_modules": ["lin0", "lin1", "classifier"], "feedforward_modules": ["lin1"]}),
    "modules-to-save": (
        MLP,
        {
            "target_modules": ["lin0", "lin1"],
            "feedforward_modules": ["lin0"],
            "modules_to_save": ["classifier"],
        },
    ),
    # A list matches feed-forward modules by plain suffix: "q" also selects "...layers.N.q".
    "regex-targets": (Stack, {"target_modules": r".*\.(q|v)", "feedforward_modules": r".*\.v"}),
    "conv1d": (GPT2Like, {"target_modules": ["c_attn", "c_proj"], "feedforward_modules": ["c_proj"]}),
    "conv2d": (ConvModel, {"target_modules": ["conv", "pw", "conv_s2"], "feedforward_modules": ["pw"]}),
    # One output feature: the scaling vector is (1, 1) either way (this once failed with
    # "expected [1, 1], found [1, 1]").
    "conv1d-one-output": (EmbConv1D, {"target_modules": ["conv1d"], "feedforward_modules": []}),
    "conv1d-one-output-ff": (EmbConv1D, {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"]}),
}


def ia3_layers(peft_model):
    return {
        n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "ia3_l")
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_loads_and_matches(case, tmp_path):
    cls, kwargs = CASES[case]
    model = make_model(cls)
    base_sd = base_state_dict(model)
    peft_model = get_peft_model(model, IA3Config(init_ia3_weights=False, **kwargs)).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "ia3_l" not in name:
                p.add_(0.1)
    peft_model.save_pretrained(tmp_path)

    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    assert adapter.peft_type == "IA3"
    layers = ia3_layers(peft_model)
    assert adapter.module_names() == sorted(layers)
    assert_matches_peft(adapter, peft_model, base_sd)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_rs_file_loads_in_peft(case, tmp_path):
    cls, kwargs = CASES[case]
    model = make_model(cls)
    base_sd = base_state_dict(model)
    config = peft_rs.IA3Config(init_ia3_weights=False, **kwargs)
    adapter = peft_rs.PeftAdapter.create(config, base_sd, peft_rs.module_types(model), seed=5)
    assert_loads_in_peft(adapter, cls, base_sd, tmp_path)


def test_config_matches_peft():
    kwargs = {"target_modules": ["a", "b"], "feedforward_modules": ["b"], "init_ia3_weights": False}
    ours = peft_rs.IA3Config(**kwargs).to_dict()
    theirs = IA3Config(**kwargs).to_dict()
    assert set(ours) == set(theirs)
    for key in ("fan_in_fan_out", "init_ia3_weights", "modules_to_save", "exclude_modules", "task_type"):
        assert ours[key] == theirs[key], key
    with pytest.raises(errors.ConfigError, match="feedforward_modules"):
        peft_rs.IA3Config(target_modules=["a"], feedforward_modules=["b"])
    with pytest.raises(errors.ConfigError, match="layers_to_transform"):
        peft_rs.IA3Config(target_modules=["a"], layers_to_transform=[0])


def test_wrong_shape_in_file_names_the_key(tmp_path):
    config = IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])
    get_peft_model(make_model(MLP), config).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    # Declaring lin0 feed-forward instead of lin1 makes the saved vectors the wrong orientation.
    path.write_text(
        path.read_text().replace(
            '"feedforward_modules": [\n    "lin1"', '"feedforward_modules": [\n    "lin0"'
        )
    )
    assert json.loads(path.read_text())["feedforward_modules"] == ["lin0"]
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)  # the tensors are checked per layer
    model = make_model(MLP)
    with pytest.raises(errors.ShapeError, match=r"lin[01]\.ia3_l"):
        adapter.merge_into(base_state_dict(model), peft_rs.module_types(model))


def ia3_layer(w, b=None, ff=False, weights=None, seed=0):
    """An IA³ adapter on a Linear named "m"; feed-forward is decided by the config, as in PEFT."""
    layer = peft_rs.AdaptedLayer(w, b, module_name="m")
    config = peft_rs.IA3Config(target_modules=["m"], feedforward_modules=["m"] if ff else [])
    layer.add_adapter("default", config, weights=weights, seed=seed)
    return layer


@settings(max_examples=30, deadline=None)
@given(d_in=st.integers(1, 16), d_out=st.integers(1, 16), ff=st.booleans(), seed=st.integers(0, 1000))
def test_merge_unmerge_and_merged_forward(d_in, d_out, ff, seed):
    g = np.random.default_rng(seed)
    w = g.standard_normal((d_out, d_in), dtype=np.float32)
    b = g.standard_normal(d_out, dtype=np.float32)
    l_shape = (1, d_in) if ff else (d_out, 1)
    ia3_l = (g.uniform(0.5, 1.5, l_shape) * g.choice([-1, 1], l_shape)).astype(np.float32)
    layer = ia3_layer(w, b, ff=ff, weights={"ia3_l": ia3_l})
    x = g.standard_normal((3, d_in), dtype=np.float32)
    unmerged = layer.forward(x)
    layer.merge()
    np.testing.assert_allclose(layer.forward(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(layer.base_weight, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.base_bias, b, rtol=1e-5, atol=1e-6)


def test_default_init_is_identity():
    w = np.random.default_rng(0).standard_normal((5, 4), dtype=np.float32)
    x = np.random.default_rng(1).standard_normal((2, 4), dtype=np.float32)
    for ff in (True, False):
        layer = ia3_layer(w, ff=ff)
        assert layer.weights()["ia3_l"].shape == ((1, 4) if ff else (5, 1))
        np.testing.assert_allclose(layer.forward(x), x @ w.T, rtol=1e-6)
        np.testing.assert_array_equal(layer.merged_weight(), w)
