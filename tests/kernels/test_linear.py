"""int8_linear in every mode and backend against float64 references.

Two kinds of reference:
- the float model x·Wᵀ+b: INT8 error is expected, bounded by SQNR (torchao's style; 8-bit weights
  after rotation give ~40 dB, adding 8-bit per-token activations ~35 dB on these statistics);
- the exact emulation of the quantized math in float64: only float rounding is allowed.
"""
import pytest
import torch

from comfyui_int8_convrot.engine.synthetic import linear_weight
from comfyui_int8_convrot.kernels import (dequantize_weight, int8_linear, prepack, quantize_rowwise, quantize_weight,
                                          resolve_mode, rotate_matmul, use_backend)


def sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref, y = ref.double(), y.double()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum())).item()


def available_cpu_backends():
    names = ["reference", "int_mm"]
    try:
        from comfyui_int8_convrot.kernels.cpu_int8_gemm import fast_backend_available
        if fast_backend_available():
            names.append("cpu")
    except ImportError:
        pass
    return names


def make_layer(out_f=192, in_f=512, g=64, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = linear_weight(out_f, in_f, gen, outliers=4)
    b = 0.1 * torch.randn(out_f, generator=gen) if bias else None
    codes, scale = quantize_weight(w, g)
    return w, b, codes, scale


def activations(shape, in_f, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, in_f, generator=gen)
    x[..., 3] *= 30.0  # an outlier activation channel, as in DiT hidden states
    return x


def emulate_w8a8(x, codes, scale, b, g):
    """Exact float64 emulation of rotate → per-token quantize → integer GEMM → rescale."""
    qx, sx = quantize_rowwise(rotate_matmul(x.reshape(-1, x.shape[-1]).float(), g, torch.float32))
    y = (qx.double() @ codes.double().T) * sx.double() * scale.double().reshape(1, -1)
    if b is not None:
        y = y + b.double()
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("backend", available_cpu_backends())
@pytest.mark.parametrize("lead", [(37,), (2, 19)])
@pytest.mark.parametrize("bias", [True, False])
def test_w8a8_exact_emulation(backend, lead, bias):
    w, b, codes, scale = make_layer(bias=bias)
    x = activations(lead, 512)
    with use_backend(backend):
        y = int8_linear(x, codes, scale, b, 64, mode="w8a8")
    assert y.shape == (*lead, 192) and y.dtype == torch.float32
    ref = emulate_w8a8(x, codes, scale, b, 64)
    # float32 rescale of an exact int32 accumulator: relative error ~1e-7 of each output.
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("backend", available_cpu_backends())
@pytest.mark.parametrize("dtype,min_db", [(torch.float32, 30.0), (torch.bfloat16, 28.0), (torch.float16, 30.0)])
@pytest.mark.parametrize("mode", ["w8a8", "w8a16", "auto"])
def test_against_float_model(backend, dtype, min_db, mode):
    w, b, codes, scale = make_layer()
    x = activations((3, 40), 512)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    with use_backend(backend):
        y = int8_linear(x.to(dtype), codes, scale, b.to(dtype), 64, mode=mode)
    assert y.dtype == dtype and y.shape == ref.shape
    assert sqnr_db(ref, y) > min_db


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_w8a16_equals_dequantized_weight(dtype):
    w, b, codes, scale = make_layer()
    x = activations((50,), 512)
    y = int8_linear(x.to(dtype), codes, scale, b.to(dtype), 64, mode="w8a16")
    ref = torch.nn.functional.linear(x.double(), dequantize_weight(codes, scale, 64, torch.float64), b.double())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()


def test_w8a16_tiles(monkeypatch):
    from comfyui_int8_convrot.kernels import linear
    w, b, codes, scale = make_layer(out_f=300)
    x = activations((9,), 512)
    whole = int8_linear(x, codes, scale, b, 64, mode="w8a16")
    monkeypatch.setattr(linear, "W8A16_TILE_ELEMENTS", 512 * 64)  # 64 rows per tile, ragged tail
    tiled = int8_linear(x, codes, scale, b, 64, mode="w8a16")
    assert torch.allclose(whole, tiled, rtol=1e-6, atol=1e-6)


def test_unrotated_layer():
    gen = torch.Generator().manual_seed(3)
    w = linear_weight(64, 100, gen)  # 100 is not divisible by any group size
    codes, scale = quantize_weight(w, None)
    x = torch.randn(20, 100, generator=gen)
    ref = x.double() @ w.double().T
    for mode in ("w8a8", "w8a16"):
        with use_backend("reference"):
            assert sqnr_db(ref, int8_linear(x, codes, scale, None, None, mode=mode)) > 25


def test_tensorwise_scale_accepted():
    w, b, _, _ = make_layer()
    codes, scale = quantize_weight(w, 64, scaling="tensor")
    x = activations((8,), 512)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    with use_backend("reference"):
        assert sqnr_db(ref, int8_linear(x, codes, scale, b, 64, mode="w8a8")) > 20


def test_prepacked_weight_gives_the_same_result():
    w, b, codes, scale = make_layer()
    x = activations((33,), 512)
    packed = prepack(codes, scale)
    y1 = int8_linear(x, codes, scale, b, 64, mode="w8a8")
    y2 = int8_linear(x, codes, scale, b, 64, mode="w8a8", packed=packed)
    assert torch.equal(y1, y2)


def test_auto_picks_w8a16_for_few_tokens():
    x = torch.randn(4, 64)
    assert resolve_mode("auto", x, 4) == "w8a16"
    assert resolve_mode("w8a8", x, 4) == "w8a8"


def test_empty_input():
    _, b, codes, scale = make_layer()
    assert int8_linear(torch.randn(0, 512), codes, scale, b, 64).shape == (0, 192)


def test_errors():
    _, b, codes, scale = make_layer()
    with pytest.raises(ValueError, match="512"):
        int8_linear(torch.randn(2, 256), codes, scale, b, 64)
    with pytest.raises(ValueError, match="unknown INT8 compute mode"):
        int8_linear(torch.randn(2, 512), codes, scale, b, 64, mode="fast")
    with pytest.raises(ValueError, match="powers of 4"):
        int8_linear(torch.randn(2, 512), codes, scale, b, 128)
    with pytest.raises(ValueError, match="int8 codes"):
        int8_linear(torch.randn(2, 512), codes.float(), scale, b, 64)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_blocked_rotate_quantize_is_blocking_invariant(rows):
    from comfyui_int8_convrot.kernels.linear import rotate_quantize_rows
    x = activations((150,), 512).to(torch.bfloat16)
    whole = quantize_rowwise(rotate_matmul(x, 64, torch.float32))
    blocked = rotate_quantize_rows(x, 64, rows)
    assert torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Max error of an output in out dtype vs float64, relative to the largest output: one rounding of the
# output plus (w8a16) the GEMM operands rounded to that dtype.
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("backend", available_cpu_backends())
@pytest.mark.parametrize("mode", ["w8a8", "w8a16", "auto"])
@pytest.mark.parametrize("bias_dtype", [None] + DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("tokens", [5, 40])   # auto: below / above W8A8_MIN_TOKENS
def test_every_input_and_bias_dtype(backend, mode, bias_dtype, x_dtype, tokens):
    """A bias in another dtype than x is cast to the output dtype (x's), as comfy-kitchen does; the
    result matches the float64 emulation of the mode that ran."""
    _, b, codes, scale = make_layer()
    x = activations((tokens,), 512).to(x_dtype)
    bias = None if bias_dtype is None else b.to(bias_dtype)
    with use_backend(backend):
        y = int8_linear(x, codes, scale, bias, 64, mode=mode)
        ran = resolve_mode(mode, x, tokens)
    assert y.dtype == x_dtype and y.shape == (tokens, 192)
    b64 = None if bias is None else bias.double()
    if ran == "w8a8":
        ref = emulate_w8a8(x, codes, scale, b64, 64)
    else:
        ref = torch.nn.functional.linear(x.double(), dequantize_weight(codes, scale, 64, torch.float64), b64)
    assert (y.double() - ref).abs().max() <= OUT_TOL[x_dtype] * ref.abs().max()
