"""Defining the pack's torch custom ops (namespace `int8_convrot`) once per process. Each op comes with a
fake (meta) kernel, so torch.compile traces a call as one opaque node instead of breaking the graph.
Eager calls skip the op's dispatcher (10-20 µs a call, measured on CPU) and run the implementation
directly: only a graph being traced needs the op."""
from __future__ import annotations

import torch

NAMESPACE = "int8_convrot"


def _existing(name: str):
    """The op if this namespace already defines it (the package imported twice under two names,
    e.g. as a ComfyUI custom-node folder and as `comfyui_int8_convrot`): re-defining would raise."""
    try:
        return getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return None


def define(name: str, impl, fake):
    """`int8_convrot::name` from a typed Python implementation and its fake kernel (no mutated arguments)."""
    op = _existing(name)
    if op is not None:
        return op
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=())
    op.register_fake(fake)
    return getattr(getattr(torch.ops, NAMESPACE), name)


def caller(op, impl):
    """Call `op` where dynamo traces (a constant True there), `impl` itself in eager code."""
    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return impl(*args)
    return call
