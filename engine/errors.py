"""Errors that name the file, the tensor and what to do: every bad input ends in one of these."""
from __future__ import annotations


class Int8ConvRotError(ValueError):
    """Base class: a user-facing problem with an input, an option or an output path."""

    def __init__(self, message: str, *, path=None, tensor: str | None = None, hint: str | None = None):
        parts = []
        if path is not None:
            parts.append(f"{path}")
        if tensor is not None:
            parts.append(f"tensor '{tensor}'")
        where = ": ".join(parts)
        text = f"{where}: {message}" if where else message
        if hint:
            text += f" ({hint})"
        super().__init__(text)
        self.path, self.tensor, self.hint = path, tensor, hint


class FileFormatError(Int8ConvRotError):
    """Not a safetensors file, truncated, or an INT8 ConvRot layout we cannot read."""


class OutputPathError(Int8ConvRotError):
    """The output would overwrite the input, escape the models folder, or exists already."""
