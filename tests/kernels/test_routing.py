"""Who computes INT8 on a device (kernels/routing.py, kernels/backends.route), by simulation: no GPU here, so
torch.version.hip, torch.cuda's answers and the device type are monkeypatched, and comfy-kitchen's real HIP
constraints are registered in its real registry as its HIP backend registers on that GPU."""
from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch

import device_sim
from comfyui_int8_convrot import kernels
from comfyui_int8_convrot.engine.linear import LowRankTerm, int8_forward
from comfyui_int8_convrot.kernels import backends, ck_hip, routing

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_routes():
    backends.route.cache_clear()
    yield
    backends.route.cache_clear()


@pytest.fixture
def kitchen():
    ck = pytest.importorskip("comfy_kitchen")
    if not hasattr(ck, "int8_linear"):
        pytest.skip("this comfy-kitchen has no int8_linear")
    pytest.importorskip("comfy_kitchen.backends.hip", reason="this comfy-kitchen has no HIP backend")
    from comfy_kitchen.registry import registry
    sim = device_sim.KitchenHip(registry)
    yield sim
    sim.restore()


CUDA0 = torch.device("cuda", 0)

NVIDIA = [((7, 5), "int_mm", "no int8 MMA below sm_80"), ((8, 0), "triton", "compiled and checked"),
          ((8, 6), "triton", "compiled and checked"), ((8, 9), "triton", "compiled and checked"),
          ((9, 0), "triton", "compiled and checked"), ((10, 0), "int_mm", "checked for sm_80/86/89/90 only"),
          ((12, 0), "int_mm", "checked for sm_80/86/89/90 only"), ((7, 0), None, "needs sm_75+")]


@pytest.mark.parametrize("cap,w8a8,why", NVIDIA, ids=[f"sm_{a}{b}" for (a, b), *_ in NVIDIA])
def test_nvidia(monkeypatch, cap, w8a8, why):
    device_sim.gpu(monkeypatch, cap)
    r = backends.route(CUDA0)
    assert r.w8a8 == w8a8 and why in r.why
    assert backends.select_gemm_backend(CUDA0) == (w8a8 or "reference")


def test_nvidia_without_triton_uses_int_mm(monkeypatch):
    device_sim.gpu(monkeypatch, (8, 6), triton_ok=False)
    r = backends.route(CUDA0)
    assert r.w8a8 == "int_mm" and "no triton" in r.why


@pytest.mark.parametrize("cap,wmma,int_mm_ok,w8a8,fallback", [
    ((11, 0), True, True, "ck_hip", "int_mm"),     # RDNA3: comfy-kitchen's HIP WMMA int8_linear
    ((12, 0), True, False, "ck_hip", None),        # RDNA4 (same capability as NVIDIA sm_120): HIP, not Triton
    ((10, 3), False, True, "int_mm", None),        # RDNA2: HIP registers elementwise only (no int8_linear)
    ((10, 3), False, False, None, None),
])
def test_rocm_with_kitchen_hip(monkeypatch, kitchen, cap, wmma, int_mm_ok, w8a8, fallback):
    device_sim.gpu(monkeypatch, cap, rocm=True)
    device_sim.int_mm(monkeypatch, int_mm_ok)
    kitchen.register(wmma=wmma)
    r = backends.route(CUDA0)
    assert (r.w8a8, r.fallback) == (w8a8, fallback)
    assert "compiled and checked for NVIDIA" in r.why
    if not wmma:
        assert "no int8_linear" in r.why


@pytest.mark.parametrize("int_mm_ok,w8a8", [(True, "int_mm"), (False, None)])
def test_rocm_mi300_has_no_kitchen_hip(monkeypatch, kitchen, int_mm_ok, w8a8):
    """gfx942 is outside comfy-kitchen's HIP manifest: its registry says so, and torch._int_mm is next."""
    device_sim.gpu(monkeypatch, (9, 4), rocm=True)   # (9, 4) is not NVIDIA Hopper's (9, 0): never Triton
    device_sim.int_mm(monkeypatch, int_mm_ok)
    kitchen.unavailable("architecture is not in the validated target manifest: gfx942")
    r = backends.route(CUDA0)
    assert r.w8a8 == w8a8 and "gfx942" in r.why and "NVIDIA sm_80/86/89/90 only" in r.why


