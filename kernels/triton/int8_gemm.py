"""INT8 GEMM with the W8A8 rescale fused into the epilogue:

    y[m, n] = (Σ_k qx[m, k] · codes[n, k]) · sx[m] · sw[n] (+ bias[n]),  cast to out_dtype

qx int8 (M, K) per-token codes, codes int8 (N, K) as stored in the file (K-contiguous, which is the
operand layout int8 MMA wants for B: no transpose copy), sx fp32 (M,), sw fp32 (N,).

Design (why):
- int32 accumulation is exact (|acc| ≤ 128·128·K < 2**31 for K < 131072); the epilogue rounds exactly
  like the torch epilogue of the other backends: acc→fp32, ·sx, ·sw, +bias in fp32 (fma contraction off),
  one cast to out_dtype. Fusing it saves writing and re-reading an (M, N) int32 tensor.
- Autotuned per (M bucket, N, K): the token count M changes with every prompt length, and tuning each
  exact M would re-benchmark on every new prompt; its next power of two does not. The configs come per
  architecture family and are cut to the device's shared memory (gemm_configs.py), so the autotuner
  never compiles a config that cannot launch; bench/aot_check.py proves they compile without spills.
- Small M (≤ 16) gets its own configs (BLOCK_M = 16, narrow BLOCK_N): the GEMM is then a weight-streaming
  GEMV and needs many CTAs over N. No split-K: int8_linear's "auto" mode sends M < 16 to W8A16 anyway.
- sm80+ only: Triton 3.x has no int8 MMA for Turing (compiling for sm75 fails), so sm75 gets a clear error.
- K tails are masked only when K % BLOCK_K != 0 (EVEN_K), rows/columns past M/N are wrapped with a
  modulo for loads (their results are never stored), as in the Triton matmul tutorial.
- Grouped (GROUP_M) tile order so neighbouring CTAs share weight tiles in L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..lora_ranks import LORA_UP_RANKS
from . import fallback, gemm_configs
from ._runtime import INTERPRET, device_guard

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SMALL_M = 16
# Keep acc·sx·sw + bias as separate fp32 roundings (no fma), so the output is bit-identical to the torch
# epilogue of the int_mm/reference backends. The interpreter has no such option (and never fuses).
FP_FUSION = False
_FP_FUSION_OPTION = {} if INTERPRET else {"enable_fp_fusion": FP_FUSION}


def _prune(configs, named_args, **kwargs):
    """Skip tiles far taller than M (wasted MMA rows); keep at least one config."""
    m = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m)]
    return kept or configs[:1]


@triton.jit
def _int8_gemm_rescale_kernel(a_ptr, b_ptr, sx_ptr, sw_ptr, bias_ptr, y_ptr, z_ptr, u_ptr, zc_ptr, M, N, K,
                              M_BUCKET, stride_am, stride_bn, stride_ym, stride_zm,
                              HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                              R: tl.constexpr):
    # Grouped ordering: GROUP_M row blocks sweep the N blocks together (weight tiles reused from L2).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + (offs_n % N)[None, :] * stride_bn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) view of codes

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    m_mask = offs_m < M
    n_mask = offs_n < N
    sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if R > 0:
        # Fused LoRA up-projection: y += z[:, zc:zc+R]·upᵀ for this tile (z float32 from the rotate+quant
        # kernel, up (N, R) in the activation dtype; z is rounded to it like the unfused GEMM's input).
        # zc, the z column where this tile's rows' LoRA starts (q/k/v slices of a fused qkv each have
        # their own), is one value per BLOCK_N block: only slices aligned to LORA_SLICE_ALIGN are fused.
        offs_r = tl.arange(0, R)
        zc = tl.load(zc_ptr + pid_n * BLOCK_N)
        zt = tl.load(z_ptr + offs_m[:, None] * stride_zm + zc + offs_r[None, :], mask=m_mask[:, None], other=0.0)
        ut = tl.load(u_ptr + offs_n[None, :] * R + offs_r[:, None], mask=n_mask[None, :], other=0.0)
        y += tl.dot(zt.to(ut.dtype), ut, input_precision="ieee")
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _tuned(configs):
    heur = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_int8_gemm_rescale_kernel)
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "R"],
                           prune_configs_by={"early_config_prune": _prune})(heur)


_TUNED: dict[tuple, tuple] = {}  # (capability, shared memory, LoRA rank) → (small-M, large-M) kernels


def _kernels_for(t: torch.Tensor, rank: int = 0):
    if INTERPRET or not t.is_cuda:
        key = ("interpreter",)
    else:
        key = (torch.cuda.get_device_capability(t.device), gemm_configs.device_smem_limit(t.device), rank)
    if key not in _TUNED:
        if len(key) == 1:
            large = small = gemm_configs.INTERPRETER
        else:
            large, small = gemm_configs.configs_for(*key)
        _TUNED[key] = (_tuned(small), _tuned(large))
    return _TUNED[key]


def int8_gemm_rescale_triton(qx: torch.Tensor, sx: torch.Tensor, codes: torch.Tensor, sw: torch.Tensor,
                             bias: torch.Tensor | None, out_dtype: torch.dtype,
                             z: torch.Tensor | None = None, up: torch.Tensor | None = None,
                             zcol: torch.Tensor | None = None) -> torch.Tensor:
    """`z` float32 (M, RZ) and `up` (N, R) in a float dtype add a LoRA's z[:, zcol[n]:zcol[n]+R]·up[n]ᵀ to
    each output column n in the epilogue; `zcol` int32 (N,) is constant over aligned blocks of
    kernels.lora_ranks.LORA_SLICE_ALIGN columns (None: all 0, z (M, R))."""
    if qx.dtype != torch.int8 or codes.dtype != torch.int8 or qx.dim() != 2 or codes.dim() != 2:
        raise ValueError(f"expected int8 qx (M, K) and codes (N, K), got {qx.dtype} {tuple(qx.shape)} "
                         f"and {codes.dtype} {tuple(codes.shape)}")
    (m, k), n = qx.shape, codes.shape[0]
    if codes.shape[1] != k:
        raise ValueError(f"qx has K={k} but codes have K={codes.shape[1]}")
    if sx.numel() != m or sw.numel() != n or (bias is not None and bias.numel() != n):
        raise ValueError(f"scales/bias do not match M={m}, N={n}: sx {tuple(sx.shape)}, sw {tuple(sw.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype {out_dtype} not supported; use one of {OUT_DTYPES}")
    rank = 0
    if (z is None) != (up is None):
        raise ValueError("a fused LoRA needs both z and up")
    if z is not None:
        rank = up.shape[1]
        if zcol is None:
            zcol = torch.zeros(n, dtype=torch.int32, device=qx.device)
        if (z.dtype != torch.float32 or z.dim() != 2 or z.shape[0] != m or up.shape != (n, rank)
                or rank not in LORA_UP_RANKS or up.dtype not in OUT_DTYPES
                or zcol.shape != (n,) or zcol.dtype != torch.int32):
            raise ValueError(f"fused LoRA: z must be float32 ({m}, RZ), up ({n}, R) with R in {LORA_UP_RANKS}, "
                             f"zcol int32 ({n},); got z {z.dtype} {tuple(z.shape)}, up {up.dtype} "
                             f"{tuple(up.shape)}, zcol {None if zcol is None else (zcol.dtype, tuple(zcol.shape))}")
        z, up, zcol = z.contiguous(), up.contiguous(), zcol.contiguous()
    if qx.is_cuda and torch.cuda.get_device_capability(qx.device) < (8, 0):
        # Triton 3.x has no int8 MMA before Ampere: compiling this kernel for sm75 fails in
        # TritonGPUAccelerateMatmul (checked by compiling to PTX). Turing must use torch._int_mm.
        raise RuntimeError("the Triton INT8 GEMM needs an sm80+ GPU (Ampere or newer); "
                           "use the 'int_mm' backend on Turing")
    y = torch.empty((m, n), dtype=out_dtype, device=qx.device)
    if m == 0 or n == 0:
        return y
    qx = qx if qx.stride(1) == 1 else qx.contiguous()
    codes = codes if codes.stride(1) == 1 else codes.contiguous()
    sx = sx.reshape(-1).float().contiguous()
    sw = sw.reshape(-1).float().contiguous()  # also materializes an expanded per-tensor scale
    bias = None if bias is None else bias.reshape(-1).contiguous()
    kernel = _kernels_for(qx, rank)[0 if m <= SMALL_M else 1]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    with device_guard(qx):
        kernel[grid](qx, codes, sx, sw, bias if bias is not None else sw, y,
                     z if z is not None else sw, up if up is not None else sw, zcol if zcol is not None else sw,
                     m, n, k, max(SMALL_M, triton.next_power_of_2(m)), qx.stride(0), codes.stride(0), y.stride(0),
                     z.stride(0) if z is not None else 0, HAS_BIAS=bias is not None, R=rank, **_FP_FUSION_OPTION)
    fallback.launched("int8_gemm_lora" if rank else "int8_gemm")
    return y
