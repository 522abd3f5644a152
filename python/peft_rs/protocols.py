"""Structural types mirroring the Rust core, so any adapted layer can be typed and checked."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Adapter(Protocol):
    """A module with named adapters (the Rust ``AdaptedModule``).

    ``forward`` takes and returns numpy arrays or torch tensors (the output has the input's type).
    """

    def forward(self, x: Any) -> Any: ...

    def weights(self, adapter_name: str | None = None) -> dict[str, Any]: ...

    def num_parameters(self, adapter_name: str | None = None) -> int: ...

    def config(self, adapter_name: str | None = None) -> Any: ...

    def set_adapter(self, adapter_names: str | list[str]) -> None: ...

    @property
    def active_adapters(self) -> list[str]: ...


@runtime_checkable
class Mergeable(Protocol):
    """Merging as the Rust core does it for every method (``MergeRule``)."""

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None: ...

    def unmerge(self) -> None: ...

    def merged_weight(self, adapter_names: str | list[str] | None = None) -> Any: ...

    @property
    def merged(self) -> bool: ...


__all__ = ["Adapter", "Mergeable"]
