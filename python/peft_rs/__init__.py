"""peft_rs: PEFT adapters (LoRA, ...) computed in Rust, file-compatible with HuggingFace PEFT."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from . import errors, models
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
    use_blas,
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
    ``off`` for the built-in kernels (faer); unset (or ``auto``), torch's MKL when torch is
    installed with it, else the built-in kernels (``blas_info()`` says which)."""
    choice = os.environ.get("PEFT_RS_BLAS") or "auto"
    if choice == "off":
        return
    if choice != "auto":
        use_blas(choice)  # an explicit choice that fails is an error
        return
    path = _torch_mkl()
    if path is None:
        return
    with contextlib.suppress(PeftError):  # a torch without MKL (e.g. aarch64): the built-in kernels
        use_blas(path)


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
    "use_blas",
    *CONFIG_CLASSES,
]
