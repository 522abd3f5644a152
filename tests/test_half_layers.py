"""f16 and bf16 layers against PEFT's, per method: the base in half precision with the adapter kept
in f32 (PEFT's `autocast_adapter_dtype`), through each path of peft_rs's fused CPU layer: few rows
(row dot products), more rows on the AMX tiles (where the CPU has them), with the BLAS's f16
product (torch's MKL, opened by default) and without a BLAS (f32 copies through faer), rows of `x`
further apart than its width."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    VeraConfig,
    get_peft_model,
)
from torch import nn

import peft_rs
from conftest import assert_close, rs_layer

IN, OUT = 72, 40
METHODS = {
    "lora": LoraConfig(target_modules=["lin"], r=6, lora_alpha=9, init_lora_weights=False),
    "dora": LoraConfig(target_modules=["lin"], r=6, use_dora=True, init_lora_weights=False),
    "adalora": AdaLoraConfig(target_modules=["lin"], init_r=6, total_step=10, init_lora_weights=False),
    "ia3": IA3Config(target_modules=["lin"], feedforward_modules=[], init_ia3_weights=False),
    "ia3-ff": IA3Config(target_modules=["lin"], feedforward_modules=["lin"], init_ia3_weights=False),
    "vera": VeraConfig(target_modules=["lin"], r=8, init_weights=False),
    "loha": LoHaConfig(target_modules=["lin"], r=4, init_weights=False),
    "lokr": LoKrConfig(target_modules=["lin"], r=4, init_weights=False),
    "oft": OFTConfig(target_modules=["lin"], r=0, oft_block_size=8, init_weights=False),
    "boft": BOFTConfig(target_modules=["lin"], boft_block_size=4, init_weights=False),
}
# One or two rounding steps of the half type apart (PEFT and peft_rs round at the same points
# except where noted in the methods' files; f32 summation order can move a value across one).
TOL = {torch.float16: {"rtol": 2e-3, "atol": 2e-3}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2}}


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(IN, OUT)


@pytest.fixture(params=["amx", "mkl", "no-blas"])
def blas(request):
    """The CPU paths the fused layer takes: the AMX tiles where the CPU has them (with torch's MKL
    loaded, as by default), or with the tiles off torch's MKL (its f16 GEMM found and checked at
    load) or no BLAS (faer); the choices in use before are restored."""
    before = peft_rs.blas_info()
    if request.param == "no-blas":
        peft_rs.use_blas(None)
    else:
        info = peft_rs.use_blas(peft_rs._torch_mkl())
        assert info["description"] == "MKL" and info["f16_gemm"], info
    peft_rs.use_amx(request.param == "amx")
    yield request.param
    peft_rs.use_amx(True)
    peft_rs.use_blas(before["path"] if before else None)


def built(method: str, dtype: torch.dtype, tmp_path):
    """PEFT's layer on a `dtype` base with its adapter in f32, and peft_rs's with the same weights."""
    torch.manual_seed(0)
    model = One()
    peft_model = get_peft_model(model, copy.deepcopy(METHODS[method])).eval()
    peft_model.save_pretrained(tmp_path)
    adapter = peft_rs.PeftAdapter.from_pretrained(tmp_path)
    f32_state = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    peft_model.to(dtype)
    peft_model.base_model._cast_adapter_dtype("default", autocast_adapter_dtype=True)
    with torch.no_grad():
        for name, t in peft_model.state_dict().items():
            if t.dtype == torch.float32:
                t.copy_(f32_state[name])  # the f32 values the file holds
    layer = peft_model.base_model.model.lin
    base = layer.get_base_layer()
    base_sd = {"lin.weight": base.weight.detach().clone(), "lin.bias": base.bias.detach().clone()}
    return layer, rs_layer(adapter, "lin", layer, base_sd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_half_layer_matches_peft(method, dtype, blas, tmp_path):
    layer, ours = built(method, dtype, tmp_path)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "1 row": torch.randn(1, IN, generator=g),
        "12 rows": torch.randn(12, IN, generator=g),
        "3x7 rows": torch.randn(3, 7, IN, generator=g),
        "40 strided rows": torch.randn(40, IN + 8, generator=g)[:, :IN],
    }
    for what, x in inputs.items():
        x = x.to(dtype)
        with torch.no_grad():
            want = layer(x)
        got = ours.forward(x)
        assert got.dtype == dtype and got.shape == want.shape, what
        assert_close(got, want, tol=TOL[dtype], msg=f"{method} {what}")
    ours.merge()
    layer.merge()
    x = inputs["3x7 rows"].to(dtype)
    with torch.no_grad():
        assert_close(ours.forward(x), layer(x), tol=TOL[dtype], msg=f"{method} merged")
    ours.unmerge()
    layer.unmerge()
    with torch.no_grad():
        assert_close(ours.forward(x), layer(x), tol=TOL[dtype], msg=f"{method} unmerged")
