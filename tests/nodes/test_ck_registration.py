"""The comfy-kitchen backend registration inside the real ComfyUI (in-process, CPU).

On a ComfyUI with native INT8 (0.29: comfy-kitchen has int8_linear) the stock loader
(comfy.sd.load_diffusion_model) on an INT8 ConvRot file made by our converter must give the same
output with and without the pack's backend, within comfy-kitchen's tolerance for two int8 paths
(relative error < 0.05), and be no farther from the float model the file encodes than stock is
(x 1.05). The switch (environment, runtime) must restore stock dispatch. On a ComfyUI without native
INT8 (0.8.0) the registration is a logged no-op.
"""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch

import comfy_env

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfyui_inference_mode")]
TOKENS = 8


def native_int8() -> bool:
    """ComfyUI itself loads INT8 ConvRot (0.29+) and its comfy-kitchen has int8_linear (read from the tree:
    comfy.* is imported only by the `comfy` fixture)."""
    path = comfy_env.comfyui_path()
    if path is None or "int8_tensorwise" not in (path / "comfy" / "quant_ops.py").read_text():
        return False
    try:
        import comfy_kitchen as ck
    except Exception:
        return False
    return hasattr(ck, "int8_linear")


needs_native = pytest.mark.skipif(not native_int8(), reason="this ComfyUI has no native INT8 ConvRot")


def rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def reg(comfy):
    from comfyui_int8_convrot.nodes import ck_registration   # importing the nodes package installs it
    yield ck_registration
    ck_registration.uninstall()
    ck_registration.install()


@pytest.fixture
def reinstall(reg, monkeypatch):
    """Run install() afresh (log, env) and leave the default registration behind."""
    def again():
        reg.uninstall()
        return reg.install()
    yield again
    monkeypatch.delenv(reg.ENV, raising=False)
    reg.uninstall()
    reg.install()


@pytest.fixture(scope="module")
def zfiles(comfy, tmp_path_factory):
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY, iter_zimage
    d = tmp_path_factory.mktemp("ck_zimage")
    q, meta = comfy_env.int8_state_dict(dict(iter_zimage(ZIMAGE_TINY)), "zimage", 64)
    return {"int8": comfy_env.save_state_dict(d / "int8.safetensors", q, meta),
            "deq": comfy_env.save_state_dict(d / "deq.safetensors", comfy_env.dequantized_state_dict(q))}


def forward(patcher):
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    gen = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 16, 32, 32, generator=gen), torch.tensor([0.6]), torch.randn(1, TOKENS, 256, generator=gen)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, t, ctx, TOKENS)


@needs_native
def test_registered_and_logged(reinstall, caplog):
    from comfy_kitchen.registry import registry
    with caplog.at_level(logging.INFO):
        st = reinstall()
    assert st["registered"] and st["enabled"]
    assert st["serves"]["cpu g64"]["backend"] == "int8_convrot"
    assert registry._priority[0] == "int8_convrot"
    lines = [r.getMessage() for r in caplog.records if "comfy-kitchen int8_linear served by" in r.getMessage()]
    assert len(lines) == 1 and "int8_convrot" in lines[0] and "because" in lines[0]
    with caplog.at_level(logging.INFO):
        caplog.clear()
        from comfyui_int8_convrot.nodes import ck_registration
        ck_registration.install()   # again: idempotent, silent
    assert not [r for r in caplog.records if "served by" in r.getMessage()]


@needs_native
def test_stock_loader_same_output_with_and_without(reg, zfiles):
    import comfy.sd
    from comfyui_int8_convrot.kernels import ck_backend
    deq = forward(comfy.sd.load_diffusion_model(str(zfiles["deq"])))
    patcher = comfy.sd.load_diffusion_model(str(zfiles["int8"]))
    try:
        reg.set_enabled(False)
        stock = forward(patcher)
        assert len(ck_backend.PACKS) == 0
        reg.set_enabled(True)
        ours = forward(patcher)
        assert len(ck_backend.PACKS) > 0          # the forward went through our backend
    finally:
        reg.set_enabled(True)
    assert ours.shape == stock.shape
    assert rel_err(ours, stock) < 0.05
    assert rel_err(ours, deq) <= 1.05 * rel_err(stock, deq) + 1e-6


