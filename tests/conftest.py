"""Small real models and helpers shared by the parity tests (all numbers come from `peft`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

F32_TOL = {"rtol": 1e-5, "atol": 1e-5}
# bf16 has an 8-bit mantissa: one rounding step of a value near 1 is 2**-8 ≈ 4e-3.
BF16_TOL = {"rtol": 1.6e-2, "atol": 1.6e-2}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 16, bias=False)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class Stack(nn.Module):
    """Layered model for layers_to_transform / regex targets: model.layers.N.{q,v}."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(3):
            block = nn.Module()
            block.q = nn.Linear(8, 8)
            block.v = nn.Linear(8, 8)
            self.model.layers.append(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.model.layers:
            x = block.v(torch.tanh(block.q(x)))
        return x


class GPT2Like(nn.Module):
    """transformers Conv1D layers (weight stored (in, out)), as in GPT-2."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = Conv1D(24, 8)
        self.c_proj = Conv1D(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_attn(x)))


class EmbConv1D(nn.Module):
    """PEFT's test model of the same name: a transformers Conv1D with a single output feature."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin0(torch.relu(self.conv1d(self.emb(ids))).flatten(1))


class EmbedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.lin0 = nn.Linear(12, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.emb(ids))


class ConvModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 4, 1)
        self.conv_s2 = nn.Conv2d(4, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_s2(torch.relu(self.pw(torch.relu(self.conv(x)))))


def model_input(model: nn.Module, batch: tuple[int, ...] = (2, 5), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, EmbedModel):
        return torch.randint(0, 50, batch, generator=g)
    if isinstance(model, EmbConv1D):
        return torch.randint(0, 100, (batch[0], 10), generator=g)
    if isinstance(model, ConvModel):
        return torch.randn(batch[0], 3, 9, 9, generator=g)
    if isinstance(model, GPT2Like):
        return torch.randn(*batch, 8, generator=g)
    if isinstance(model, Stack):
        return torch.randn(*batch, 8, generator=g)
    return torch.randn(*batch, 10, generator=g)


def make_model(cls: type[nn.Module], seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return cls().to(dtype).eval()


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def peft_merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_close(actual, expected, tol=F32_TOL, msg: str = "") -> None:
    actual = torch.as_tensor(actual)
    torch.testing.assert_close(actual, expected.to(actual.dtype), msg=msg or None, **tol)


def module_input(layer: nn.Module, seed: int = 3) -> torch.Tensor:
    """An input for a PEFT tuner layer, shaped for its base layer."""
    g = torch.Generator().manual_seed(seed)
    base = layer.get_base_layer()
    if isinstance(base, nn.Embedding):
        return torch.randint(0, base.num_embeddings, (2, 7), generator=g)
    if isinstance(base, nn.Conv2d):
        return torch.randn(2, base.in_channels, 9, 9, generator=g).to(base.weight.dtype)
    in_features = base.weight.shape[0] if type(base).__name__ == "Conv1D" else base.in_features
    return torch.randn(2, 3, in_features, generator=g).to(base.weight.dtype)


def peft_module_types(peft_model) -> dict[str, str]:
    """`peft_rs.module_types` of the model `peft_model` wraps (its tuner layers unwrapped by PEFT)."""
    import peft_rs  # here, not at the top: generate_golden.py uses this file without peft_rs

    return peft_rs.module_types(copy.deepcopy(peft_model).unload())


def rs_layer(adapter, name, layer, base_sd, module_types=None):
    """peft_rs's layer for the module PEFT wraps in `layer` (Conv2d hyper-parameters passed on).
    `module_types` defaults to the type of this one module."""
    import peft_rs

    base = layer.get_base_layer()
    if module_types is None:
        module_types = {name: peft_rs.module_types(nn.ModuleDict({"m": base}))["m"]}
    if isinstance(base, nn.Conv2d):
        return adapter.layer(
            name,
            base_sd,
            module_types,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            groups=base.groups,
        )
    return adapter.layer(name, base_sd, module_types)


def assert_matches_peft(adapter, peft_model, base_sd, tol=F32_TOL, module_types=None) -> None:
    """peft_rs's merged state dict equals PEFT's merge_and_unload (every key, array type and dtype),
    and each adapted layer's unmerged output equals PEFT's layer. `module_types` defaults to those
    of the model `peft_model` wraps."""
    if module_types is None:
        module_types = peft_module_types(peft_model)
    expected = peft_merged_state_dict(peft_model)
    merged = adapter.merge_into(base_sd, module_types)
    assert set(merged) == set(expected) == set(base_sd)
    for key, value in expected.items():
        assert isinstance(merged[key], torch.Tensor)
        assert merged[key].dtype == value.dtype, key
        assert_close(merged[key], value, tol=tol, msg=key)
    for name in adapter.module_names():
        layer = peft_model.base_model.model.get_submodule(name)
        x = module_input(layer)
        with torch.no_grad():
            want = layer(x)
        got = rs_layer(adapter, name, layer, base_sd, module_types).forward(x)
        assert got.dtype == want.dtype, name
        assert_close(got, want, tol=tol, msg=name)


def assert_loads_in_peft(adapter, cls: type[nn.Module], base_sd, path) -> dict[str, torch.Tensor]:
    """Saves `adapter` to `path`; PEFT loads exactly its tensors (no missing or unexpected keys, same
    values), and the base model with peft_rs's merged weights gives PEFT's outputs. Returns the
    saved tensors."""
    import peft_rs

    adapter.save_pretrained(path)
    saved = load_file(path / "adapter_model.safetensors")
    peft_model = PeftModel.from_pretrained(make_model(cls), path).eval()
    peft_sd = get_peft_model_state_dict(peft_model)
    assert set(peft_sd) == set(saved)
    for key, value in saved.items():
        assert_close(peft_sd[key], value, msg=key)
    merged_model = make_model(cls)
    merged_model.load_state_dict(adapter.merge_into(base_sd, peft_rs.module_types(merged_model)))
    x = model_input(merged_model)
    with torch.no_grad():
        assert_close(merged_model(x), peft_model(x))
    return saved


def rewrite_weights(path, fn) -> None:
    """Applies `fn` to the tensors of `path`'s adapter file (bad-input tests)."""
    tensors = load_file(path / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


def random_adapted_layer(config, kind: str, d_in: int, d_out: int, seed: int):
    """An AdaptedLayer on a random Linear or 3x3 Conv2d base (numpy) with one adapter of `config`
    initialised from `seed`, and an input for it: `(layer, base weight, x)`."""
    import peft_rs

    g = np.random.default_rng(seed)
    if kind == "conv2d":
        w = g.standard_normal((d_out, d_in, 3, 3), dtype=np.float32)
        layer = peft_rs.AdaptedLayer(w, g.standard_normal(d_out, dtype=np.float32), kind=kind, padding=1)
        x = g.standard_normal((2, d_in, 5, 5), dtype=np.float32)
    else:
        w = g.standard_normal((d_out, d_in), dtype=np.float32)
        layer = peft_rs.AdaptedLayer(w, g.standard_normal(d_out, dtype=np.float32), kind=kind)
        x = g.standard_normal((3, d_in), dtype=np.float32)
    layer.add_adapter("default", config, seed=seed)
    return layer, w, x


def tol(*arrays) -> float:
    """1e-5 relative to the largest magnitude involved (f32 sums of that size)."""
    return 1e-5 * max(1.0, *(float(np.abs(a).max()) for a in arrays))


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
