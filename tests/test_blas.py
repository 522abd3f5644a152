"""The BLAS opened at run time for the CPU kernels' f32 products (`peft_rs.use_blas`): PEFT's
numbers through each library and through the built-in kernels, and clear errors that change
nothing."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from torch import nn

import peft_rs
from conftest import F32_TOL
from peft_rs import errors


def numpy_openblas() -> Path | None:
    """The OpenBLAS numpy's wheel bundles (numpy >= 2 on Linux), loadable by path."""
    found = sorted((Path(np.__file__).parent.parent / "numpy.libs").glob("libscipy_openblas*"))
    return found[0] if found else None


TORCH_MKL = peft_rs._torch_mkl()
HAS_MKL = TORCH_MKL is not None and platform.machine() == "x86_64" and torch.backends.mkl.is_available()
# The libraries this machine has (torch's MKL and numpy's OpenBLAS on x86-64 Linux: checked below).
LIBRARIES = {
    name: path
    for name, path in [
        ("built-in", None),
        ("torch's MKL", TORCH_MKL if HAS_MKL else False),
        ("numpy's OpenBLAS", numpy_openblas() or False),
    ]
    if path is not False
}


@pytest.fixture
def library(request):
    """Makes the parametrized library current for the test, and restores the previous one."""
    before = peft_rs.blas_info()
    peft_rs.use_blas(LIBRARIES[request.param])
    yield request.param
    peft_rs.use_blas(before["path"] if before else None)


def test_the_wheels_libraries_are_found_on_x86_64_linux():
    """torch's PyPI wheel carries MKL there and numpy's (>= 2) bundles OpenBLAS, so the parity
    test below runs through both."""
    if platform.machine() == "x86_64" and sys.platform == "linux":
        assert set(LIBRARIES) == {"built-in", "torch's MKL", "numpy's OpenBLAS"}


def env_without_blas_choice() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PEFT_RS_BLAS"}


def blas_info_in_subprocess(code: str = "import peft_rs", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", f"{code}; import peft_rs; print(peft_rs.blas_info())"],
        env={**env_without_blas_choice(), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


FORWARD_TORCH = (
    "import numpy as np, peft_rs, torch; "
    "layer = peft_rs.AdaptedLayer(np.ones((4, 3), np.float32)); "
    "layer.add_adapter('default', peft_rs.LoraConfig(r=2)); "
    "layer.forward(torch.ones(2, 3))"
)


@pytest.mark.skipif(not HAS_MKL, reason="torch here has no MKL")
@pytest.mark.parametrize(
    ("code", "opened"),
    [
        ("import peft_rs", False),  # numpy-only use does not pay for torch's library
        ("import torch, peft_rs", True),
        (FORWARD_TORCH, True),  # torch imported after peft_rs, its tensors given to it
        (FORWARD_TORCH.replace("layer.forward", "peft_rs.use_blas(None); layer.forward"), False),
    ],
)
def test_default_opens_torchs_mkl_once_torch_is_in_use(code, opened):
    result = blas_info_in_subprocess(code)
    assert result.returncode == 0, result.stderr
    assert ("'description': 'MKL'" in result.stdout and str(TORCH_MKL) in result.stdout) == opened
    assert ("None" in result.stdout.splitlines()[-1]) != opened


def test_environment_variable_chooses_the_library():
    off = blas_info_in_subprocess("import torch", PEFT_RS_BLAS="off")
    assert off.returncode == 0 and off.stdout.strip() == "None", off.stderr
    missing = blas_info_in_subprocess(PEFT_RS_BLAS="/no/such/libblas.so")
    assert missing.returncode != 0
    assert "AdapterFileNotFoundError" in missing.stderr and "/no/such/libblas.so" in missing.stderr
    if numpy_openblas() is not None:
        chosen = blas_info_in_subprocess(PEFT_RS_BLAS=str(numpy_openblas()))
        assert chosen.returncode == 0 and "OpenBLAS" in chosen.stdout, chosen.stderr


def test_a_library_that_cannot_be_used_is_an_error_and_changes_nothing():
    before = peft_rs.blas_info()
    with pytest.raises(FileNotFoundError, match="no_such_blas"):
        peft_rs.use_blas("/tmp/no_such_blas.so")
    # A shared library that is not a BLAS: peft_rs's own extension module.
    not_blas = Path(peft_rs._core.__file__)
    with pytest.raises(errors.LibraryError, match="cblas_sgemm") as raised:
        peft_rs.use_blas(not_blas)
    assert isinstance(raised.value, OSError) and str(not_blas) in str(raised.value)
    assert peft_rs.blas_info() == before


# (method config, in_features, out_features, tokens): tokens x out x in over 2**20 multiply-adds
# is cut into parallel blocks, by rows where tokens >= out, by columns (a partial last block)
# otherwise; the others are one product on the calling thread.
LORA = {"target_modules": ["lin"], "init_lora_weights": False}
CASES = {
    "lora-rows": (peft.LoraConfig(r=8, lora_alpha=16, **LORA), 96, 160, 300),
    "lora-columns": (peft.LoraConfig(r=8, **LORA), 96, 700, 40),
    "lora-small": (peft.LoraConfig(r=4, **LORA), 24, 40, 3),
    "dora": (peft.LoraConfig(r=8, use_dora=True, **LORA), 96, 160, 300),
    "vera": (peft.VeraConfig(r=32, target_modules=["lin"], init_weights=False), 128, 128, 300),
    "loha": (peft.LoHaConfig(r=8, target_modules=["lin"], init_weights=False), 96, 160, 300),
}


class One(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("library", list(LIBRARIES), indirect=True)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_merge_match_peft_through_each_library(library, case, tmp_path):
    config, in_features, out_features, tokens = CASES[case]
    torch.manual_seed(0)
    model = One(in_features, out_features)
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = peft_rs.module_types(model)
    peft_model = peft.get_peft_model(model, config).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # DoRA and LoRA leave B at zero only without init_lora_weights=False
                param.normal_()
    peft_model.save_pretrained(tmp_path)
    peft_layer = peft_model.base_model.model.lin
    ours = peft_rs.PeftAdapter.from_pretrained(tmp_path).layer("lin", state_dict, types)

    x = torch.randn(tokens, in_features)
    strided = torch.randn(in_features, tokens).T  # columns contiguous: the transposed operand
    with torch.no_grad():
        for inputs in (x, strided, x.reshape(1, tokens, in_features)):
            torch.testing.assert_close(ours.forward(inputs), peft_layer(inputs), **F32_TOL)
        expected = peft_layer(x)
    ours.merge()
    torch.testing.assert_close(ours.forward(x), expected, **F32_TOL)
    ours.unmerge()
    torch.testing.assert_close(ours.forward(x), expected, **F32_TOL)
