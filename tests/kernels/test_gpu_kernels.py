"""GPU tier: the compiled Triton kernels against the reference backend at Z-Image shapes, every mode,
activation dtype and group size, and the autotuner's choice.

Run it in its own process (bench/gpu_check.sh does): the interpreter tests set TRITON_INTERPRET=1 for
their session, and Triton decides at @triton.jit time. gpu_check.sh also sets INT8_CONVROT_TRITON_FALLBACK=0
so a kernel that fails raises here instead of passing on the torch fallback.
Dry mode (INT8_CONVROT_GPU_DRY=1, CI): CPU tensors under the interpreter, tiny shapes, same assertions.

What must hold (see the kernels' docstrings):
- int8_gemm_rescale: int32 accumulation is exact and the epilogue rounds like the torch one, so its output
  is bit-identical to the reference backend's for the same qx, sx (fp32, bf16 and fp16 outputs).
- rotate_quantize: without rotation codes and scales are bit-identical; with it the rotated sums round in
  another order than torch's, so codes may differ by 1 where a value is within rounding of a .5 tie
  (a handful per million) and scales by a few fp32 ulps. fp32 at g ≥ 256 is the torch path: bit-identical.
"""
import os

DRY = os.environ.get("INT8_CONVROT_GPU_DRY") == "1"
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# triton_kernel: the fallback is off and each test fails unless a kernel launched (tests/conftest.py)
pytestmark = [pytest.mark.gpu, pytest.mark.triton_kernel]
triton = pytest.importorskip("triton", reason="triton is not importable")
if not DRY and os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("interpreter session: the GPU tier runs in its own process (bash bench/gpu_check.sh)",
                allow_module_level=True)

from comfyui_int8_convrot.kernels import (backends, int8_linear, quantize_rowwise, quantize_weight,  # noqa: E402
                                          rotate_matmul, use_backend)
from comfyui_int8_convrot.kernels.act_quant import rotate_quantize_rows  # noqa: E402
from comfyui_int8_convrot.kernels.triton import int8_gemm_rescale, rotate_quantize  # noqa: E402

backends.triton_status.cache_clear()
DEV = torch.device("cpu" if DRY else "cuda")
# (K, N): qkv, attention out, w1/w3, w2 of Z-Image; M: GEMV, the small/large switch, a prompt, 1024² and 2048².
SHAPES = [(256, 48)] if DRY else [(3840, 11520), (3840, 3840), (3840, 10240), (10240, 3840)]
TOKENS = [5, 17] if DRY else [1, 16, 17, 333, 4096, 16384]
GROUPS = [0, 4, 16, 64, 256, 1024]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TORCH_ROUTE = pytest.mark.no_kernel_launch("fp32 at g >= 256 is the torch path (TORCH_FP32_MIN_GROUP)")


def _x(m, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, ::97] *= 30  # outlier channels, as real activations have
    return x.to(DEV, dtype)


@pytest.mark.parametrize("g,dtype", [pytest.param(g, d, marks=TORCH_ROUTE) if d == torch.float32 and g >= 256
                                     else (g, d) for g in GROUPS for d in DTYPES])
def test_rotate_quantize_matches_torch(dtype, g):
    k = max(SHAPES[0][0], g)
    for m in TOKENS[-2:]:
        x = _x(m, k, dtype, seed=m + g)
        q, s = rotate_quantize(x, g)
        q_ref, s_ref = quantize_rowwise(rotate_matmul(x.float(), g, torch.float32) if g else x.float())
        if not g:
            assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
            continue
        if dtype == torch.float32 and g >= 256:  # the torch path the other backends run: their very codes
            q_rows, s_rows = rotate_quantize_rows(x, g)
            assert torch.equal(q, q_rows) and torch.equal(s, s_rows)
            continue
        diff = (q.int() - q_ref.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (diff.max(), (diff > 0).float().mean())
        assert ((s - s_ref).abs() <= 8 * torch.finfo(torch.float32).eps * s_ref).all()


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_is_bit_identical_to_the_reference_epilogue(out_dtype, bias):
    for k, n in SHAPES:
        gen = torch.Generator().manual_seed(k + n)
        codes = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).to(DEV)
        sw = (torch.rand(n, 1, generator=gen) * 1e-3).to(DEV)
        b = torch.randn(n, generator=gen).to(DEV, out_dtype) if bias else None
        for m in TOKENS:
            qx = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8).to(DEV)
            sx = (torch.rand(m, 1, generator=gen) * 1e-2).to(DEV)
            y = int8_gemm_rescale(qx, sx, codes, sw, b, out_dtype)
            acc = (qx.double() @ codes.double().t()).float() if DRY else torch._int_mm(
                qx if m > 16 else torch.nn.functional.pad(qx, (0, 0, 0, 17 - m)), codes.t())[:m].float()
            want = acc * sx * sw.reshape(1, -1)
            if b is not None:
                want = want + b.float()
            want = want.to(out_dtype)
            if DRY and out_dtype != torch.float32:  # the interpreter casts fp32→bf16/fp16 by truncation
                spacing = torch.finfo(out_dtype).eps * want.float().abs().clamp_min(1e-30)
                assert ((y.float() - want.float()).abs() <= spacing).all()
            else:
                assert torch.equal(y, want), (k, n, m)


