"""peft_rs: PEFT adapters (LoRA, ...) computed in Rust, file-compatible with HuggingFace PEFT."""

from __future__ import annotations

from typing import Any

from . import errors, models
from ._core import *  # noqa: F403  (one config class per registered method: CONFIG_CLASSES)
from ._core import CONFIG_CLASSES, CUDA_ENABLED, AdaptedLayer, PeftAdapter, PeftConfig, __version__
from .errors import PeftError
from .protocols import Adapter, Mergeable


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
    "PeftAdapter",
    "PeftConfig",
    "PeftError",
    "__version__",
    "errors",
    "models",
    "module_types",
    *CONFIG_CLASSES,
]