def tiny_lora(seed=4, rank=8) -> dict:
    """A LoRA on every refiner Linear of ZIMAGE_TINY, strong enough to move the output well past 0.05."""
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY as s
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for blk in ("noise_refiner.0", "noise_refiner.1", "context_refiner.0", "context_refiner.1"):
        for name, out_f, in_f in (("attention.qkv", 3 * s.dim, s.dim), ("attention.out", s.dim, s.dim),
                                  ("feed_forward.w1", s.ffn, s.dim), ("feed_forward.w2", s.dim, s.ffn)):
            p = f"diffusion_model.{blk}.{name}"
            sd[f"{p}.lora_up.weight"] = 0.3 * torch.randn(out_f, rank, generator=gen)
            sd[f"{p}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
    return sd


@needs_native
def test_stock_loader_lora_and_no_stale_packs(reg, zfiles):
    """ComfyUI merges a LoRA into INT8 weights by requantizing them (maybe in place, under inference_mode
    where tensors have no version counter) and restores them afterwards: our cached packs must follow."""
    import comfy.model_management as mm
    import comfy.sd
    patcher = comfy.sd.load_diffusion_model(str(zfiles["int8"]))
    try:
        base = forward(patcher)                                   # packs built for the plain weights
        lora, _ = comfy.sd.load_lora_for_models(patcher, None, tiny_lora(), 1.0, 0)
        ours = forward(lora)
        reg.set_enabled(False)
        stock = forward(lora)
        reg.set_enabled(True)
        assert rel_err(ours, base) > 0.1                          # the LoRA is really applied
        assert rel_err(ours, stock) < 0.05
        mm.unload_all_models()
        again = forward(patcher)                                  # the LoRA taken off again
        assert rel_err(again, base) < 1e-6
    finally:
        reg.set_enabled(True)
        mm.unload_all_models()


@needs_native
def test_env_switch_restores_stock(reinstall, monkeypatch, caplog):
    from comfy_kitchen.registry import registry
    monkeypatch.setenv("INT8_CONVROT_CK_BACKEND", "0")
    with caplog.at_level(logging.INFO):
        st = reinstall()
    assert not st["registered"] and "INT8_CONVROT_CK_BACKEND=0" in st["reason"]
    assert "int8_convrot" not in registry._priority
    assert any("INT8_CONVROT_CK_BACKEND=0" in r.getMessage() for r in caplog.records)
    kw = {"x": torch.randn(4, 256), "weight": torch.zeros(8, 256, dtype=torch.int8),
          "weight_scale": torch.ones(8, 1), "convrot": True, "convrot_groupsize": 64}
    assert registry.get_capable_backend("int8_linear", kw) == "eager"


@needs_native
def test_route_switches_at_runtime(reg):
    from comfy_kitchen.registry import registry

    class Req:
        def __init__(self, body):
            self.body = body

        async def json(self):
            if self.body is None:
                raise ValueError("no body")
            return self.body

    kw = {"x": torch.randn(4, 256), "weight": torch.zeros(8, 256, dtype=torch.int8),
          "weight_scale": torch.ones(8, 1), "convrot": True, "convrot_groupsize": 64}
    try:
        r = asyncio.run(reg.handle_post(Req({"enabled": False})))
        body = json.loads(r.text)
        assert r.status == 200 and body["enabled"] is False and "switched off" in body["badge"]
        assert registry.get_capable_backend("int8_linear", kw) == "eager"
        assert asyncio.run(reg.handle_post(Req({"enabled": "no"}))).status == 400
        assert asyncio.run(reg.handle_post(Req(None))).status == 400
        r = asyncio.run(reg.handle_post(Req({"enabled": True})))
        assert json.loads(r.text)["enabled"] is True
        assert registry.get_capable_backend("int8_linear", kw) == "int8_convrot"
        got = json.loads(asyncio.run(reg.handle_get(None)).text)
        assert got["registered"] and "int8_convrot" in got["badge"] and got["env"] == "INT8_CONVROT_CK_BACKEND"
    finally:
        reg.set_enabled(True)


@pytest.mark.skipif(native_int8(), reason="this ComfyUI has native INT8 (the no-op is for one without)")
def test_no_native_int8_is_a_logged_noop(reinstall, caplog):
    with caplog.at_level(logging.INFO):
        st = reinstall()
    assert not st["registered"]
    assert any("comfy-kitchen backend not registered" in r.getMessage() and "no native INT8" in r.getMessage()
               for r in caplog.records)
    from comfyui_int8_convrot.nodes import ck_registration
    assert "comfy-kitchen's own backends" in ck_registration.badge_text()


# -- devices the pack's backend does not serve (simulated: no such GPU here) ----------------------------

@pytest.mark.parametrize("dev", ["mps", "xpu", "privateuseone"])
def test_never_registers_on_mps_xpu_directml(reinstall, monkeypatch, caplog, dev):
    import comfy.model_management as mm
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device(dev))
    with caplog.at_level(logging.INFO):
        st = reinstall()
    assert not st["registered"] and f"computes on {dev}" in st["reason"] and "W8A16" in st["reason"]
    assert any("not registered" in r.getMessage() and dev in r.getMessage() for r in caplog.records)
    from comfyui_int8_convrot.nodes import ck_registration
    assert "comfy-kitchen's own backends" in ck_registration.badge_text()
    try:
        from comfy_kitchen.registry import registry
    except Exception:
        return
    assert "int8_convrot" not in registry._priority