@pytest.mark.parametrize("mode", ["auto", "w8a8",
                                  pytest.param("w8a16", marks=pytest.mark.no_kernel_launch("w8a16: torch GEMM"))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g", [64, 256])
def test_int8_linear_triton_vs_reference(mode, dtype, g):
    k, n = SHAPES[0]
    gen = torch.Generator().manual_seed(7)
    codes, scale = quantize_weight(torch.randn(n, k, generator=gen), g)
    codes, scale = codes.to(DEV), scale.to(DEV)
    bias = torch.randn(n, generator=gen).to(DEV, dtype)
    for m in (TOKENS[0], TOKENS[-1]):
        x = _x(m, k, dtype, seed=m)
        with use_backend("triton"):
            y = int8_linear(x, codes, scale, bias, g, mode)
        with use_backend("reference"):
            ref = int8_linear(x, codes, scale, bias, g, mode)
        rel = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
        assert y.dtype == dtype and rel < 1e-2, rel  # a ±1 code where torch rounds a tie the other way


@pytest.mark.skipif(DRY, reason="the interpreter does not autotune")
def test_autotuner_picks_a_config_of_this_device():
    from comfyui_int8_convrot.kernels.triton import gemm_configs, int8_gemm
    cap = torch.cuda.get_device_capability(DEV)
    large, small = gemm_configs.configs_for(cap, gemm_configs.device_smem_limit(DEV))
    allowed = {str(c) for c in large + small}
    k, n = SHAPES[0]
    for m in (8, 4096):
        qx = torch.zeros(m, k, dtype=torch.int8, device=DEV)
        int8_gemm_rescale(qx, torch.ones(m, 1, device=DEV), torch.zeros(n, k, dtype=torch.int8, device=DEV),
                          torch.ones(n, 1, device=DEV), None, torch.bfloat16)
    for kernel in int8_gemm._kernels_for(qx):
        assert kernel.cache, "the autotuner ran"
        for key, cfg in kernel.cache.items():
            assert str(cfg) in allowed, (key, cfg)
            print("autotune", cap, key, cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank,split", [(16, False), (64, False), (32, True), (64, True), (128, False)])
def test_fused_lora_matches_the_unfused_update(dtype, rank, split):
    """LoRA fused into the Triton W8A8 kernels (down-projection in rotate+quant, up-projection in the GEMM
    epilogue) against the INT8 output plus the low-rank update computed in float64."""
    from comfyui_int8_convrot.engine import linear as L
    k, n = SHAPES[0]
    gen = torch.Generator().manual_seed(rank)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    codes, scale = quantize_weight(w, 64)
    codes, scale = codes.to(DEV), scale.to(DEV)
    slices = [(0, n // 3), (n // 3, n // 3), (2 * (n // 3), n // 3)] if split else [None]
    terms = L.LowRankSet(tuple(
        L.LowRankTerm((torch.randn(rank, k, generator=gen) / k ** 0.5).to(DEV, dtype),
                      (torch.randn(n if r is None else r[1], rank, generator=gen) * 0.05).to(DEV, dtype), 0.8, r)
        for r in slices))
    for m in TOKENS[-2:]:
        x = _x(m, k, dtype, seed=m + rank)
        with use_backend("triton"):
            fused = L.fuses_lowrank_triton(x, 64, terms, "w8a8")
            y = L.int8_forward(x, codes, scale, None, 64, "w8a8", None, terms)
            y0 = L.int8_forward(x, codes, scale, None, 64, "w8a8", None)
        # q/k/v slices of 3840 get their own z columns; DRY's tiny slices are not 256-aligned and fuse only
        # while Σr ≤ 128. On a GPU the policy also wants the GEMM's largest tile kept (sm_8x: R ≤ 64).
        layout = L.fused_layout(L._row_groups(terms))
        want = layout is not None
        if want and not DRY:
            from comfyui_int8_convrot.kernels.triton import gemm_configs
            want = gemm_configs.lora_keeps_best_tile(torch.cuda.get_device_capability(DEV),
                                                     gemm_configs.device_smem_limit(DEV), layout[0])
        assert fused == want
        delta = sum(t.delta(n, torch.float64).to(DEV) for t in terms)
        ref = y0.double() + x.double() @ delta.t()
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        assert y.dtype == dtype and rel < 1e-2, rel
        if layout is not None:   # the fused kernels themselves, also where the policy does not pick them
            from comfyui_int8_convrot.kernels.linear import lora_operand_dtype
            from comfyui_int8_convrot.kernels.triton import linear_lora
            dot = lora_operand_dtype(x)
            ops = terms.stacked(DEV, dtype).fused_operands(n, dot, dot)
            y2 = linear_lora(x, codes, scale.float().reshape(-1, 1), None, 64, dtype, *ops)
            rel2 = ((y2.double() - ref).norm() / ref.norm()).item()
            assert rel2 < 1e-2, rel2
