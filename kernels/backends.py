"""Which implementation runs an INT8 GEMM on a given device, and why the others do not.

Selection is per call (device, shape), never a process-wide switch: tests and benchmarks force a
backend with `use_backend(...)`, which is scoped to the current context (thread/task).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("int8_convrot_backend", default=None)

GEMM_BACKENDS = ("triton", "int_mm", "cpu", "reference")


@contextlib.contextmanager
def use_backend(name: str):
    """Force one GEMM backend inside the block (for tests and benchmarks)."""
    if name not in GEMM_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {GEMM_BACKENDS}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


# dynamo on torch <= 2.13 cannot trace ContextVar.get: each layer's backend choice broke the graph (4 breaks
# per layer, fullgraph=True failed). Read once when dynamo traces instead: a compiled graph keeps the backend
# it was traced with (use_backend is for tests and benchmarks: torch._dynamo.reset() after switching).
@torch.compiler.assume_constant_result
def forced_backend() -> str | None:
    return _FORCED.get()


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(usable, reason). Triton needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"triton not importable: {exc}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "triton on CUDA"


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    """AMX tiles (Sapphire Rapids and later: int8 and bf16): oneDNN then runs int8 and bf16 GEMMs
    several times faster than fp32 sgemm, which changes the best CPU kernel for both."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe and probe())
    except Exception:
        return False


def int8_tensor_cores(device: torch.device) -> bool:
    """int8 MMA (and torch._int_mm) needs sm_75+; Ampere (sm_80) is what RTX 30xx users have."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 5)


def triton_int8_mma(device: torch.device) -> bool:
    """Triton 3.x emits int8 mma only from sm_80 (Turing compiles fail): sm_75 uses torch._int_mm."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def select_gemm_backend(device: torch.device) -> str:
    forced = forced_backend()
    if forced is not None:
        return forced
    if device.type == "cuda":
        return "triton" if triton_status()[0] and triton_int8_mma(device) else "int_mm"
    if device.type == "cpu":
        return "cpu"
    return "reference"
