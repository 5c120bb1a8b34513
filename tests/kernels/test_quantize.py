import pytest
import torch

from comfyui_int8_convrot.kernels import (NonFiniteError, dequantize_weight, quantize_rowwise, quantize_tensorwise,
                                          quantize_weight, rotate_matmul)
from comfyui_int8_convrot.engine.synthetic import linear_weight

SHAPES = [(96, 256), (3840, 3840), (1024, 10240), (130, 64)]


def bf16_weight(out_f, in_f, seed=0):
    w = linear_weight(out_f, in_f, torch.Generator().manual_seed(seed), outliers=6)
    w[1] = 0.0  # an all-zero row: scale floors at 1e-30, codes all zero
    return w.to(torch.bfloat16)


def ctq_quantize(w: torch.Tensor, g: int):
    """convert-to-quant's own code for `--int8 --scaling_mode row --simple --convrot`."""
    from convert_to_quant.converters.learned_rounding import _quantize_convrot_int8_rowwise
    from convert_to_quant.utils.convrot import build_hadamard, rotate_weight
    return _quantize_convrot_int8_rowwise(rotate_weight(w.float(), build_hadamard(g), g))


@pytest.mark.parametrize("shape,g", [(s, g) for s in SHAPES for g in (16, 64, 256) if s[1] % g == 0])
def test_bit_identical_to_convert_to_quant(shape, g):
    w = bf16_weight(*shape)
    codes, scale = quantize_weight(w, g)
    ref_codes, ref_scale = ctq_quantize(w, g)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (shape[0], 1)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(codes[1], torch.zeros_like(codes[1])) and scale[1].item() == pytest.approx(1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_input_dtypes_are_upcast_first(dtype):
    w = bf16_weight(64, 256).to(dtype)
    codes, scale = quantize_weight(w, 64)
    ref_codes, ref_scale = ctq_quantize(w, 64)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


def test_chunked_equals_unchunked(monkeypatch):
    from comfyui_int8_convrot.kernels import quantize as q
    w = bf16_weight(300, 512)
    whole = quantize_weight(w, 64)
    monkeypatch.setattr(q, "WEIGHT_CHUNK_ELEMENTS", 512 * 7)  # 7 rows per chunk, ragged tail
    chunked = quantize_weight(w, 64)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_round_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]])
    q, s = quantize_rowwise(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2]]


def test_dequantize_matches_comfy_kitchen():
    from comfy_kitchen.backends.eager.quantization import dequantize_int8_convrot_weight
    w = bf16_weight(256, 512)
    codes, scale = quantize_weight(w, 64)
    ref = dequantize_int8_convrot_weight(codes, scale, 64)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize_weight(codes, scale, 64, dtype), ref.to(dtype))


def test_dequantize_error_is_small():
    """Per-row INT8 after rotation: relative Frobenius error well under 1% even with outlier columns."""
    w = bf16_weight(512, 1024).float()
    w[1] = torch.randn(1024) * 0.03  # no zero row for relative error
    codes, scale = quantize_weight(w, 64)
    err = (dequantize_weight(codes, scale, 64) - w).norm() / w.norm()
    codes_nr, scale_nr = quantize_weight(w, None)
    err_unrotated = (dequantize_weight(codes_nr, scale_nr, None) - w).norm() / w.norm()
    assert err < 0.01
    assert err < 0.5 * err_unrotated, "rotation must beat plain per-row INT8 on outlier channels"


def test_tensorwise_matches_convert_to_quant():
    from convert_to_quant.comfy.quant_ops import TensorWiseINT8Layout
    w = bf16_weight(64, 256).float()
    q, s = quantize_tensorwise(w)
    ref_scale = w.abs().max().clamp_min(1e-12) / 127.0
    ref_q, _ = TensorWiseINT8Layout.quantize(w, scale=ref_scale, is_weight=True)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_scale)
    codes, scale = quantize_weight(w, 64, scaling="tensor")
    assert scale.shape == () and torch.equal(codes, quantize_tensorwise(rotate_matmul(w, 64))[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_a_clear_error(bad):
    w = torch.randn(8, 64)
    w[3, 7] = bad
    with pytest.raises(NonFiniteError, match=r"layers\.0\.w1\.weight has 1 NaN/Inf"):
        quantize_weight(w, 64, name="layers.0.w1.weight")


def test_errors_for_shape_group_and_scaling():
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(4, 4, 64), 64)
    with pytest.raises(ValueError, match="does not divide the input dimension of w"):
        quantize_weight(torch.randn(4, 100), 64, name="w")
    with pytest.raises(ValueError, match="powers of 4"):
        quantize_weight(torch.randn(4, 128), 128)
    with pytest.raises(ValueError, match="unknown scaling"):
        quantize_weight(torch.randn(4, 64), 64, scaling="block")


@pytest.mark.parametrize("scale_shape", [(3, 96, 1), (96, 1), (1, 1, 1), (), (3, 1, 1)])
def test_dequantize_nd_codes_like_comfy_kitchen(scale_shape):
    """N-D codes (e.g. stacked experts) with a broadcastable scale: comfy-kitchen's `codes * scale`;
    with a rotation, each 2-D slice equals comfy-kitchen's ConvRot dequantization of that slice."""
    from comfy_kitchen.backends.eager.quantization import dequantize_int8_convrot_weight, dequantize_int8_simple
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(-128, 128, (3, 96, 256), generator=gen, dtype=torch.int8)
    scale = torch.rand(scale_shape, generator=gen) * 1e-2
    assert torch.equal(dequantize_weight(codes, scale, None), dequantize_int8_simple(codes, scale))
    full = scale.expand(3, 96, 1) if scale.dim() == 3 else scale.reshape(-1, 1).expand(96, 1).expand(3, 96, 1)
    rotated = dequantize_weight(codes, scale, 64, torch.bfloat16)
    for i in range(3):
        ref = dequantize_int8_convrot_weight(codes[i], full[i], 64).to(torch.bfloat16)
        assert torch.equal(rotated[i], ref), i


def test_dequantize_flat_per_row_scale():
    """A 1-D per-row scale of 2-D codes is read as (out, 1) (the stored (out, 1) layout, flattened)."""
    w = bf16_weight(96, 256)
    codes, scale = quantize_weight(w, 64)
    assert torch.equal(dequantize_weight(codes, scale.reshape(-1), 64), dequantize_weight(codes, scale, 64))
