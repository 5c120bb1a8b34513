"""A Triton kernel that fails to compile or launch falls back to torch with one warning naming the cause
(kernels/triton/fallback.py). The failure is injected: the kernel wrappers are replaced by ones that raise
the way ptxas / a launch does, so this runs on any machine, GPU or not."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # as test_triton_kernels.py: Triton decides at @triton.jit time

import logging  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not importable")

from comfyui_int8_convrot.kernels import int8_linear, quantize_weight, use_backend  # noqa: E402
from comfyui_int8_convrot.kernels.triton import fallback  # noqa: E402


@pytest.fixture
def broken_kernels(monkeypatch):
    """Both kernels raise like a failed compile; counts how often each was tried."""
    from comfyui_int8_convrot.kernels.triton import int8_gemm, rotate_quant
    tries = {"gemm": 0, "rotate": 0}

    def gemm(*a, **k):
        tries["gemm"] += 1
        raise RuntimeError("PTX .version 8.7 does not support .target sm_86\nptxas fatal: injected")

    def rotate(*a, **k):
        tries["rotate"] += 1
        raise RuntimeError("Triton Error [CUDA]: injected launch failure")

    monkeypatch.setattr(int8_gemm, "int8_gemm_rescale_triton", gemm)
    monkeypatch.setattr(rotate_quant, "rotate_quantize_triton", rotate)
    monkeypatch.delenv(fallback.ENV, raising=False)
    fallback.reset()
    yield tries
    fallback.reset()


def _layer(gen, n=48, k=128, g=64):
    codes, scale = quantize_weight(torch.randn(n, k, generator=gen), g)
    return codes, scale, torch.randn(n, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_failed_kernels_fall_back_with_one_warning_and_the_reference_result(broken_kernels, caplog, dtype):
    gen = torch.Generator().manual_seed(0)
    codes, scale, bias = _layer(gen)
    x = torch.randn(3, 20, 128, generator=gen).to(dtype)
    with use_backend("reference"):
        want = int8_linear(x, codes, scale, bias, group_size=64, mode="w8a8")
    with caplog.at_level(logging.WARNING, logger=fallback.log.name), use_backend("triton"):
        got = [int8_linear(x, codes, scale, bias, group_size=64, mode="w8a8") for _ in range(3)]
    for y in got:  # the fallback is the torch rotation + quantization and the torch epilogue: same bits
        assert torch.equal(y, want)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one per op and cause, not one per call
    assert any("int8_gemm" in w and "ptxas" not in w and "PTX .version 8.7" in w for w in warnings)
    assert any("rotate_quantize" in w and "injected launch failure" in w for w in warnings)
    assert broken_kernels == {"gemm": 1, "rotate": 1}  # a failed shape is not retried
    assert len(fallback.failures()) == 2


def test_small_m_gemm_falls_back_too(broken_kernels):
    gen = torch.Generator().manual_seed(1)
    codes, scale, bias = _layer(gen, n=24, k=64, g=16)
    x = torch.randn(5, 64, generator=gen)
    with use_backend("reference"):
        want = int8_linear(x, codes, scale, bias, group_size=16, mode="w8a8")
    with use_backend("triton"):
        assert torch.equal(int8_linear(x, codes, scale, bias, group_size=16, mode="w8a8"), want)


def test_switch_off_raises_the_kernel_error(broken_kernels, monkeypatch):
    monkeypatch.setenv(fallback.ENV, "0")
    gen = torch.Generator().manual_seed(2)
    codes, scale, bias = _layer(gen)
    with use_backend("triton"), pytest.raises(RuntimeError, match="injected launch failure"):
        int8_linear(torch.randn(20, 128, generator=gen), codes, scale, bias, group_size=64, mode="w8a8")


def test_input_errors_are_not_swallowed(broken_kernels):
    from comfyui_int8_convrot.kernels.triton import int8_gemm_rescale
    with pytest.raises(ValueError):  # the wrapper's own checks, before any kernel
        fallback.run("int8_gemm", torch.device("cpu"), (), lambda: (_ for _ in ()).throw(ValueError("bad")),
                     lambda: None)
    assert int8_gemm_rescale is not None


def test_int_mm_helper_is_exact_for_any_shape():
    gen = torch.Generator().manual_seed(3)
    for m, k, n in [(1, 64, 24), (20, 64, 24), (7, 36, 10)]:  # small M, _int_mm shapes, odd K/N
        a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        assert torch.equal(fallback.int_mm(a, b), (a.long() @ b.long().t()).int())


def test_kernels_raise_a_clear_error_without_triton(monkeypatch):
    """The package imports no Triton itself; without it a kernel call says so (no silent None stub) when
    the fallback is switched off, and computes with torch (one warning) when it is on."""
    import comfyui_int8_convrot.kernels.triton as pkg
    from comfyui_int8_convrot.kernels.triton import fallback
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    for name in ("rotate_quant", "int8_gemm", "_runtime", "gemm_configs"):
        monkeypatch.delitem(sys.modules, f"{pkg.__name__}.{name}", raising=False)
        monkeypatch.delattr(pkg, name, raising=False)
    gemm_args = (torch.zeros(1, 32, dtype=torch.int8), torch.ones(1, 1), torch.zeros(16, 32, dtype=torch.int8),
                 torch.ones(16, 1), None, torch.float32)
    monkeypatch.setenv(fallback.ENV, "0")
    fallback.reset()
    with pytest.raises(RuntimeError, match="need Triton"):
        pkg.rotate_quantize(torch.randn(2, 64), 64)
    with pytest.raises(RuntimeError, match="need Triton"):
        pkg.int8_gemm_rescale(*gemm_args)
    monkeypatch.setenv(fallback.ENV, "1")
    try:
        assert pkg.rotate_quantize(torch.randn(2, 64), 64)[0].shape == (2, 64)
        assert torch.equal(pkg.int8_gemm_rescale(*gemm_args), torch.zeros(1, 16))
        assert any("need Triton" in cause for cause in fallback.failures().values())
    finally:
        fallback.reset()
