"""torch.compile (CPU inductor) on the engine's INT8 ConvRot Linear, without ComfyUI, so CI runs it: the
layer, its per-call mode/backend choice and the Triton custom ops (run by the interpreter here) trace as
one graph (fullgraph=True raises at any break) and match eager. The ComfyUI node test is
tests/nodes/test_torch_compile.py."""
from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # as the other kernel tests: decided when triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not importable")
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode,backend", [("w8a16", None), ("auto", None), ("w8a8", "cpu"), ("w8a8", "reference"),
                                          pytest.param("w8a8", "triton", marks=pytest.mark.triton_kernel)])
def test_int8_linear_compiles_as_one_graph(mode, backend):
    import torch._dynamo
    from comfyui_int8_convrot.engine.linear import Int8Linear
    from comfyui_int8_convrot.kernels import use_backend
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton ops run on CPU only under TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(0)
    layer = Int8Linear.from_float(torch.randn(96, 128, generator=gen), torch.randn(96, generator=gen), 64, mode)
    x = torch.randn(2, 24, 128, generator=gen)
    torch._dynamo.reset()
    with use_backend(backend) if backend else contextlib.nullcontext():
        eager = layer(x)
        compiled = torch.compile(layer, backend="inductor", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_cpu_gemm_compiles_and_keeps_the_layers_pack(monkeypatch):
    """The CPU W8A8 GEMM (auto on CPU) is the custom op int8_convrot::cpu_int8_gemm: one graph with the
    capability probe run at trace time, the layer's pack built once and shared by eager and compiled calls,
    and rebuilt when the weight is swapped (what Module.to() does)."""
    import torch._dynamo
    from comfyui_int8_convrot.engine.linear import Int8Linear
    from comfyui_int8_convrot.kernels import cpu_int8_gemm, cpu_prepack, select_gemm_backend
    if not cpu_int8_gemm.fast_backend_available():
        pytest.skip(f"no exact fast int8 kernel on this CPU: {cpu_int8_gemm.backend_report()}")
    packs = []
    real_pack = cpu_prepack.pack_int8_weight
    monkeypatch.setattr(cpu_prepack, "pack_int8_weight", lambda c, s: packs.append(1) or real_pack(c, s))
    cpu_int8_gemm._probe.cache_clear()      # dynamo must take the probe's answer as a constant, not trace it
    gen = torch.Generator().manual_seed(2)
    layer = Int8Linear.from_float(torch.randn(96, 128, generator=gen), torch.randn(96, generator=gen), 64, "auto")
    x = torch.randn(2, 24, 128, generator=gen)
    torch._dynamo.reset()
    assert select_gemm_backend(x.device) == "cpu"
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    first = compiled(x)
    torch.testing.assert_close(first, layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(x), first, rtol=0, atol=0)
    assert len(packs) == 1 and layer._cache.is_packed
    other = Int8Linear.from_float(torch.randn(96, 128, generator=gen), None, 64, "auto")
    layer.weight.data, layer.weight_scale.data = other.weight.data, other.weight_scale.data
    layer.bias = None
    torch.testing.assert_close(compiled(x), other(x), rtol=1e-5, atol=1e-5)
    assert len(packs) == 3    # the swapped weight, in the layer and in `other`


@pytest.mark.triton_kernel
def test_fused_lora_forward_compiles():
    """The LoRA-fused Triton ops (kernels/triton: rotate_quantize_down, int8_gemm_rescale_lora) under
    torch.compile, as ComfyUI's TorchCompileModel runs a patched layer: same result as eager."""
    import torch._dynamo
    from comfyui_int8_convrot.engine import linear as L
    from comfyui_int8_convrot.kernels import quantize_weight, use_backend
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton ops run on CPU only under TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(1)
    codes, scale = quantize_weight(torch.randn(96, 128, generator=gen), 64)
    terms = L.LowRankSet((L.LowRankTerm(torch.randn(8, 128, generator=gen) * 0.1,
                                        torch.randn(96, 8, generator=gen) * 0.1, 0.5),))
    x = torch.randn(2, 24, 128, generator=gen)

    def f(x):
        return L.int8_forward(x, codes, scale, None, 64, "w8a8", None, terms)

    torch._dynamo.reset()
    with use_backend("triton"):
        assert L.fuses_lowrank_triton(x, 64, terms, "w8a8")
        eager = f(x)
        compiled = torch.compile(f, backend="inductor", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
