"""Hypothesis properties of LoRA layers: merge/unmerge round trip, merged == unmerged forward,
zero-initialised B is the identity, and any leading batch dimensions."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peft_rs

settings.register_profile("peft_rs", max_examples=40, deadline=None)
settings.load_profile("peft_rs")

dims = st.integers(min_value=1, max_value=24)
ranks = st.integers(min_value=1, max_value=8)
batch_shapes = st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=3)
kinds = st.sampled_from(["linear", "conv1d", "embedding", "conv2d"])


def build(kind, d_in, d_out, r, seed, init=False, rslora=False):
    g = np.random.default_rng(seed)
    config = peft_rs.LoraConfig(r=r, lora_alpha=2 * r + 1, init_lora_weights=init, use_rslora=rslora)
    bias = None
    if kind == "embedding":
        w = g.standard_normal((d_in, d_out), dtype=np.float32)
        layer = peft_rs.AdaptedLayer(w, kind=kind)
    elif kind == "conv2d":
        w = g.standard_normal((d_out, d_in, 3, 3), dtype=np.float32)
        bias = g.standard_normal(d_out, dtype=np.float32)
        layer = peft_rs.AdaptedLayer(w, bias, kind=kind, padding=1)
    else:
        w = g.standard_normal((d_in, d_out) if kind == "conv1d" else (d_out, d_in), dtype=np.float32)
        bias = g.standard_normal(d_out, dtype=np.float32)
        layer = peft_rs.AdaptedLayer(w, bias, kind=kind)
    layer.add_adapter("default", config, seed=seed)
    return layer, w


def sample_input(kind, d_in, batch, seed):
    g = np.random.default_rng(seed + 1)
    if kind == "embedding":
        return g.integers(0, d_in, size=(*batch, 3), dtype=np.int64)
    if kind == "conv2d":
        return g.standard_normal((max(1, len(batch)), d_in, 5, 5), dtype=np.float32)
    return g.standard_normal((*batch, d_in), dtype=np.float32)


def scale(*arrays):
    return max(1.0, *(float(np.abs(a).max()) for a in arrays))


@given(kind=kinds, d_in=dims, d_out=dims, r=ranks, seed=st.integers(0, 2**16), rslora=st.booleans())
def test_merge_then_unmerge_restores_weight(kind, d_in, d_out, r, seed, rslora):
    layer, w = build(kind, d_in, d_out, r, seed, rslora=rslora)
    expected = layer.merged_weight()  # computed, not written
    np.testing.assert_array_equal(layer.base_weight, w)
    delta = expected - w
    assert np.abs(delta).max() > 0  # the adapter is not the identity
    layer.merge()
    assert layer.merged
    assert layer.merged_adapters == ["default"]
    np.testing.assert_allclose(layer.base_weight, expected, rtol=1e-5, atol=1e-5 * scale(w, delta))
    layer.unmerge()
    assert not layer.merged
    np.testing.assert_allclose(layer.base_weight, w, rtol=1e-5, atol=1e-5 * scale(w, delta))


@given(kind=kinds, d_in=dims, d_out=dims, r=ranks, batch=batch_shapes, seed=st.integers(0, 2**16))
def test_merged_forward_equals_unmerged(kind, d_in, d_out, r, batch, seed):
    layer, _ = build(kind, d_in, d_out, r, seed)
    x = sample_input(kind, d_in, batch, seed)
    unmerged = layer.forward(x)
    layer.merge()
    merged = layer.forward(x)
    assert merged.shape == unmerged.shape
    np.testing.assert_allclose(merged, unmerged, rtol=1e-4, atol=1e-4 * scale(unmerged))


@given(kind=kinds, d_in=dims, d_out=dims, r=ranks, batch=batch_shapes, seed=st.integers(0, 2**16))
def test_default_init_is_identity(kind, d_in, d_out, r, batch, seed):
    layer, _ = build(kind, d_in, d_out, r, seed, init=True)
    x = sample_input(kind, d_in, batch, seed)
    reference = torch.nn.functional
    y = layer.forward(x)
    # The base layer alone, computed by torch.
    w = torch.from_numpy(layer.base_weight)
    b = None if layer.base_bias is None else torch.from_numpy(layer.base_bias)
    xt = torch.from_numpy(x)
    if kind == "embedding":
        want = reference.embedding(xt, w)
    elif kind == "conv2d":
        want = reference.conv2d(xt, w, b, padding=1)
    elif kind == "conv1d":
        want = xt @ w + b
    else:
        want = reference.linear(xt, w, b)
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-5, atol=1e-5 * scale(want.numpy()))
    np.testing.assert_array_equal(layer.merged_weight(), layer.base_weight)


@given(d_in=st.integers(2, 24), d_out=dims, r=ranks, seed=st.integers(0, 2**16))
def test_strided_torch_input_matches_contiguous(d_in, d_out, r, seed):
    layer, _ = build("linear", d_in, d_out, r, seed)
    x = torch.randn(d_in, 6, generator=torch.Generator().manual_seed(seed)).T  # non-contiguous view
    assert not x.is_contiguous()
    torch.testing.assert_close(layer.forward(x), layer.forward(x.contiguous()), rtol=0, atol=0)
