"""What both kernel files need to know about how Triton runs here."""
from __future__ import annotations

import contextlib
import os

import torch
import triton


def _interpreting() -> bool:
    # triton.knobs is Triton ≥ 3.4; older releases read the variable directly. Same answer @triton.jit saw.
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Under TRITON_INTERPRET=1 kernels run in numpy on CPU tensors: no libdevice, no bf16 dot, no autotuning.
INTERPRET = _interpreting()


def device_guard(t: torch.Tensor):
    """Launch on t's GPU, not the current one (multi-GPU ComfyUI setups place models anywhere)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
