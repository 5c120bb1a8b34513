"""The fused Triton kernels (kernels/triton/) against the torch reference, on CPU under the Triton
interpreter (TRITON_INTERPRET=1 must be set before triton is imported: it decides at @triton.jit time).

What must match and how closely:
- rotate_quantize: the rotation is a different summation order than torch's matmul, so rotated
  values (and scales) agree to float rounding, not bit for bit. Codes must equal quantize_rowwise's
  except by ±1 where the exact value is within float rounding of a .5 tie; the kernel's scales and
  torch's both stay within the fp32 dot-product error bound of the float64-exact scale (a few ulps;
  1 ulp is not a valid bound for g ≥ 16 with outlier channels). Exact .5 ties
  (constructed so the rotation is exact) must round half to even.
- int8_gemm_rescale: the int32 accumulation is exact, so only the fp32 epilogue rounds.

The interpreter runs numpy for every program: shapes are tiny. It also casts fp32→bf16 by truncation
(compiled Triton rounds to nearest even), hence the 1-ulp bf16 bound below.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not importable: the fused kernels cannot be tested")
pytestmark = pytest.mark.triton_kernel   # fallback off; each test fails unless a kernel launched (conftest.py)
# fp32 activations at g >= 256 take the torch path by design (rotate_quant.TORCH_FP32_MIN_GROUP)
FP32_TORCH_ROUTE = pytest.mark.no_kernel_launch("fp32 at g >= 256 is the torch path (TORCH_FP32_MIN_GROUP)")

from comfyui_int8_convrot.kernels import (backends, hadamard, int8_linear, quantize_rowwise,  # noqa: E402
                                          quantize_weight, rotate_matmul, use_backend)
from comfyui_int8_convrot.kernels.triton import int8_gemm_rescale, rotate_quantize  # noqa: E402

backends.triton_status.cache_clear()  # it is lru_cached: an earlier call may predate TRITON_INTERPRET
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("TRITON_INTERPRET is set to something other than 1: these tests use CPU tensors",
                allow_module_level=True)

U = 2.0 ** -24  # fp32 unit roundoff


def ulp(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The spacing of `dtype` at |t| (normal range), as float64."""
    t = t.double().abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(t)))