def test_rocm_never_triton_even_at_a_checked_capability(monkeypatch):
    """A gfx version that collides with a checked NVIDIA capability still never runs our Triton configs."""
    device_sim.gpu(monkeypatch, (9, 0), rocm=True)
    device_sim.int_mm(monkeypatch, True)
    monkeypatch.setattr(ck_hip, "int8_linear_status", lambda: (False, "stub: no HIP backend"))
    assert backends.route(CUDA0).w8a8 == "int_mm"


@pytest.mark.parametrize("dev,why", [("mps", "undocumented"), ("xpu", "not measured faster"),
                                     ("privateuseone", "DirectML"), ("hpu", "no int8 GEMM is known")])
def test_other_devices_run_w8a16_and_say_why_once(dev, why, caplog):
    with caplog.at_level(logging.INFO, logger=backends.__name__):
        r = backends.route(torch.device(dev))
        backends.route(torch.device(dev))
    assert r.w8a8 is None and why in r.why
    lines = [rec.getMessage() for rec in caplog.records if "W8A8 is not used because" in rec.getMessage()]
    assert len(lines) == 1 and dev in lines[0] and "W8A16" in lines[0]
    x = types.SimpleNamespace(device=torch.device(dev))   # resolve_mode reads only the device
    for mode in ("auto", "w8a8", "w8a16"):
        assert kernels.resolve_mode(mode, x, 64) == "w8a16"


def test_cpu_route_is_unchanged():
    assert backends.route(torch.device("cpu")).w8a8 == "cpu"
    assert backends.select_gemm_backend(torch.device("cpu")) == "cpu"


def test_checked_capabilities_are_compiled_by_aot_check():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import aot_check
    finally:
        sys.path.pop(0)
    compiled = {(t // 10, t % 10) for t in aot_check.TARGETS}
    assert set(routing.TRITON_CHECKED) <= compiled, "Triton routed to a capability aot_check.py does not compile"


# -- the HIP call and its fallbacks, run on CPU tensors through comfy-kitchen's real registry ---------------

def _layer(k=256, n=96, group=64):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    codes, scale = kernels.quantize_weight(w, group)
    x = torch.randn(40, k, generator=gen)
    return x, codes, scale


def _exact(x, codes, scale, group):
    deq = kernels.dequantize_weight(codes, scale, group, torch.float64)
    return x.double() @ deq.t()


def rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def test_hip_route_runs_kitchen_hip_int8_linear(kitchen):
    kitchen.register(devices={"cpu"})
    x, codes, scale = _layer()
    with backends.use_backend("ck_hip"):
        y = kernels.int8_linear(x, codes, scale, None, 64, "w8a8")
    assert kitchen.calls == 1, "comfy-kitchen's HIP int8_linear did not run"
    assert rel(y, _exact(x, codes, scale, 64)) < 0.02


@pytest.mark.parametrize("k,group", [(256, 4), (200, None)])   # group it does not rotate; K % 16 != 0
def test_hip_declined_call_runs_the_fallback(kitchen, k, group):
    kitchen.register(devices={"cpu"})
    x, codes, scale = _layer(k=k, group=group)
    assert ck_hip.int8_linear(x, codes, scale, None, group, torch.float32) is None
    with backends.use_backend("ck_hip"):
        y = kernels.int8_linear(x, codes, scale, None, group, "w8a8")
    assert kitchen.calls == 0
    # route(cpu) has no fallback: W8A16, the same output as asked for directly
    torch.testing.assert_close(y, kernels.int8_linear(x, codes, scale, None, group, "w8a16"))


def test_lora_stays_exact_on_the_hip_route(kitchen):
    kitchen.register(devices={"cpu"})
    x, codes, scale = _layer()
    gen = torch.Generator().manual_seed(3)
    term = LowRankTerm(torch.randn(8, 256, generator=gen), torch.randn(96, 8, generator=gen), 0.5)
    with backends.use_backend("ck_hip"):
        plain = int8_forward(x, codes, scale, None, 64, "w8a8")
        with_lora = int8_forward(x, codes, scale, None, 64, "w8a8", lowrank=(term,))
    assert kitchen.calls == 2
    torch.testing.assert_close(with_lora - plain, (x @ term.delta(96).t()), rtol=1e-4, atol=1e-4)


def test_kitchen_hip_status_reads_the_registry(kitchen):
    kitchen.unavailable("architecture is not in the validated target manifest: gfx942")
    ok, why = ck_hip.int8_linear_status()
    assert not ok and "gfx942" in why
    kitchen.register(wmma=False)
    ok, why = ck_hip.int8_linear_status()
    assert not ok and "no WMMA" in why
    kitchen.register(wmma=True)
    assert ck_hip.int8_linear_status() == (True, "")
