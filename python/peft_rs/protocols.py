"""Structural types mirroring the Rust traits, so any adapter class can be typed and checked."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Adapter(Protocol):
    """Mirror of the Rust ``Adapter`` trait: a layer with an adapter applied.

    ``forward`` takes and returns numpy arrays or torch tensors (the output has the input's type).
    """

    def forward(self, x: Any) -> Any: ...

    def weights(self) -> dict[str, Any]: ...

    def num_parameters(self) -> int: ...

    @property
    def config(self) -> Any: ...


@runtime_checkable
class Mergeable(Protocol):
    """Mirror of the Rust ``Mergeable`` trait."""

    def merge(self, safe_merge: bool = False) -> None: ...

    def unmerge(self) -> None: ...

    def delta_weight(self) -> Any: ...

    @property
    def merged(self) -> bool: ...


__all__ = ["Adapter", "Mergeable"]
