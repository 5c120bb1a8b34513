"""LoRA fused into the Triton W8A8 path (kernels/triton: the down-projection in the rotate+quant pass, the
up-projection in the GEMM epilogue), on CPU under the Triton interpreter, against the unfused math.

- rotate_quantize_down: codes and scales identical to rotate_quantize's (the same rotation dots), and
  z = x·down_t to float32 rounding.
- int8_gemm_rescale_lora: the int8 output of int8_gemm_rescale plus z·upᵀ (z rounded to up's dtype).
- engine: int8_forward with LoRA terms on the Triton backend equals the unfused apply_lowrank path.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not importable: the fused kernels cannot be tested")
pytestmark = pytest.mark.triton_kernel   # fallback off; each test fails unless a kernel launched (conftest.py)

from comfyui_int8_convrot.engine import linear as L  # noqa: E402
from comfyui_int8_convrot.kernels import backends, quantize_weight, use_backend  # noqa: E402
from comfyui_int8_convrot.kernels import triton as kt  # noqa: E402
from comfyui_int8_convrot.kernels.triton import rotate_quant  # noqa: E402

backends.triton_status.cache_clear()
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("TRITON_INTERPRET is set to something other than 1: these tests use CPU tensors",
                allow_module_level=True)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("g,k,rank", [(64, 192, 16), (16, 80, 32), (4, 64, 64)])
def test_rotate_quantize_down_matches_unfused(g, k, rank):
    gen = torch.Generator().manual_seed(g + k + rank)
    x = torch.randn(37, k, generator=gen)
    down_t = torch.randn(k, rank, generator=gen) / k ** 0.5
    q, s, z = rotate_quant.rotate_quantize_triton(x, g, down_t)
    q0, s0 = rotate_quant.rotate_quantize_triton(x, g)
    assert torch.equal(q, q0) and torch.equal(s, s0)
    assert z.dtype == torch.float32 and z.shape == (37, rank)
    assert rel(z, x.double() @ down_t.double()) < 1e-6


@pytest.mark.no_kernel_launch("input checks before any launch")
def test_rotate_quantize_down_refuses_what_it_cannot_fuse():
    x = torch.randn(8, 256)
    with pytest.raises(ValueError):
        rotate_quant.rotate_quantize_triton(x, 256, torch.randn(256, 16))   # g > 64
    with pytest.raises(ValueError):
        rotate_quant.rotate_quantize_triton(x, 64, torch.randn(256, 24))    # rank not a power of two
    assert not rotate_quant.fuses_down(x, 256, 16) and rotate_quant.fuses_down(x, 64, 128)
    assert rotate_quant.fuses_down(x, 64, 256) and not rotate_quant.fuses_down(x, 64, 512)


@pytest.mark.parametrize("out_dtype,bias", [(torch.float32, True), (torch.bfloat16, False)])
def test_gemm_lora_epilogue_matches_unfused(out_dtype, bias):
    gen = torch.Generator().manual_seed(5)
    m, k, n, r = 21, 64, 48, 32
    qx = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    sx, sw = torch.rand(m, 1, generator=gen) * 0.01, torch.rand(n, 1, generator=gen) * 0.01
    b = torch.randn(n, generator=gen) if bias else None
    z = torch.randn(m, r, generator=gen)
    up = torch.randn(n, r, generator=gen) * 0.1
    y = kt.int8_gemm_rescale_lora_op(qx, sx, codes, sw, b, z, up, torch.zeros(n, dtype=torch.int32), out_dtype)
    base = kt.int8_gemm_rescale(qx, sx, codes, sw, b, torch.float32)
    ref = base.double() + z.double() @ up.double().t()
    assert y.dtype == out_dtype and rel(y, ref) < (1e-6 if out_dtype == torch.float32 else 8e-3)


@pytest.mark.no_kernel_launch("input checks before any launch")
def test_gemm_lora_checks_its_operands():
    qx = torch.zeros(4, 64, dtype=torch.int8)
    codes = torch.zeros(8, 64, dtype=torch.int8)
    sx, sw = torch.ones(4, 1), torch.ones(8, 1)
    from comfyui_int8_convrot.kernels.triton import int8_gemm
    with pytest.raises(ValueError):   # rank not a power of two
        int8_gemm.int8_gemm_rescale_triton(qx, sx, codes, sw, None, torch.float32,
                                           z=torch.zeros(4, 24), up=torch.zeros(8, 24))
    with pytest.raises(ValueError):   # z without up
        int8_gemm.int8_gemm_rescale_triton(qx, sx, codes, sw, None, torch.float32, z=torch.zeros(4, 16))


def test_gemm_lora_epilogue_reads_each_blocks_z_columns():
    """Sliced layout: output columns of slice s add z[:, zcol:zcol+R]·upᵀ with their own zcol."""
    gen = torch.Generator().manual_seed(6)
    m, k, n, r = 9, 64, 768, 16
    qx = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    sx, sw = torch.rand(m, 1, generator=gen) * 0.01, torch.rand(n, 1, generator=gen) * 0.01
    z, up = torch.randn(m, 64, generator=gen), torch.randn(n, r, generator=gen) * 0.1
    zcol = torch.repeat_interleave(torch.tensor([0, 16, 32], dtype=torch.int32), 256)
    y = kt.int8_gemm_rescale_lora_op(qx, sx, codes, sw, None, z, up, zcol, torch.float32)
    ref = kt.int8_gemm_rescale(qx, sx, codes, sw, None, torch.float32).double()
    for s in range(3):
        cols = slice(256 * s, 256 * (s + 1))
        ref[:, cols] += z[:, 16 * s: 16 * s + r].double() @ up[cols].double().t()
    assert rel(y, ref) < 1e-6


@pytest.mark.no_kernel_launch("layout arithmetic only")
def test_fused_layout():
    assert L.fused_layout([(None, 8)]) == (16, 16, False)
    assert L.fused_layout([(None, 64), ((0, 256), 32)]) == (128, 128, False)          # mixed: dense
    qkv64 = [((0, 3840), 64), ((3840, 3840), 64), ((7680, 3840), 64)]
    assert L.fused_layout(qkv64) == (64, 256, True)                                    # q/k/v: sliced
    assert L.fused_layout([((0, 96), 64), ((96, 96), 72)]) is None                     # unaligned, Σr > 128
    assert L.fused_layout([((0, 32), 8), ((32, 32), 8)]) == (16, 16, False)
    assert L.fused_layout([(None, 129)]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [None, "dense", "sliced"])
def test_engine_forward_fuses_lora_on_triton(dtype, split):
    """int8_forward with LoRA terms (one plain, or q/k/v-style row slices: small ones share one dense up,
    256-aligned ones get their own z columns) on the Triton backend: the fused path equals the INT8
    output plus the unfused low-rank update."""
    gen = torch.Generator().manual_seed(7)
    k, n = 128, (768 if split == "sliced" else 96)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    codes, scale = quantize_weight(w, 64)
    x = torch.randn(2, 20, k, generator=gen).to(dtype)
    rank = 48 if split == "sliced" else 8          # sliced: 3 × 48 = 144 > 128, fused only per slice
    third = n // 3
    slices = [(0, third), (third, third), (2 * third, third)] if split else [None]
    terms = L.LowRankSet(tuple(
        L.LowRankTerm((torch.randn(rank, k, generator=gen) / k ** 0.5).to(dtype),
                      (torch.randn(n if r is None else r[1], rank, generator=gen) * 0.1).to(dtype), 0.7, r)
        for r in slices))
    with use_backend("triton"):
        assert L.fuses_lowrank_triton(x, 64, terms, "w8a8")
        y = L.int8_forward(x, codes, scale, None, 64, "w8a8", None, terms)
        y0 = L.int8_forward(x, codes, scale, None, 64, "w8a8", None)
    ref = y0.double() + L.apply_lowrank(torch.zeros_like(y0, dtype=torch.float32), x.float(),
                                        L.LowRankSet(tuple(t.to("cpu", torch.float32) for t in terms))).double()
    assert y.dtype == dtype
    assert rel(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel(y - y0.to(y.dtype), ref - y0.double()) < (1e-5 if dtype == torch.float32 else 3e-2)


def test_every_fusion_check_sees_the_up_rank(monkeypatch):
    """The GPU policy (keep the GEMM's largest tile) depends on the epilogue's rank R, not z's width: the
    engine and int8_linear must both ask with R (sliced q/k/v: R = 64 while z is 256 wide)."""
    from comfyui_int8_convrot.kernels import linear as KL
    seen = []
    real = KL.fuses_lora

    def spy(x, group_size, z_rank, up_rank, mode="auto"):
        seen.append((z_rank, up_rank))
        return real(x, group_size, z_rank, up_rank, mode)

    monkeypatch.setattr(KL, "fuses_lora", spy)
    monkeypatch.setattr(L.kernels, "fuses_lora", spy)
    gen = torch.Generator().manual_seed(8)
    k, n = 128, 768
    codes, scale = quantize_weight(torch.randn(n, k, generator=gen) / k ** 0.5, 64)
    terms = L.LowRankSet(tuple(L.LowRankTerm(torch.randn(48, k, generator=gen) * 0.1,
                                             torch.randn(256, 48, generator=gen) * 0.1, 1.0, (256 * i, 256))
                               for i in range(3)))
    x = torch.randn(20, k, generator=gen)
    with use_backend("triton"):
        L.int8_forward(x, codes, scale, None, 64, "w8a8", None, terms)
    assert seen and all(s == (256, 64) for s in seen), seen
