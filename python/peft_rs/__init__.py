"""peft_rs: PEFT adapters (LoRA, ...) computed in Rust, file-compatible with HuggingFace PEFT."""

from __future__ import annotations

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
    combine_adapters,
    merge_checkpoint,
)
from .errors import PeftError
from .protocols import Adapter, Mergeable


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
    "combine_adapters",
    "errors",
    "get_peft_model",
    "merge_checkpoint",
    "models",
    "module_types",
    *CONFIG_CLASSES,
]
