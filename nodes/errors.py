"""Errors as a ComfyUI user sees them. ComfyUI reports a node's exception as `full_type_name(type)`
(execution.py: `module + '.' + qualname` unless the module is `builtins`) and `str(exc)`. A custom
node pack is imported under its folder's absolute path, so our classes would show as
`/…/custom_nodes/ComfyUI-INT8-ConvRot.engine.errors.FileFormatError`, and our messages carry the
model's absolute path. `shown_as` re-raises the same error as a subclass whose module reads as
`builtins` (the UI shows `FileFormatError`) with the path replaced by the name the loader list shows.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

from ..engine.errors import Int8ConvRotError

_SHOWN: dict[type, type] = {}


def _shown_class(cls: type) -> type:
    """`cls` under a subclass of the same name that ComfyUI prints without a module path (isinstance
    and except clauses for `cls` still match)."""
    if cls.__module__ == "builtins":
        return cls
    shown = _SHOWN.get(cls)
    if shown is None:
        shown = _SHOWN[cls] = type(cls.__name__, (cls,), {"__module__": "builtins", "__qualname__": cls.__qualname__,
                                                          "__reduce__": lambda self: (cls, (str(self),))})
    return shown


def user_error(exc: Int8ConvRotError, names: dict | None = None) -> Int8ConvRotError:
    """A copy of `exc` with each path of `names` (and its real path) shown as the name it maps to."""
    text, shown_path = str(exc), exc.path
    forms = []
    for p, name in (names or {}).items():
        if p:
            forms += [(form, name) for form in {os.fspath(p), os.path.realpath(os.fspath(p))}]
    for form, name in sorted(forms, key=lambda f: -len(f[0])):   # longest first: a path may contain another
        text = text.replace(form, name)
        if exc.path is not None and os.fspath(exc.path) == form:
            shown_path = name
    cls = _shown_class(type(exc))
    new = cls.__new__(cls)
    Exception.__init__(new, text)
    new.path, new.tensor, new.hint = shown_path, exc.tensor, exc.hint
    return new


@contextmanager
def shown_as(names: dict | None = None):
    """Inside a node's execute: every Int8ConvRotError leaves with its class name alone and each
    absolute path of `names` ({path: name as the node lists it}) replaced by that name."""
    try:
        yield
    except Int8ConvRotError as exc:
        raise user_error(exc, names) from exc


__all__ = ["shown_as", "user_error"]
