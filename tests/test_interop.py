"""The Python surface: zero-copy export, array types and dtypes, protocols, stubs, threads."""

from __future__ import annotations

import ast
import inspect
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import peft_rs
from peft_rs import _core


def linear(dtype=np.float32, seed=0):
    g = np.random.default_rng(seed)
    w = g.standard_normal((16, 12)).astype(dtype)
    return peft_rs.LoraLinear(w, config=peft_rs.LoraConfig(r=4, init_lora_weights=False), seed=seed)


def test_export_is_zero_copy():
    layer = linear()
    a1 = layer.weights()["lora_A.weight"]
    a2 = layer.weights()["lora_A.weight"]
    assert a1.__array_interface__["data"][0] == a2.__array_interface__["data"][0]
    t = torch.from_numpy(a1)
    assert t.data_ptr() == a1.__array_interface__["data"][0]


def test_torch_output_owns_its_buffer_after_layer_is_gone():
    layer = linear()
    y = layer.forward(torch.ones(3, 12))
    del layer
    assert torch.isfinite(y).all() and y.shape == (3, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_follow_the_base(dtype):
    w = torch.randn(16, 12, generator=torch.Generator().manual_seed(0)).to(dtype)
    layer = peft_rs.LoraLinear(w, config=peft_rs.LoraConfig(r=4, init_lora_weights=False))
    x = torch.randn(2, 3, 12).to(dtype)
    y = layer.forward(x)
    assert y.dtype == dtype
    expected_adapter = torch.float64 if dtype == torch.float64 else torch.float32
    assert layer.weights()["lora_A.weight"].dtype == expected_adapter
    a, b = layer.weights()["lora_A.weight"], layer.weights()["lora_B.weight"]
    want = (
        torch.nn.functional.linear(x, w).to(expected_adapter) + 2.0 * (x.to(expected_adapter) @ a.T @ b.T)
    ).to(dtype)  # alpha/r = 8/4
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)


def test_requires_grad_input_is_accepted():
    layer = linear()
    x = torch.ones(2, 12, requires_grad=True)
    assert layer.forward(x).shape == (2, 16)


def test_protocols():
    for layer in [linear(), peft_rs.LoraEmbedding(np.zeros((5, 3), np.float32))]:
        assert isinstance(layer, peft_rs.Adapter)
        assert isinstance(layer, peft_rs.Mergeable)


LAYER_CLASSES = {
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv2d",
    "AdaLoraLinear",
    "IA3Linear",
    "IA3Conv2d",
    "VeraLinear",
}


def test_stub_lists_every_public_class_and_method():
    stub = ast.parse((Path(peft_rs.__file__).parent / "_core.pyi").read_text())
    stubbed = {
        node.name: {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
        for node in stub.body
        if isinstance(node, ast.ClassDef)
    }
    inherited = stubbed.pop("_AdapterLayer")
    for name, cls in inspect.getmembers(_core, inspect.isclass):
        if issubclass(cls, BaseException):
            continue
        methods = {m for m in vars(cls) if not m.startswith("_") or m in ("__dlpack__", "__dlpack_device__")}
        declared = stubbed[name] | (
            inherited if not name.endswith("Config") and name in LAYER_CLASSES else set()
        )
        assert methods <= declared, f"{name}: {methods - declared} missing from _core.pyi"


def test_forward_runs_in_parallel_threads():
    # Heavy work releases the GIL; results from threads equal the sequential ones.
    layer = peft_rs.LoraLinear(
        np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32),
        config=peft_rs.LoraConfig(r=8, init_lora_weights=False),
    )
    xs = [np.random.default_rng(i).standard_normal((64, 256)).astype(np.float32) for i in range(8)]
    sequential = [layer.forward(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(layer.forward, xs))
    for a, b in zip(sequential, parallel, strict=True):
        np.testing.assert_array_equal(a, b)
