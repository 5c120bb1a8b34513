"""A Triton kernel that cannot compile or launch on this machine never crashes a workflow.

When a kernel raises (old driver, triton-windows quirks, ptxas or out-of-resources errors, a shape nobody
tested), the op computes the same result with torch instead — `torch._int_mm` for the GEMM, the torch
rotation + quantization for rotate_quantize — logs one warning per (op, device, cause), and remembers the
failing (op, device, shape) so it does not pay for a failed compile on every call. Input errors
(ValueError/TypeError from our own checks) are not failures of Triton and still raise.

Switch: INT8_CONVROT_TRITON_FALLBACK=0 re-raises instead (every kernel test sets it, so a broken kernel
fails its test instead of passing on the fallback). The kernel wrappers count each launch (`launches()`):
a test asserts a kernel really ran, not a torch path that gives the same numbers.
"""
from __future__ import annotations

import collections
import logging
import os

import torch

log = logging.getLogger("comfyui_int8_convrot.triton")
ENV = "INT8_CONVROT_TRITON_FALLBACK"
_FAILED: dict[tuple, str] = {}  # (op, device, shape key) → cause, for the calls that skip Triton
_WARNED: set[tuple] = set()
_LAUNCHES: collections.Counter = collections.Counter()  # op → Triton kernel launches in this process


def enabled() -> bool:
    return os.environ.get(ENV, "1").lower() not in ("0", "false", "no", "off")


def _cause(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def run(op: str, device: torch.device, shape_key: tuple, fast, slow):
    """fast() (the Triton kernel) unless it failed before for this key; on failure slow(), warned once."""
    key = (op, str(device), shape_key)
    if key in _FAILED and enabled():   # switched off: try again and raise, never a silent torch result
        return slow()
    try:
        return fast()
    except (ValueError, TypeError):
        raise
    except Exception as exc:  # compile, launch and driver errors all surface as different types
        if not enabled():
            raise
        cause = _FAILED[key] = _cause(exc)
        if (op, str(device), cause) not in _WARNED:
            _WARNED.add((op, str(device), cause))
            log.warning("int8_convrot: the Triton %s kernel failed on %s (%s); this layer shape uses the torch "
                        "fallback instead, results are unchanged but slower. Set %s=0 to raise instead.",
                        op, device, cause, ENV)
        return slow()


def failures() -> dict[tuple, str]:
    """What fell back so far (for tests and the Inspect node)."""
    return dict(_FAILED)


def launched(op: str) -> None:
    """Called by a kernel wrapper once its Triton kernel launched."""
    _LAUNCHES[op] += 1


def launches() -> dict[str, int]:
    """Triton kernel launches so far, per op (for tests: proof that the kernel, not torch, ran)."""
    return dict(_LAUNCHES)


def reset() -> None:
    _FAILED.clear()
    _WARNED.clear()
    _LAUNCHES.clear()


def int_mm(qx: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Exact int32 qx·codesᵀ with torch: `torch._int_mm` where its shape rules allow (CUDA: M > 16 — pad —
    and K, N multiples of 8), else a float64 matmul (exact for |sum| < 2**53)."""
    m, k = qx.shape
    n = codes.shape[0]
    if k % 8 == 0 and n % 8 == 0 and k >= 16:
        try:
            if qx.is_cuda and m <= 16:
                padded = torch.zeros((17, k), dtype=torch.int8, device=qx.device)
                padded[:m] = qx
                return torch._int_mm(padded, codes.t())[:m]
            return torch._int_mm(qx, codes.t())
        except RuntimeError:  # a build or device without it
            pass
    return (qx.double() @ codes.double().t()).round().to(torch.int32)
