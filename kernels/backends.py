"""Which implementation runs an INT8 GEMM on a given device, and why the others do not.

Selection is per call (device, shape), never a process-wide switch: tests and benchmarks force a
backend with `use_backend(...)`, which is scoped to the current context (thread/task).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os

import torch

from .routing import DeviceFacts, Route, decide

log = logging.getLogger(__name__)

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("int8_convrot_backend", default=None)

GEMM_BACKENDS = ("triton", "ck_hip", "int_mm", "cpu", "reference")


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


def _device_name(device: torch.device, capability, rocm: bool) -> str:
    if rocm:
        try:
            return torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
        except Exception:   # not readable (or a simulated device): the gfx version torch reports
            return f"gfx {capability[0]}.{capability[1]}" if capability else "GPU"
    return f"sm_{capability[0]}{capability[1]}" if capability else ""


def int_mm_probe(device: torch.device) -> tuple[bool, str]:
    """(torch._int_mm runs exactly on this GPU, why not). NVIDIA: cuBLASLt's int8 GEMM needs sm_75+. ROCm:
    it depends on the build and the gfx target, so one small product is checked against the exact one."""
    if not getattr(torch.version, "hip", None):
        ok = torch.cuda.get_device_capability(device) >= (7, 5)
        return ok, "" if ok else "torch._int_mm needs sm_75+ (int8 tensor cores)"
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(-128, 128, (32, 64), dtype=torch.int8, generator=gen)
        w = torch.randint(-128, 128, (32, 64), dtype=torch.int8, generator=gen)
        got = torch._int_mm(a.to(device), w.to(device).t()).cpu()
    except Exception as exc:
        return False, f"torch._int_mm fails here ({type(exc).__name__}: {str(exc)[:120]})"
    if not torch.equal(got.long(), a.long() @ w.long().t()):
        return False, "torch._int_mm gives a wrong product here"
    return True, ""


def device_facts(device: torch.device) -> DeviceFacts:
    """What decides the route, read from torch, Triton and comfy-kitchen (tests simulate devices by
    monkeypatching torch.version.hip and torch.cuda)."""
    if device.type != "cuda":
        return DeviceFacts(device.type)
    rocm = bool(getattr(torch.version, "hip", None))
    cap = tuple(torch.cuda.get_device_capability(device))
    hip = (False, "")
    if rocm:
        from . import ck_hip
        hip = ck_hip.int8_linear_status()
    return DeviceFacts("cuda", rocm, cap, _device_name(device, cap, rocm), triton_status(), hip,
                       int_mm_probe(device))


def _key(device: torch.device) -> tuple:
    index = device.index
    if device.type == "cuda" and index is None:
        try:
            index = torch.cuda.current_device()
        except Exception:
            index = 0
    return device.type, index


@functools.lru_cache(maxsize=None)
def _route(key: tuple) -> Route:
    device = torch.device(key[0]) if key[1] is None else torch.device(*key)
    r = decide(device_facts(device))
    log.info("INT8 ConvRot: %s", r.describe(f"INT8 layers on {device}"))   # once per device (cached)
    return r


def route(device: torch.device) -> Route:
    """Who computes W8A8 on `device` and why (kernels/routing.py), decided once per device."""
    return _route(_key(torch.device(device)))


route.cache_clear = _route.cache_clear


# The per-call questions the forward asks of the route are constants for dynamo: they are decided once per
# device (probes, logging and lru_caches that dynamo would otherwise trace or break at).
@torch.compiler.assume_constant_result
def route_w8a8(device: torch.device) -> str | None:
    """Who runs W8A8 on `device` by its route (None: W8A16 there)."""
    return route(device).w8a8


@torch.compiler.assume_constant_result
def route_fallback(device: torch.device) -> str | None:
    """What runs a call the route's W8A8 backend declines (None: W8A16)."""
    return route(device).fallback


@torch.compiler.assume_constant_result
def select_gemm_backend(device: torch.device) -> str:
    forced = forced_backend()
    if forced is not None:
        return forced
    if device.type == "cpu":
        return "cpu"
    return route(device).w8a8 or "reference"
