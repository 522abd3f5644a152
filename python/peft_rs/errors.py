"""Exceptions raised by peft_rs.

Every error is a :class:`PeftError` and also an instance of the matching built-in exception, so
``except KeyError`` or ``except FileNotFoundError`` work as they would with PEFT.
"""

from __future__ import annotations


class PeftError(Exception):
    """Base class of every peft_rs error."""


class ConfigError(PeftError, ValueError):
    """A config field holds a value that is invalid or not supported."""


class UnsupportedPeftTypeError(ConfigError):
    """The ``peft_type`` of a config or file is not one peft_rs implements."""


class ShapeError(PeftError, ValueError):
    """A tensor has a shape other than the one expected."""


class _KeyMessage(KeyError):
    # KeyError's str() quotes its argument; show the message as written.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingKeyError(PeftError, _KeyMessage):
    """A tensor that must be present (in a file, state dict or layer) is not."""


class UnexpectedKeyError(PeftError, _KeyMessage):
    """A tensor was found that nothing expects."""


class DTypeError(PeftError, TypeError):
    """A tensor has a dtype that cannot be used there."""


class InvalidOperationError(PeftError, RuntimeError):
    """The operation is not possible in the layer's current state or for its kind."""


class NonFiniteMergeError(PeftError, ValueError):
    """``safe_merge`` found NaN or infinite values; nothing was changed."""


class AdapterFileNotFoundError(PeftError, FileNotFoundError):
    """An adapter directory or file does not exist."""


class AdapterIOError(PeftError, OSError):
    """Reading or writing a file failed."""


class LibraryError(PeftError, OSError):
    """A shared library (a BLAS given to :func:`peft_rs.use_blas`) cannot be opened or lacks a
    function peft_rs needs."""


class InvalidFileError(PeftError, ValueError):
    """A config or weights file cannot be parsed (malformed JSON, truncated safetensors...)."""


class ComputeError(PeftError, RuntimeError):
    """The tensor backend (candle) reported an error."""


class InvalidArgumentError(PeftError, ValueError):
    """A function argument has an invalid value."""


class ArgumentTypeError(PeftError, TypeError):
    """A function argument has the wrong type (e.g. not a numpy array or torch tensor)."""


__all__ = [
    "AdapterFileNotFoundError",
    "AdapterIOError",
    "ArgumentTypeError",
    "ComputeError",
    "ConfigError",
    "DTypeError",
    "InvalidArgumentError",
    "InvalidFileError",
    "InvalidOperationError",
    "LibraryError",
    "MissingKeyError",
    "NonFiniteMergeError",
    "PeftError",
    "ShapeError",
    "UnexpectedKeyError",
    "UnsupportedPeftTypeError",
]