def _fake_probe(real):
    from torch._subclasses.fake_tensor import FakeTensorMode

    def probe(device, group):
        if device.type == "cpu":
            return real(device, group)
        with FakeTensorMode(allow_non_fake_inputs=True):   # a tensor "on the GPU" without one
            return real(device, group)
    return probe


@needs_native
@pytest.mark.parametrize("cap,wmma,gpu_backend", [((11, 0), True, "hip"), ((12, 0), True, "hip"),
                                                  ((9, 4), None, None)])
def test_rocm_gpu_calls_stay_with_kitchen(reinstall, reg, monkeypatch, caplog, cap, wmma, gpu_backend):
    """Simulated ROCm GPU, comfy-kitchen's real registry with its real HIP constraints (RDNA3/RDNA4) or the
    manifest refusal (MI300): the pack's backend registers for the CPU calls only; every GPU call goes where
    comfy-kitchen sends it without the pack, and the log and badge say so."""
    pytest.importorskip("comfy_kitchen.backends.hip", reason="this comfy-kitchen has no HIP backend")
    import device_sim
    from comfy_kitchen.registry import registry
    from comfyui_int8_convrot.kernels import ck_backend
    import comfy.model_management as mm
    device_sim.gpu(monkeypatch, cap, rocm=True)
    device_sim.int_mm(monkeypatch, True)
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(reg, "_probe_kwargs", _fake_probe(reg._probe_kwargs))
    sim = device_sim.KitchenHip(registry)
    try:
        if wmma is None:
            sim.unavailable("architecture is not in the validated target manifest: gfx942")
        else:
            sim.register(wmma=wmma)
        without = {g: registry.get_capable_backend("int8_linear", reg._probe_kwargs(torch.device("cuda", 0), g))
                   for g in (64, 256)}
        with caplog.at_level(logging.INFO):
            st = reinstall()
        assert st["registered"] and registry._priority[0] == ck_backend.NAME
        assert st["serves"]["cpu g64"]["backend"] == ck_backend.NAME
        for g in (64, 256):
            got = st["serves"][f"cuda g{g}"]
            assert got["backend"] == without[g] != ck_backend.NAME
            assert "compiled and checked for NVIDIA" in got["why"]
            if gpu_backend:
                assert got["backend"] == gpu_backend and "never shadows" in got["why"]
        line = next(r.getMessage() for r in caplog.records if "served by" in r.getMessage())
        assert "never a call on AMD/ROCm" in line and f"cuda: {without[64]}" in line
        assert f"cuda: {without[64]}" in reg.badge_text()
    finally:
        sim.restore()
