"""The Python surface: zero-copy export, array types and dtypes, protocols, stubs, threads."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import peft_rs

ROOT = Path(__file__).resolve().parents[1]


def lora_layer(w, seed=0):
    layer = peft_rs.AdaptedLayer(w)
    layer.add_adapter("default", peft_rs.LoraConfig(r=4, init_lora_weights=False), seed=seed)
    return layer


def linear(dtype=np.float32, seed=0):
    g = np.random.default_rng(seed)
    return lora_layer(g.standard_normal((16, 12)).astype(dtype), seed=seed)


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
    layer = lora_layer(w)
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


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_strided_inputs_equal_their_contiguous_copies(framework):
    """Transposed and sliced views come in through DLPack with their strides."""
    layer = linear()
    g = torch.Generator().manual_seed(1)
    views = [
        torch.randn(12, 5, generator=g).T,
        torch.randn(4, 24, generator=g)[:, ::2],
        torch.randn(3, 12)[1:],
    ]
    for view in views:
        x = view if framework == "torch" else view.numpy()
        contiguous = view.contiguous() if framework == "torch" else np.ascontiguousarray(view.numpy())
        y, want = layer.forward(x), layer.forward(contiguous)
        assert type(y) is type(want)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_large_inputs_arrive_whole(framework):
    """Inputs from 1 MiB are copied in by all threads in chunks: every element arrives, the last
    partial chunk included (an identity layer returns f32 rows exactly, an embedding its rows
    for int64 ids)."""
    g = np.random.default_rng(2)
    x = g.standard_normal((30_011, 12)).astype(np.float32)  # 1.44 MB, 5.5 chunks of 256 KiB
    ids = g.integers(0, 7, size=(3, 70_001))  # int64, 1.7 MB
    table = g.standard_normal((7, 3)).astype(np.float32)
    identity = peft_rs.AdaptedLayer(np.eye(12, dtype=np.float32))
    embedding = peft_rs.AdaptedLayer(table, kind="embedding")
    if framework == "torch":
        x_in, ids_in = torch.from_numpy(x), torch.from_numpy(ids)
    else:
        x_in, ids_in = x, ids
    np.testing.assert_array_equal(np.asarray(identity.forward(x_in)), x)
    np.testing.assert_array_equal(np.asarray(embedding.forward(ids_in)), table[ids])


def test_requires_grad_input_is_accepted():
    layer = linear()
    x = torch.ones(2, 12, requires_grad=True)
    assert layer.forward(x).shape == (2, 16)


def test_protocols():
    embedding = peft_rs.AdaptedLayer(np.zeros((5, 3), np.float32), kind="embedding")
    embedding.add_adapter("default", peft_rs.LoraConfig())
    for layer in [linear(), embedding]:
        assert isinstance(layer, peft_rs.Adapter)
        assert isinstance(layer, peft_rs.Mergeable)


def run_tool(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_stub_matches_the_compiled_module():
    """mypy's stubtest: every class, method, argument and default of `_core` is in `_core.pyi`,
    and nothing the module lacks is stubbed."""
    result = run_tool("-m", "mypy.stubtest", "peft_rs._core")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_stub_part_is_up_to_date():
    result = run_tool("tools/gen_stubs.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def big_layer_and_input(seconds=0.3):
    """A wide Linear layer with a LoRA adapter and an input whose forward takes about `seconds`
    (wide, so that converting the input and output is a small part of the call)."""
    g = np.random.default_rng(0)
    layer = lora_layer(g.standard_normal((2048, 2048), dtype=np.float32))
    rows = 16
    while True:
        x = g.standard_normal((rows, 2048), dtype=np.float32)
        start = time.perf_counter()
        layer.forward(x)
        if time.perf_counter() - start >= seconds or rows >= 1 << 16:
            return layer, x
        rows *= 2


def test_forward_releases_the_gil():
    """While a thread is inside a forward, Python keeps running in the main thread. Were the GIL
    held, the main thread's loop would stall for the whole forward (timestamps in two threads
    would not tell: both can be taken before either call starts)."""
    layer, x = big_layer_and_input()
    window = {}

    def work():
        window["start"] = time.perf_counter()
        window["y"] = layer.forward(x)
        window["end"] = time.perf_counter()

    worker = threading.Thread(target=work)
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    duration = window["end"] - window["start"]
    assert duration >= 0.1, f"a forward of {duration:.3f} s is too quick to tell"
    inside = [window["start"], *(t for t in ticks if window["start"] < t < window["end"]), window["end"]]
    longest_stall = max(np.diff(inside))
    assert longest_stall < duration / 4, (
        f"main thread stalled {longest_stall:.3f} s of a {duration:.3f} s forward"
    )
    np.testing.assert_array_equal(window["y"], layer.forward(x))


def test_concurrent_forwards_equal_sequential_ones():
    layer = linear()
    xs = [np.random.default_rng(i).standard_normal((64, 12)).astype(np.float32) for i in range(16)]
    sequential = [layer.forward(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(layer.forward, xs))
    for a, b in zip(sequential, parallel, strict=True):
        np.testing.assert_array_equal(a, b)