def exact_rotation(x: torch.Tensor, g) -> torch.Tensor:
    if not g:
        return x.double()
    m, k = x.shape
    return (x.double().reshape(m, k // g, g) @ hadamard(g, dtype=torch.float64)).reshape(m, k)


def check_rotate_quantize(x: torch.Tensor, g, max_code_diffs: int):
    q, s = rotate_quantize(x, g)
    xf = x.float()
    q_ref, s_ref = quantize_rowwise(rotate_matmul(xf, g, torch.float32) if g else xf)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.dtype == torch.float32 and s.shape == (x.shape[0], 1)

    # Scales: both the kernel's and torch's are within the fp32 dot-product error bound (γ_n·Σ|x·h|) of
    # the exact scale, hence within twice that of each other. No rotation: nothing to round, bit-equal.
    y = exact_rotation(xf, g)
    s_exact = (y.abs().amax(1, keepdim=True) / 127).clamp_min(1e-30)
    n = (g or 1) + 4  # g products per sum, + the H4 combine stage of g = 1024
    l1 = (xf.double().abs().reshape(x.shape[0], -1, g or 1).sum(-1) / (g or 1) ** 0.5).amax(1, keepdim=True)
    bound = n * U / (1 - n * U) * l1 / 127 + ulp(s)
    assert ((s.double() - s_exact).abs() <= bound).all()
    assert ((s_ref.double() - s_exact).abs() <= bound).all()
    if not g:
        assert torch.equal(s, s_ref)

    # Codes: equal, except ±1 on values within float rounding of a .5 tie (both roundings are right).
    diff = q.int() - q_ref.int()
    assert diff.abs().max() <= 1
    v = (y / s_ref.double()).abs()
    near_tie = ((v - v.floor()) - 0.5).abs() < 1e-3
    assert near_tie[diff != 0].all(), "a code differs on a value that is not near a .5 tie"
    assert int((diff != 0).sum()) <= max_code_diffs
    return q, s


@pytest.mark.parametrize("g,k", [(None, 100), (4, 84), (16, 208), (64, 320),
                                 pytest.param(256, 768, marks=FP32_TORCH_ROUTE),
                                 pytest.param(1024, 2048, marks=FP32_TORCH_ROUTE)])
def test_rotate_quantize_fp32_matches_reference(g, k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(33, k, generator=gen)  # 33 rows: a partial row block; K % 64 != 0 for g ≤ 64
    x[:, 3] *= 30.0  # an outlier channel, as in DiT hidden states
    x[7] = 0.0  # an all-zero row: scale clamps to 1e-30, codes 0
    q, s = check_rotate_quantize(x, g, max_code_diffs=4)
    assert s[7].item() == pytest.approx(1e-30) and not q[7].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g", [16, 256])
def test_rotate_quantize_half_inputs(dtype, g):
    gen = torch.Generator().manual_seed(g)
    x = torch.randn(17, 512, generator=gen).to(dtype)  # fp16 runs the native-dtype dot path
    check_rotate_quantize(x, g, max_code_diffs=4)


@pytest.mark.parametrize("g", [None, 16, pytest.param(1024, marks=FP32_TORCH_ROUTE)])
def test_rotate_quantize_rounds_ties_to_even(g):
    """x = t·H_g makes the rotated row exactly t (H_g is involutory and every partial sum is exact),
    with amax 127 → scale 1, so codes are round_half_even(t)."""
    k = 1024 if g == 1024 else 64
    t = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.0] * (k // 8))
    x = t.reshape(1, k) if not g else (t.reshape(1, k // g, g) @ hadamard(g)).reshape(1, k)
    q, s = rotate_quantize(torch.cat([x, -x]), g)
    assert torch.equal(s, torch.ones(2, 1))
    expected = torch.tensor([0, 2, 2, 0, -2, -2, 126, -127] * (k // 8), dtype=torch.int8)
    assert torch.equal(q[0], expected) and torch.equal(q[1], -expected)


def test_rotate_quantize_strided_and_empty():
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(9, 192, generator=gen)
    x = wide[:, :128]  # row stride 192 ≠ K: the kernel takes the stride, no copy
    q, s = rotate_quantize(x, 64)
    q_ref, s_ref = rotate_quantize(x.contiguous(), 64)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    q0, s0 = rotate_quantize(torch.empty(0, 128), 64)
    assert q0.shape == (0, 128) and s0.shape == (0, 1)


@pytest.mark.no_kernel_launch("input checks before any launch")
def test_rotate_quantize_rejects_bad_group_sizes():
    with pytest.raises(ValueError, match="power of 2 but not of 4"):
        rotate_quantize(torch.randn(2, 64), 32)
    with pytest.raises(ValueError, match="does not divide"):
        rotate_quantize(torch.randn(2, 96), 64)


def gemm_reference(qx, sx, codes, sw, bias):
    y = (qx.double() @ codes.double().T) * sx.double().reshape(-1, 1) * sw.double().reshape(1, -1)
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("m", [1, 5, 33])  # 1 and 5 take the small-M configs
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int8_gemm_rescale_exact(m, bias, out_dtype):
    n, k = 40, 72  # neither a multiple of 16/32: masked N tail and K tail (EVEN_K false)
    gen = torch.Generator().manual_seed(m)
    qx = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    codes = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    sx = torch.rand(m, 1, generator=gen) * 0.05 + 1e-3
    sw = torch.rand(n, 1, generator=gen) * 0.01 + 1e-4
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    y = int8_gemm_rescale(qx, sx, codes, sw, b, out_dtype)
    assert y.shape == (m, n) and y.dtype == out_dtype
    ref = gemm_reference(qx, sx, codes, sw, b)
    err = (y.double() - ref).abs()
    if out_dtype == torch.float32:
        # relative to the magnitude of the terms (a bias can cancel the product)
        scale = (gemm_reference(qx, sx, codes, sw, None).abs() + (b.double().abs() if bias else 0)).clamp_min(1e-30)
        assert (err / scale).max() < 1e-6
        # and bit-identical to the torch epilogue of the other backends (same fp32 ops, no fma)
        acc = (qx.double() @ codes.double().T).float()
        assert torch.equal(y, acc * sx * sw.reshape(1, -1) + (b.float() if bias else 0.0))
    else:
        assert (err <= ulp(ref, out_dtype)).all()  # within one bf16 ulp


def test_int8_gemm_rescale_bigger_k_and_per_tensor_scale():
    gen = torch.Generator().manual_seed(11)
    qx = torch.randint(-128, 128, (20, 256), generator=gen, dtype=torch.int8)  # EVEN_K, several K blocks
    codes = torch.randint(-128, 128, (24, 256), generator=gen, dtype=torch.int8)
    sx = (torch.rand(20, 1, generator=gen) + 0.5) * 1e-3  # keep y inside the fp16 range
    sw = torch.full((1, 1), 0.25).expand(24, 1)  # a per-tensor scale broadcast as int8_linear passes it
    y = int8_gemm_rescale(qx, sx, codes, sw, None, torch.float16)
    ref = gemm_reference(qx, sx, codes, sw, None)
    assert ((y.double() - ref).abs() <= ulp(ref, torch.float16) / 2).all()  # fp16: round to nearest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g", [None, 64])
def test_int8_linear_w8a8_triton_matches_reference_backend(dtype, g):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(48, 256, generator=gen) / 16
    b = (0.1 * torch.randn(48, generator=gen)).to(dtype)
    codes, scale = quantize_weight(w, g)
    x = torch.randn(2, 9, 256, generator=gen).to(dtype)
    with use_backend("triton"):
        y = int8_linear(x, codes, scale, b, group_size=g, mode="w8a8")
    with use_backend("reference"):
        y_ref = int8_linear(x, codes, scale, b, group_size=g, mode="w8a8")
    assert y.shape == y_ref.shape == (2, 9, 48) and y.dtype == y_ref.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    else:  # bf16 output: one bf16 ulp (interpreter truncation vs torch's round-to-nearest)
        assert ((y.double() - y_ref.double()).abs() <= ulp(y_ref, dtype)).all()


@pytest.mark.no_kernel_launch("fake (meta) kernels only")
def test_fake_kernels_give_shapes_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(7, 128, dtype=torch.bfloat16)
        q, s = torch.ops.int8_convrot.rotate_quantize(x, 64)
        y = torch.ops.int8_convrot.int8_gemm_rescale(q, s, torch.empty(24, 128, dtype=torch.int8),
                                                     torch.empty(24, 1), None, torch.bfloat16)
    assert (q.shape, q.dtype, s.shape, s.dtype) == ((7, 128), torch.int8, (7, 1), torch.float32)
    assert (y.shape, y.dtype) == ((7, 24), torch.bfloat16)


def test_custom_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, generator=gen)
    torch.library.opcheck(torch.ops.int8_convrot.rotate_quantize.default, (x, 16))
    q, s = rotate_quantize(x, 16)
    codes = torch.randint(-128, 128, (24, 64), generator=gen, dtype=torch.int8)
    sw, b = torch.rand(24, 1, generator=gen), torch.randn(24, generator=gen)
    torch.library.opcheck(torch.ops.int8_convrot.int8_gemm_rescale.default, (q, s, codes, sw, b, torch.float32))


def test_torch_compile_traces_through_without_graph_breaks():
    def rotate_then_gemm(x, codes, sw, b):
        q, s = rotate_quantize(x, 64)
        return int8_gemm_rescale(q, s, codes, sw, b, torch.float32)

    gen = torch.Generator().manual_seed(4)
    args = (torch.randn(5, 128, generator=gen), torch.randint(-128, 128, (24, 128), generator=gen, dtype=torch.int8),
            torch.rand(24, 1, generator=gen), torch.randn(24, generator=gen))
    compiled = torch.compile(rotate_then_gemm, backend="aot_eager", fullgraph=True)  # fullgraph: breaks raise
    assert torch.equal(compiled(*args), rotate_then_gemm(*args))
