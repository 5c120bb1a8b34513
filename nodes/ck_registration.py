"""The pack's one process-wide change to ComfyUI: its kernels registered as a comfy-kitchen backend.

ComfyUI 0.29+ runs INT8 ConvRot files (stock UNETLoader / CLIPLoader) through comfy-kitchen, which
picks per call the first backend in its priority list whose constraints accept the call. `install()`
(called once from the nodes package import) registers kernels/ck_backend.py as backend "int8_convrot"
in front of that list; its constraints take only the calls it serves better (see that module), so
every other call reaches comfy-kitchen's own backends exactly as before.

Explicit and switchable:
- INT8_CONVROT_CK_BACKEND=0 in the environment: not registered at all (stock comfy-kitchen).
- At runtime: `set_enabled(False)` / the ComfyUI setting "INT8 ConvRot ▸ serve native INT8"
  (web/int8_convrot.js), through POST /int8_convrot/backend {"enabled": false}; comfy-kitchen's
  registry.disable/enable does the switching, so it takes effect on the next call.
- GET /int8_convrot/backend reports the state and which backend serves INT8 here, and why.
The log says once which backend serves `int8_linear` and why. On a ComfyUI without comfy-kitchen's
int8_linear (0.8.0, say) or with a comfy-kitchen whose registry API differs, nothing is registered and
the log says why.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading

import torch

from .native import native_int8

log = logging.getLogger(__name__)

ENV = "INT8_CONVROT_CK_BACKEND"
ROUTE = "/int8_convrot/backend"
_lock = threading.Lock()
# What install() did, for the route, the badge and tests (the registration is process-wide by nature).
_state: dict = {"registered": False, "enabled": False, "reason": "not installed yet", "serves": {}}
_route_registered = False


def _env_off() -> bool:
    return os.environ.get(ENV, "1").strip().lower() in ("0", "false", "off", "no")


def _kitchen():
    """(comfy_kitchen module, registry) when its API is the one we register against, else (None, reason)."""
    try:
        import comfy_kitchen as ck
        from comfy_kitchen.constraints import FunctionConstraints
        from comfy_kitchen.registry import registry
    except Exception as exc:
        return None, f"comfy-kitchen is not importable ({type(exc).__name__}: {exc}): this ComfyUI has no native INT8"
    if not hasattr(ck, "int8_linear"):
        return None, f"comfy-kitchen {_version()} has no int8_linear: this ComfyUI has no native INT8"
    missing = [m for m in ("register", "disable", "enable", "set_priority", "get_capable_backend",
                           "is_available", "list_backends") if not hasattr(registry, m)]
    if missing:
        return None, f"comfy-kitchen {_version()}'s registry lacks {', '.join(missing)}"
    if "call_rules" not in {f.name for f in dataclasses.fields(FunctionConstraints)}:
        return None, f"comfy-kitchen {_version()}'s FunctionConstraints has no call_rules"
    if not isinstance(getattr(registry, "_priority", None), list):
        return None, f"comfy-kitchen {_version()}'s registry keeps no priority list we can extend"
    return ck, registry


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("comfy-kitchen")
    except Exception:
        return "(unknown version)"


def _compute_device() -> torch.device:
    """The device ComfyUI computes on (MPS, XPU, DirectML's privateuseone, a ROCm or CUDA GPU, the CPU)."""
    try:
        import comfy.model_management as mm
        return torch.device(mm.get_torch_device())
    except Exception:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _probe_kwargs(device: torch.device, group: int) -> dict:
    """A representative stock-loader call (a Z-Image Linear, 1k tokens) for asking the registry."""
    x = torch.empty((1024, 256), dtype=torch.float32 if device.type == "cpu" else torch.bfloat16, device=device)
    w = torch.zeros((64, 256), dtype=torch.int8, device=device)
    s = torch.ones((64, 1), dtype=torch.float32, device=device)
    return {"x": x, "weight": w, "weight_scale": s, "bias": None, "out_dtype": x.dtype, "convrot": True,
            "convrot_groupsize": group, "input_act": None}


def _who_serves(registry) -> dict:
    """{"cpu g64": backend, ...} as comfy-kitchen's own dispatch answers for representative calls."""
    from ..kernels import ck_backend
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    out = {}
    for dev in devices:
        for g in (64, 256):
            try:
                name = registry.get_capable_backend("int8_linear", _probe_kwargs(dev, g))
            except Exception as exc:   # NoCapableBackendError and friends: say so, never fail the import
                name = f"none ({type(exc).__name__})"
            why = ""
            if name == ck_backend.NAME:
                why = ck_backend.cpu_ok()[1] if dev.type == "cpu" else "fused Triton rotate+quantize and GEMM"
            elif dev.type == "cuda":
                ok, reason = ck_backend.cuda_ok(dev)
                why = reason if not ok else ("comfy-kitchen's own kernel is kept at group 256"
                                             if g == 256 else "")
                if not ok and name == "hip":
                    why = f"{reason}; the pack's backend is not measured faster there, so it never shadows it"
            out[f"{dev.type} g{g}"] = {"backend": name, "why": why}
    return out


def _summary(serves: dict) -> str:
    """"cpu: int8_convrot (why); cuda g64: ...; cuda g256: ..." (group sizes merged where they agree)."""
    parts, by_dev = [], {}
    for k, v in serves.items():
        by_dev.setdefault(k.split()[0], []).append((k, v))
    for dev, items in by_dev.items():
        same = len({(v["backend"], v["why"]) for _, v in items}) == 1
        for k, v in (items[:1] if same else items):
            parts.append(f"{dev if same else k}: {v['backend']}" + (f" ({v['why']})" if v["why"] else ""))
    return "; ".join(parts)


def install(force: bool = False) -> dict:
    """Register the backend once (idempotent); logs what serves INT8 and why. Returns `state()`."""
    with _lock:
        if _state["reason"] != "not installed yet" and not force:
            return dict(_state)
        if _env_off():
            _state.update(registered=False, enabled=False, serves={},
                          reason=f"{ENV}=0: comfy-kitchen's own backends serve INT8 (the pack's backend is off)")
            log.info("INT8 ConvRot: %s", _state["reason"])
            return dict(_state)
        device = _compute_device()
        if device.type not in ("cpu", "cuda"):
            from ..kernels import backends
            _state.update(registered=False, enabled=False, serves={},
                          reason=f"ComfyUI computes on {device.type}, where the pack has no INT8 kernels, so its "
                                 "backend never registers: comfy-kitchen's own backends serve native INT8 "
                                 f"(the pack's loaders there: {backends.route(device).describe(device.type)})")
            log.info("INT8 ConvRot: comfy-kitchen backend not registered: %s", _state["reason"])
            return dict(_state)
        native, why = native_int8()
        ck, registry = _kitchen() if native else (None, why)
        if ck is None:
            _state.update(registered=False, enabled=False, serves={}, reason=registry)
            log.info("INT8 ConvRot: comfy-kitchen backend not registered: %s", registry)
            return dict(_state)
        from ..kernels import ck_backend
        try:
            registry.register(ck_backend.NAME, ck_backend, ck_backend.constraints())
            priority = [ck_backend.NAME] + [p for p in registry._priority if p != ck_backend.NAME]
            registry.set_priority(priority)
            registry.enable(ck_backend.NAME)
        except Exception as exc:   # an API that looked right but is not: stock behaviour, said once
            _state.update(registered=False, enabled=False, serves={},
                          reason=f"registering with comfy-kitchen {_version()} failed: {type(exc).__name__}: {exc}")
            log.warning("INT8 ConvRot: %s", _state["reason"])
            return dict(_state)
        serves = _who_serves(registry)
        _state.update(registered=True, enabled=True, serves=serves,
                      reason=f"registered with comfy-kitchen {_version()} ahead of {priority[1:]}; it takes only "
                             "the calls it serves faster (CPU: measured; NVIDIA sm_80/86/89/90 Triton, group <= 64: "
                             "by design; never a call on AMD/ROCm, which comfy-kitchen's HIP backend or its others "
                             "keep)")
        log.info("INT8 ConvRot: comfy-kitchen int8_linear served by %s, because the pack's backend is %s "
                 "(switch: %s=0 or the INT8 ConvRot setting)", _summary(serves), _state["reason"], ENV)
        return dict(_state)


def set_enabled(enabled: bool) -> dict:
    """Turn the registered backend on/off at runtime (comfy-kitchen's registry.enable/disable)."""
    with _lock:
        if not _state["registered"]:
            return dict(_state)
        from comfy_kitchen.registry import registry

        from ..kernels import ck_backend
        if enabled:
            registry.enable(ck_backend.NAME)
        else:
            registry.disable(ck_backend.NAME)
            ck_backend.PACKS.clear()   # the packed copies are ours alone: give the memory back
        serves = _who_serves(registry)
        changed = bool(enabled) != _state["enabled"]
        _state.update(enabled=bool(enabled), serves=serves)
        if changed:
            log.info("INT8 ConvRot: the pack's comfy-kitchen backend turned %s; int8_linear now served by %s",
                     "on" if enabled else "off", _summary(serves))
        return dict(_state)


def uninstall() -> None:
    """Take the backend out of comfy-kitchen's priority list (tests; stock dispatch afterwards)."""
    with _lock:
        if _state["registered"]:
            from comfy_kitchen.registry import registry

            from ..kernels import ck_backend
            registry.disable(ck_backend.NAME)
            registry.set_priority([p for p in registry._priority if p != ck_backend.NAME])
            ck_backend.PACKS.clear()
        _state.update(registered=False, enabled=False, serves={}, reason="not installed yet")


def state() -> dict:
    return dict(_state)


def badge_text(st: dict | None = None) -> str:
    """One line for the web badge: who serves INT8 for the stock loaders on this ComfyUI."""
    st = st or _state
    if not st["registered"]:
        return f"native INT8: comfy-kitchen's own backends ({st['reason']})"
    if not st["enabled"]:
        return "native INT8: comfy-kitchen's own backends (the pack's backend is switched off)"
    return "native INT8: " + _summary(st["serves"])


# -- HTTP route ---------------------------------------------------------------------------------------

def _payload() -> dict:
    st = state()
    return {**st, "env": ENV, "env_off": _env_off(), "badge": badge_text(st)}


async def handle_get(request):
    from aiohttp import web
    return web.json_response(_payload())


async def handle_post(request):
    from aiohttp import web
    try:
        body = await request.json()
    except Exception:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("enabled"), bool):
        return web.json_response({"error": 'send {"enabled": true|false}'}, status=400)
    if not _state["registered"]:
        return web.json_response({**_payload(), "error": "the backend is not registered: " + _state["reason"]},
                                 status=409)
    set_enabled(body["enabled"])
    return web.json_response(_payload())


def register_route(server=None) -> bool:
    """GET/POST /int8_convrot/backend on the running PromptServer (no-op without one)."""
    global _route_registered
    if server is None:
        module = sys.modules.get("server")
        server = getattr(getattr(module, "PromptServer", None), "instance", None)
    if server is None or _route_registered:
        return _route_registered
    server.routes.get(ROUTE)(handle_get)
    server.routes.post(ROUTE)(handle_post)
    _route_registered = True
    return True


__all__ = ["ENV", "ROUTE", "badge_text", "install", "register_route", "set_enabled", "state", "uninstall"]
