"""kernels/ck_backend.py against comfy-kitchen's own eager backend, on the same inputs (no ComfyUI needed).

Tolerance: comfy-kitchen compares int8_linear paths with the relative Frobenius error of the outputs,
rel < 0.05 (its tests/test_int8_input_act.py: two int8 paths differ by single-LSB activation codes,
which an elementwise tolerance cannot express). We check that, and a stricter property: our output is
no farther from the exact float64 product than eager's (x 1.05), so nothing gets less exact.
"""
from __future__ import annotations

import types

import pytest
import torch

ck = pytest.importorskip("comfy_kitchen")
if not hasattr(ck, "int8_linear"):
    pytest.skip(f"comfy-kitchen {getattr(ck, '__version__', '')} has no int8_linear", allow_module_level=True)

from comfy_kitchen.backends.eager import quantization as eager  # noqa: E402
from comfy_kitchen.exceptions import NoCapableBackendError  # noqa: E402
from comfy_kitchen.registry import registry  # noqa: E402

from comfyui_int8_convrot.kernels import ck_backend, quantize_weight  # noqa: E402
from comfyui_int8_convrot.kernels.hadamard import hadamard  # noqa: E402
from comfyui_int8_convrot.kernels.rotation import rotate_matmul  # noqa: E402

ACTS, ACT_TAKES_WEIGHT = ck_backend.input_act_support()
CK_TOL = 0.05


def rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def exact(x, w_deq, bias, act, act_w, eps):
    """float64 reference for the stored (dequantized) weight: act(x) · Wᵀ + b."""
    xd = x.double()
    if act == "gelu_tanh":
        xd = torch.nn.functional.gelu(xd, approximate="tanh")
    elif act == "swiglu":
        g, u = xd.chunk(2, -1)
        xd = torch.nn.functional.silu(g) * u
    elif act == "situ":
        h, g = xd.chunk(2, -1)
        xd = 25 * torch.tanh(h / 25) * 4 * torch.tanh(g / 4) * torch.sigmoid(g)
    elif act == "rms_norm":
        xd = torch.nn.functional.rms_norm(xd, (xd.shape[-1],), act_w.double(), eps)
    y = xd @ w_deq.double().T
    return y if bias is None else y + bias.double()


def make(n=96, k=256, group=64, per_row=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[:, 3] *= 8   # an outlier input channel, what the rotation is for
    codes, scale = quantize_weight(w, group)
    if not per_row:
        codes, scale = quantize_weight(w, group, scaling="tensor")
    deq = codes.double() * scale.double().reshape(-1, 1) if scale.numel() > 1 else codes.double() * scale.double()
    if group:
        deq = rotate_matmul(deq, group, torch.float64)
    return codes, scale, deq


CASES = [
    # (dtype, group, input_act, bias, per_row, tokens)
    *[(dt, 64, act, bias, True, 40) for dt in (torch.float32, torch.float16, torch.bfloat16)
      for act in sorted(ACTS - {"none"}, key=str) + ["none"] if act not in ("swiglu", "situ", "rms_norm")
      for bias in (False, True)],
    *[(torch.float32, g, None, True, True, 40) for g in (None, 4, 16, 256)],
    (torch.float32, 64, None, False, False, 40),        # tensor-wise scale
    (torch.bfloat16, 64, None, True, True, 1),           # one token (a text encoder's decode step)
    *[(dt, 64, act, True, True, 40) for dt in (torch.float32, torch.bfloat16)
      for act in ("swiglu", "situ", "rms_norm") if act in ACTS],
]


@pytest.mark.parametrize("dtype,group,act,bias,per_row,tokens", CASES)
def test_int8_linear_matches_eager(dtype, group, act, bias, per_row, tokens):
    k_w = 256
    k_x = 2 * k_w if act in ("swiglu", "situ") else k_w
    codes, scale, deq = make(k=k_w, group=group or 0, per_row=per_row)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, tokens, k_x, generator=gen) * 1.5).to(dtype)
    b = (torch.randn(codes.shape[0], generator=gen) * 0.1).to(dtype) if bias else None
    kwargs = dict(out_dtype=dtype, convrot=group is not None, convrot_groupsize=group or 256, input_act=act)
    if act == "rms_norm":
        kwargs.update(input_act_weight=torch.rand(k_x, generator=gen).to(dtype) + 0.5, input_act_eps=1e-5)
    assert ck_backend.int8_linear_rule(dict(x=x, weight=codes, weight_scale=scale, bias=b, **kwargs)) is None
    ref_eager = eager.int8_linear(x, codes, scale, b, **kwargs)
    ours = ck_backend.int8_linear(x, codes, scale, b, **kwargs)
    assert ours.shape == ref_eager.shape and ours.dtype == ref_eager.dtype == dtype
    assert rel_err(ours, ref_eager) < CK_TOL
    truth = exact(x, deq, b, act, kwargs.get("input_act_weight"), kwargs.get("input_act_eps", 0.0))
    assert rel_err(ours, truth) <= 1.05 * rel_err(ref_eager, truth) + 1e-6


