"""Simulated GPUs for the routing tests (no GPU here): a ROCm or CUDA torch seen through monkeypatch, and
comfy-kitchen's real HIP backend constraints registered in its real registry as the backend would register
itself on that GPU (its `_build_constraints`, priority ["hip", ...]), with a stand-in module whose
int8_linear is comfy-kitchen's eager one (counted, so a test can tell that it ran)."""
from __future__ import annotations

import copy
import dataclasses
import types

import torch

from comfyui_int8_convrot.kernels import backends


def gpu(monkeypatch, capability, rocm: bool = False, triton_ok: bool = True):
    """torch reports one 'cuda' GPU of this capability (ROCm: the gfx version, torch.version.hip set)."""
    monkeypatch.setattr(torch.version, "hip", "7.0.0" if rocm else None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: tuple(capability))
    monkeypatch.setattr(backends, "triton_status", lambda: (triton_ok, "triton on CUDA" if triton_ok else "stub: no triton"))
    backends.route.cache_clear()


def int_mm(monkeypatch, ok: bool):
    """What the ROCm torch._int_mm probe answers (it would run a product on the GPU)."""
    monkeypatch.setattr(backends, "int_mm_probe", lambda device: (ok, "" if ok else "torch._int_mm fails here (stub)"))
    backends.route.cache_clear()


class KitchenHip:
    """Registers a 'hip' backend in comfy-kitchen's real registry (restored by `restore`)."""

    def __init__(self, registry):
        self.registry = registry
        self.saved = {k: copy.copy(getattr(registry, k)) for k in
                      ("_backends", "_capabilities", "_constraints", "_priority", "_disabled", "_unavailable")}
        self.calls = 0

    def register(self, wmma: bool = True, devices=None):
        from comfy_kitchen.backends import hip
        from comfy_kitchen.backends.eager import quantization as eager
        caps = hip._build_constraints(wmma)
        if devices is not None:   # the CPU stand-in of the GPU (a test computes on CPU tensors)
            caps = {k: dataclasses.replace(v, default_devices=frozenset(devices)) for k, v in caps.items()}

        def int8_linear(**kw):
            self.calls += 1
            return eager.int8_linear(**kw)
        module = types.SimpleNamespace(int8_linear=int8_linear)
        self.registry.register("hip", module, caps)
        self.registry.set_priority(["hip"] + [p for p in self.registry._priority if p != "hip"])

    def unavailable(self, reason: str):
        self.registry.mark_unavailable("hip", reason)

    def restore(self):
        for k, v in self.saved.items():
            setattr(self.registry, k, v)
        backends.route.cache_clear()
