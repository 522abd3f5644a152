"""peft_rs: PEFT adapters (LoRA, ...) computed in Rust, file-compatible with HuggingFace PEFT."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from . import _core, errors, models
from ._core import *  # noqa: F403  (one config class per registered method: CONFIG_CLASSES)
from ._core import (
    CONFIG_CLASSES,
    CUDA_ENABLED,
    AdaptedLayer,
    Model,
    PeftAdapter,
    PeftConfig,
    PeftModel,
    Tokenizer,
    Trainer,
    __version__,
    blas_info,
    combine_adapters,
    merge_checkpoint,
    use_amx,
)
from .errors import PeftError
from .protocols import Adapter, Mergeable


def _torch_mkl() -> Path | None:
    """torch's CPU library, which carries MKL on x86-64 Linux and Windows (found without importing
    torch; opening it takes ~0.1 s)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "lib"
    found = [folder / name for name in ("libtorch_cpu.so", "torch_cpu.dll") if (folder / name).exists()]
    return found[0] if found else None


def _choose_blas() -> None:
    """The BLAS for the CPU kernels' f32 products: ``PEFT_RS_BLAS`` names a library's path, or
    ``off`` for the built-in kernels (faer); unset (or ``auto``), torch's MKL once torch is in
    use (imported before peft_rs, or its tensors given to peft_rs), where torch has one: opening
    it takes ~0.1 s and ~110 MB of memory, which numpy-only use does not pay."""
    global _blas_pending
    choice = os.environ.get("PEFT_RS_BLAS") or "auto"
    if choice == "off":
        return
    if choice != "auto":
        use_blas(choice)  # an explicit choice that fails is an error
        return
    _blas_pending = True
    if "torch" in sys.modules:
        _torch_in_use()


def _torch_in_use() -> None:
    """Called by the bindings when the first torch tensor arrives (and by the import when torch
    was imported first): opens torch's MKL in the default mode, once."""
    global _blas_pending
    if not _blas_pending:
        return
    _blas_pending = False
    path = _torch_mkl()
    if path is not None:
        with contextlib.suppress(PeftError):  # a torch without MKL (aarch64...): faer stays
            use_blas(path)


def use_blas(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """Opens the BLAS library at ``path`` for the CPU kernels' f32 products (``None``: the
    built-in kernels); returns what :func:`blas_info` returns. Replaces the default choice."""
    global _blas_pending
    _blas_pending = False
    return _core.use_blas(path)


_blas_pending = False
_choose_blas()


def get_peft_model(
    model: Model, config: PeftConfig, adapter_name: str = "default", seed: int = 0
) -> PeftModel:
    """PEFT's ``get_peft_model``: ``model`` with a new adapter initialised as ``config`` says."""
    return PeftModel.get_peft_model(model, config, adapter_name, seed)


def module_types(model: Any) -> dict[str, str]:
    """Module paths of a torch model mapped to the module types peft_rs needs (``PeftAdapter``).

    ``nn.Linear`` → ``"linear"``, transformers ``Conv1D`` → ``"conv1d"``, ``nn.Embedding`` →
    ``"embedding"``, ``nn.Conv2d`` → ``"conv2d"``; other modules are left out.
    """
    import torch.nn as nn

    types: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Linear):
            types[name] = "linear"
        elif isinstance(module, nn.Embedding):
            types[name] = "embedding"
        elif isinstance(module, nn.Conv2d):
            types[name] = "conv2d"
        elif type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
            types[name] = "conv1d"
    return types


__all__ = [
    "Adapter",
    "AdaptedLayer",
    "CUDA_ENABLED",
    "Mergeable",
    "Model",
    "PeftAdapter",
    "PeftConfig",
    "PeftError",
    "PeftModel",
    "Tokenizer",
    "Trainer",
    "__version__",
    "blas_info",
    "combine_adapters",
    "errors",
    "get_peft_model",
    "merge_checkpoint",
    "models",
    "module_types",
    "use_amx",
    "use_blas",
    *CONFIG_CLASSES,
]