@pytest.mark.skipif("apply_residual" not in dir(getattr(__import__("comfy_kitchen.backends", fromlist=["x"]),
                                                          "_activations", None) or object()),
                    reason="this comfy-kitchen's int8_linear has no residual form")
def test_int8_linear_residual_matches_eager():
    codes, scale, _ = make()
    x = torch.randn(40, 256)
    res, rs = torch.randn(40, codes.shape[0]), torch.rand(codes.shape[0])
    kwargs = dict(out_dtype=torch.float32, convrot=True, convrot_groupsize=64, residual=res, residual_scale=rs)
    assert rel_err(ck_backend.int8_linear(x, codes, scale, None, **kwargs),
                   eager.int8_linear(x, codes, scale, None, **kwargs)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_and_rotate_matches_eager(dtype):
    x = (torch.randn(37, 512) * 3).to(dtype)
    h = hadamard(64, "cpu", torch.float32)
    q, s = ck_backend.quantize_and_rotate_rowwise(x, h, 64)
    qe, se = eager.quantize_and_rotate_rowwise(x, h.to(dtype), 64)
    assert q.dtype == torch.int8 and q.shape == qe.shape and s.shape == se.shape
    # float32 rotation vs comfy-kitchen's in x's dtype: codes agree to one step at most
    assert (q.int() - qe.int()).abs().max() <= (0 if dtype == torch.float32 else 3)
    assert torch.allclose(s, se.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)


# -- constraints: what falls through ------------------------------------------------------------------

@pytest.fixture
def registered():
    """The backend in the real (process-wide) registry, ahead of the others, and taken out afterwards."""
    before = list(registry._priority)
    registry.register(ck_backend.NAME, ck_backend, ck_backend.constraints())
    registry.enable(ck_backend.NAME)
    registry.set_priority([ck_backend.NAME] + [p for p in before if p != ck_backend.NAME])
    try:
        yield registry
    finally:
        registry.disable(ck_backend.NAME)
        registry.set_priority(before)
        ck_backend.PACKS.clear()


def served_by(reg, func, kwargs):
    try:
        return reg.get_capable_backend(func, kwargs)
    except NoCapableBackendError:   # nobody takes it: comfy-kitchen raises its own error, as without us
        return None


def linear_kwargs(**over):
    codes, scale, _ = make()
    kw = dict(x=torch.randn(8, 256), weight=codes, weight_scale=scale, bias=None, out_dtype=torch.float32,
              convrot=True, convrot_groupsize=64, input_act=None)
    kw.update(over)
    return kw


def test_cpu_calls_are_ours(registered):
    assert registered.get_capable_backend("int8_linear", linear_kwargs()) == ck_backend.NAME
    assert registered.get_capable_backend("int8_linear", linear_kwargs(convrot=False)) == ck_backend.NAME
    kw = linear_kwargs()
    y = ck.int8_linear(**kw)
    assert y.shape == (8, 96) and len(ck_backend.PACKS) == 1   # served by us: the weight's pack is cached


@pytest.mark.parametrize("over", [
    dict(convrot_groupsize=48),                                  # not a power of 4
    dict(convrot_groupsize=1024),                                # does not divide K=256
    dict(x=torch.randn(8, 128)),                                 # inner dimensions differ: eager raises
    dict(x=torch.randint(0, 3, (8, 256))),                       # not a float activation
    dict(out_dtype=torch.float8_e4m3fn),
    dict(input_act="silu"),                                      # unknown: eager raises its error
    dict(x=torch.randn(8, 256, device="meta")),                  # a device we do not serve
    dict(future_feature=torch.ones(1)),                          # a newer comfy-kitchen's keyword
    dict(bias=torch.zeros(5)),
])
def test_unsupported_calls_fall_through(registered, over):
    kw = linear_kwargs(**over)
    assert served_by(registered, "int8_linear", kw) != ck_backend.NAME
    assert ck_backend.int8_linear_rule(kw) is not None


def test_quantize_and_rotate_falls_through(registered):
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    h = hadamard(64, "cpu", torch.float32)
    assert registered.get_capable_backend("quantize_and_rotate_rowwise",
                                          {"x": x, "h": h, "group_size": 64}) == ck_backend.NAME
    for kw in ({"x": x.float(), "h": h, "group_size": 64},        # float32 on CPU: not measured faster
               {"x": x, "h": h, "group_size": 64, "stochastic_rounding": 7},
               {"x": x, "h": torch.eye(64), "group_size": 64},
               {"x": x, "h": h, "group_size": 48}):
        assert registered.get_capable_backend("quantize_and_rotate_rowwise", kw) != ck_backend.NAME


def test_disabled_backend_restores_stock(registered):
    registered.disable(ck_backend.NAME)
    assert registered.get_capable_backend("int8_linear", linear_kwargs()) == "eager"
    registered.enable(ck_backend.NAME)
    assert registered.get_capable_backend("int8_linear", linear_kwargs()) == ck_backend.NAME


@pytest.mark.parametrize("rocm,cap,triton_ok,group,ours", [
    (False, (8, 6), True, 64, True), (False, (8, 6), True, 16, True), (False, (8, 6), True, 256, False),
    (False, (7, 5), True, 64, False), (False, (8, 6), False, 64, False), (False, (12, 0), True, 64, False),
    (True, (11, 0), True, 64, False), (True, (9, 4), True, 16, False), (True, (12, 0), True, 64, False),
])
def test_gpu_rule(monkeypatch, rocm, cap, triton_ok, group, ours):
    """GPU calls: ours only where the routing runs our Triton (NVIDIA sm_80/86/89/90) and group <= 64; never on
    ROCm, whose calls stay with comfy-kitchen's HIP backend or its others (simulated GPUs: device_sim)."""
    import device_sim
    device_sim.gpu(monkeypatch, cap, rocm=rocm, triton_ok=triton_ok)
    device_sim.int_mm(monkeypatch, True)
    monkeypatch.setattr(ck_backend.backends, "triton_status", lambda: (triton_ok, "stub"))
    x = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert (ck_backend._device_rule(x, group, linear=True) is None) == ours
    ck_backend.backends.route.cache_clear()


# -- the CPU prepack cache ---------------------------------------------------------------------------

def test_pack_cache_hits_and_notices_changes():
    cache = ck_backend.PackCache()
    with torch.inference_mode():
        codes, scale, _ = make()
        codes, scale = codes.clone(), scale.clone()
        p1 = cache.get(codes, scale)
        assert cache.get(codes, scale) is p1
        assert cache.get(codes, scale.clone()) is p1          # same values, another scale tensor
        codes[0, :8] = -codes[0, :8] + 1                        # in place, no version counter here
        p2 = cache.get(codes, scale)
        assert p2 is not p1
        assert cache.get(codes, scale * 2) is not p2           # other scales: another pack
    plain, s2, _ = make(seed=3)
    p3 = cache.get(plain, s2)
    plain.add_(0)                                                # bumps the version counter
    assert cache.get(plain, s2) is not p3


def test_pack_cache_keeps_nothing_alive():
    cache = ck_backend.PackCache()
    codes, scale, _ = make()
    cache.get(codes, scale)
    assert len(cache) == 1
    del codes
    assert len(cache) == 0
