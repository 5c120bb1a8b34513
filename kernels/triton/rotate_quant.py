"""Fused ConvRot rotation + per-token INT8 quantization: x (M, K) float → codes int8 (M, K), scales fp32 (M, 1).

Same contract as `quantize_rowwise(rotate_matmul(x, g, float32))` (see kernels/quantize.py):
    y = x·H_g group-wise (float32),  s = max(max|y_row| / 127, 1e-30),  q = rint(y / s).clamp(-128, 127)

Design (why, not what):
- Rotation = one 64×64 tl.dot + 0–2 butterfly stages. H entries are ±2**-k, exact in bf16/fp16/fp32, so
  every product is exact and only the fp32 accumulation rounds (torch rounds the same sums in another
  order). On tensor cores a 64-wide dot (128 MACs per element) is free next to the memory traffic.
  * g ≤ 64: the tile is block diagonal I_(64/g) ⊗ H_g (zeros cost MMA slots, not bandwidth), which also
    keeps g = 4 and 16 above tl.dot's 16-element minimum.
  * g = 256 and 1024: H_g = H4 ⊗ H_(g/4), so each 64-wide sub-block is rotated by H_64 and one (g=256) or
    two (g=1024) H4 stages, H4/2·v = sum(v)/2 − reverse(v), combine the sub-blocks elementwise in fp32.
    A dense H_256 operand would be 128 KB (bf16): compiled for sm80 it took 136 KB of shared memory,
    beyond the ~100 KB of the consumer Ampere/Ada GPUs this pack targets, and re-reading it from L2 per
    K step costs 16× the bytes of x. A butterfly over all log4(g) stages instead would need reshapes
    and flips of register tensors that Triton lowers to shared-memory layout shuffles.
  * The 64×64 tile is loaded once per pass and stays on chip (8 KB bf16, 16 KB fp32).
  * Dot operand dtype: x's own dtype when it is fp16/bf16 (exact products; bf16 needs sm80+), else fp32
    with input_precision="ieee" (never TF32: 10-bit mantissas would change codes).
- Two passes over the row, recomputing the rotation: pass 1 finds the rotated amax, pass 2 rotates
  again and writes codes. K reaches 10240 (Z-Image FFN), so keeping a BLOCK_M×K fp32 row block on chip
  (16×10240×4 = 640 KB) does not fit shared memory; the second read of x is mostly an L2 hit (a
  program's slice is BLOCK_M×K×2 bytes) and the recomputed dot uses otherwise idle tensor cores.
- Rounding: precise division (div_rn, as torch divides) then rint (round half to even, one cvt.rni on
  NVIDIA). Triton's interpreter has no libdevice, so there rint is the exact fp32 trick
  (v + 1.5·2**23) − 1.5·2**23, valid for |v| < 2**22 (|v| ≤ 127 here).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..act_quant import rotate_quantize_rows
from ..hadamard import check_group_size, hadamard
from ..lora_ranks import LORA_Z_RANKS
from ..quantize import SCALE_FLOOR
from ..rotation import check_divisible
from . import fallback
from ._runtime import INTERPRET, device_guard

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# FP contraction set explicitly, not left to Triton's default (announced to flip in 3.10): off, so the
# compiled kernel rounds each add and multiply as the interpreter the tests run does (the fp32 dot's
# fma are explicit and unaffected). The interpreter has no such option.
FP_FUSION = False
_FP_FUSION_OPTION = {} if INTERPRET else {"enable_fp_fusion": FP_FUSION}
# fp32 activations at g ≥ 256 take the torch path (kernels.act_quant.rotate_quantize_rows, the reference
# itself, so codes are those of every other backend): the fp32 FMA dot keeps each thread's rows of x and
# columns of H_64 in registers, and with 4 or 16 sub-blocks in flight it spilled 0.5–48 KB per thread on
# every target (bench/aot_check.py; 16-deep chained dots spilled as much). ComfyUI runs diffusion models in
# bf16/fp16, so fp32 here is rare; bf16/fp16 use the tensor-core dot and do not spill.
TORCH_FP32_MIN_GROUP = 256
_TILE_CACHE: dict[tuple, torch.Tensor] = {}


@triton.jit
def _rint(v, INTERPRET: tl.constexpr):
    if INTERPRET:
        return (v + 12582912.0) - 12582912.0  # fp32 add rounds half to even; |v| < 2**22
    else:
        return libdevice.rint(v)


@triton.jit
def _load_x(x_ptr, rows, rmask, stride_xm, col0, K, W: tl.constexpr):
    cols = col0 + tl.arange(0, W)
    ptrs = x_ptr + rows[:, None] * stride_xm + cols[None, :]
    return tl.load(ptrs, mask=rmask[:, None] & (cols < K)[None, :], other=0.0)


@triton.jit
def _h4(a0, a1, a2, a3):
    """One H4/2 butterfly stage across four sub-blocks: y_k = (a0 + a1 + a2 + a3)/2 − a_(3−k)."""
    half = (a0 + a1 + a2 + a3) * 0.5
    return half - a3, half - a2, half - a1, half - a0


@triton.jit
def _rot64(x_ptr, h, rows, rmask, stride_xm, col0, K, W: tl.constexpr):
    x = _load_x(x_ptr, rows, rmask, stride_xm, col0, K, W)
    return tl.dot(x.to(h.dtype), h, input_precision="ieee")


@triton.jit
def _rot256(x_ptr, h, rows, rmask, stride_xm, col0, K, W: tl.constexpr):
    """H_256 = H4 ⊗ H_64 applied to columns [col0, col0 + 4·W): the four rotated 64-wide sub-blocks."""
    return _h4(_rot64(x_ptr, h, rows, rmask, stride_xm, col0, K, W),
               _rot64(x_ptr, h, rows, rmask, stride_xm, col0 + W, K, W),
               _rot64(x_ptr, h, rows, rmask, stride_xm, col0 + 2 * W, K, W),
               _rot64(x_ptr, h, rows, rmask, stride_xm, col0 + 3 * W, K, W))


@triton.jit
def _emit(y, amax, scale, rows, rmask, q_ptr, stride_qm, col0, K, QUANTIZE: tl.constexpr, W: tl.constexpr,
          INTERPRET: tl.constexpr):
    """Pass 1 (QUANTIZE=False): fold |y| into the row amax. Pass 2: write the codes of these W columns."""
    if QUANTIZE:
        q = _rint(tl.math.div_rn(y, scale[:, None]), INTERPRET)
        q = tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int8)
        cols = col0 + tl.arange(0, W)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=rmask[:, None] & (cols < K)[None, :])
    else:
        amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
    return amax


@triton.jit
def _pass(x_ptr, h_ptr, q_ptr, rows, rmask, amax, scale, stride_xm, stride_qm, K,
          QUANTIZE: tl.constexpr, ROTATE: tl.constexpr, NSUB: tl.constexpr, W: tl.constexpr,
          INTERPRET: tl.constexpr):
    if not ROTATE:
        for k0 in range(0, K, W):
            y = _load_x(x_ptr, rows, rmask, stride_xm, k0, K, W).to(tl.float32)
            amax = _emit(y, amax, scale, rows, rmask, q_ptr, stride_qm, k0, K, QUANTIZE, W, INTERPRET)
    else:
        hr = tl.arange(0, W)
        h = tl.load(h_ptr + hr[:, None] * W + hr[None, :])  # the (W, W) tile, once per pass
        for k0 in range(0, K, NSUB * W):
            if NSUB == 1:  # g ≤ 64
                y = _rot64(x_ptr, h, rows, rmask, stride_xm, k0, K, W)
                amax = _emit(y, amax, scale, rows, rmask, q_ptr, stride_qm, k0, K, QUANTIZE, W, INTERPRET)
            elif NSUB == 4:  # g = 256
                y = _rot256(x_ptr, h, rows, rmask, stride_xm, k0, K, W)
                for s in tl.static_range(4):
                    amax = _emit(y[s], amax, scale, rows, rmask, q_ptr, stride_qm, k0 + s * W, K, QUANTIZE, W,
                                 INTERPRET)
            else:  # g = 1024 = H4 ⊗ H_256: a second H4 stage across the four 256-wide quarters
                b0 = _rot256(x_ptr, h, rows, rmask, stride_xm, k0, K, W)
                b1 = _rot256(x_ptr, h, rows, rmask, stride_xm, k0 + 4 * W, K, W)
                b2 = _rot256(x_ptr, h, rows, rmask, stride_xm, k0 + 8 * W, K, W)
                b3 = _rot256(x_ptr, h, rows, rmask, stride_xm, k0 + 12 * W, K, W)
                for s in tl.static_range(4):
                    y = _h4(b0[s], b1[s], b2[s], b3[s])
                    for quarter in tl.static_range(4):
                        amax = _emit(y[quarter], amax, scale, rows, rmask, q_ptr, stride_qm,
                                     k0 + (4 * quarter + s) * W, K, QUANTIZE, W, INTERPRET)
    return amax


@triton.jit
def _pass1_down(x_ptr, h_ptr, d_ptr, rows, rmask, stride_xm, K, R: tl.constexpr, BLOCK_M: tl.constexpr,
                W: tl.constexpr):
    """Pass 1 for g ≤ 64 with a LoRA down-projection: the rotated amax and z = x·downᵀ from the same
    x tiles (one more small dot per tile; the kernel is memory-bound, so it rides on the loads)."""
    hr = tl.arange(0, W)
    h = tl.load(h_ptr + hr[:, None] * W + hr[None, :])
    dr = tl.arange(0, R)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, W):
        x = _load_x(x_ptr, rows, rmask, stride_xm, k0, K, W).to(h.dtype)
        y = tl.dot(x, h, input_precision="ieee")
        amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
        d = tl.load(d_ptr + (k0 + hr)[:, None] * R + dr[None, :], mask=((k0 + hr) < K)[:, None], other=0.0)
        z = tl.dot(x, d, z, input_precision="ieee")
    return amax, z


@triton.jit
def _rotate_quant_kernel(x_ptr, h_ptr, q_ptr, s_ptr, d_ptr, z_ptr, M, K, stride_xm, stride_qm,
                         ROTATE: tl.constexpr, NSUB: tl.constexpr, BLOCK_M: tl.constexpr,
                         INTERPRET: tl.constexpr, R: tl.constexpr):
    W: tl.constexpr = 64
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    if R > 0:  # fused LoRA down-projection (g ≤ 64 only): z (M, R) float32
        amax, z = _pass1_down(x_ptr, h_ptr, d_ptr, rows, rmask, stride_xm, K, R, BLOCK_M, W)
        zr = tl.arange(0, R)
        tl.store(z_ptr + rows[:, None] * R + zr[None, :], z, mask=rmask[:, None])
    else:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)  # masked rows/columns load as 0: no effect on amax
        amax = _pass(x_ptr, h_ptr, q_ptr, rows, rmask, amax, amax, stride_xm, stride_qm, K,
                     False, ROTATE, NSUB, W, INTERPRET)
    scale = tl.maximum(tl.math.div_rn(amax, 127.0), 1e-30)
    tl.store(s_ptr + rows, scale, mask=rmask)
    _pass(x_ptr, h_ptr, q_ptr, rows, rmask, amax, scale, stride_xm, stride_qm, K,
          True, ROTATE, NSUB, W, INTERPRET)


_DOT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def launch_params(m: int, group_size: int, dot: str, rank: int = 0) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, num_stages) for M rows, group size g and the dot dtype name; every launch
    this can return is compiled for sm_80/86/89/90 by bench/aot_check.py and must not spill.
    - Memory-bound: small row blocks give many programs (M=4096 → 128–256 CTAs) and little register
      pressure. g = 256 keeps 4 sub-blocks of BLOCK_M×64 fp32 live: BLOCK_M 32 spilled on sm_8x (4 B per
      thread at a 128-register cap), 16 does not; g = 1024 keeps 16: BLOCK_M 16 and 8 warps.
    - Shared memory as compiled: fp16/bf16 13–73 KB with 3 stages; the fp32 FMA dot stages its operands
      through shared memory, 3 stages took up to 147 KB (g = 1024) against ~17 KB with 1.
    - Triton versions differ (bench/aot_check.py on 3.3/3.6/3.8/3.9): BLOCK_M 32 spilled with the fp32 FMA
      dot on 3.6 (g = 64, sm_90: 255 registers, 108/96 B) and with a fused LoRA down-projection (`rank`) on
      3.9 (r16, 4 B); BLOCK_M 16 is clean on all four, so those take 16 everywhere. g = 1024 with 3 stages
      spilled 4 B on 3.9 (sm_90); 2 stages are clean (149 registers) and still overlap the next load.
    """
    block_m = 16 if (m <= 2048 or group_size >= 256 or dot == "fp32" or rank) else 32
    stages = 1 if dot == "fp32" else (2 if group_size >= 1024 else 3)
    return block_m, (8 if group_size >= 1024 else 4), stages


def dot_dtype(x: torch.Tensor) -> torch.dtype:
    """fp16/bf16 activations feed the MMA directly (exact products); fp32 uses an IEEE fp32 dot.
    bf16 MMA needs sm80+, and the interpreter multiplies bf16 as raw uint16 bits: upcast there."""
    if x.dtype == torch.float16:
        return torch.float16
    if x.dtype == torch.bfloat16 and not INTERPRET and x.is_cuda and _bf16_mma(x.device):
        return torch.bfloat16
    return torch.float32


@torch.compiler.assume_constant_result   # a device property: a constant for dynamo, not traced per call
def _bf16_mma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def rotation_tile(group_size: int, device, dtype: torch.dtype) -> torch.Tensor:
    """The 64×64 matrix the kernel multiplies by: I_(64/g) ⊗ H_g for g ≤ 64, H_64 for g ≥ 256."""
    key = (group_size, str(device), dtype)
    tile = _TILE_CACHE.get(key)
    if tile is None:
        h = hadamard(min(group_size, 64), device, torch.float32)
        if group_size < 64:
            h = torch.kron(torch.eye(64 // group_size, device=device), h)
        tile = _TILE_CACHE[key] = h.to(dtype).contiguous()
    return tile


# Widths of z the fused down-projection takes (tl.dot needs ≥ 16; up to 256 compiles without spills:
# bench/aot_check.py).
DOWN_RANKS = LORA_Z_RANKS


def fuses_down(x: torch.Tensor, group_size: int | None, rank: int) -> bool:
    """Whether rotate_quantize_triton can also compute a LoRA down-projection of this rank for x: g ≤ 64
    and an fp16/bf16 tensor-core dot. The fp32 FMA dot (fp32 activations) spills with the extra BLOCK_M×R
    accumulator (264–1650 B at rank 128, 136 B at rank 16 on sm_90: bench/aot_check.py), so fp32 stays
    unfused; the interpreter, whose dot is always fp32, runs it for the tests."""
    if x.dim() != 2 or x.dtype not in INPUT_DTYPES or not group_size or group_size > 64 or rank not in DOWN_RANKS:
        return False
    return INTERPRET or dot_dtype(x) != torch.float32


def rotate_quantize_triton(x: torch.Tensor, group_size: int, down_t: torch.Tensor | None = None):
    """Fused group-wise rotation (group_size 0 = none) and per-row INT8 quantization of a 2-D x.

    With `down_t` (K, R), R in DOWN_RANKS, in `dot_dtype(x)` (g ≤ 64 only) it also returns
    z = x·down_t in float32 (M, R), a LoRA's down-projection, computed from the same loads of x."""
    if x.dim() != 2 or x.dtype not in INPUT_DTYPES:
        raise ValueError(f"rotate_quantize expects a 2-D float32/bfloat16/float16 tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    m, k = x.shape
    if group_size:
        check_group_size(group_size)
        check_divisible(k, group_size)
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    rank = 0
    z = None
    if down_t is not None:
        rank = down_t.shape[1]
        if not fuses_down(x, group_size, rank) or down_t.shape[0] != k or down_t.dtype != dot_dtype(x):
            raise ValueError(f"fused down-projection needs g <= 64, rank in {DOWN_RANKS} and a ({k}, R) operand "
                             f"in {dot_dtype(x)}; got g={group_size}, {down_t.dtype} {tuple(down_t.shape)}")
        down_t = down_t.contiguous()
        z = torch.empty((m, rank), dtype=torch.float32, device=x.device)   # the kernel writes every row
    if m == 0 or k == 0:
        s.fill_(SCALE_FLOOR)
        return (q, s) if z is None else (q, s, z.zero_())
    dot = dot_dtype(x)
    if x.dtype == torch.float32 and group_size >= TORCH_FP32_MIN_GROUP:
        return rotate_quantize_rows(x, group_size)
    h = rotation_tile(group_size, x.device, dot) if group_size else s  # s: unused placeholder pointer
    block_m, warps, stages = launch_params(m, group_size, _DOT_NAMES[dot], rank)
    grid = (triton.cdiv(m, block_m),)
    with device_guard(x):
        _rotate_quant_kernel[grid](
            x, h, q, s, down_t if z is not None else s, z if z is not None else s, m, k, x.stride(0), q.stride(0),
            ROTATE=bool(group_size), NSUB=max(1, group_size // 64), BLOCK_M=block_m, INTERPRET=INTERPRET,
            R=rank, num_warps=warps, num_stages=stages, **_FP_FUSION_OPTION)
    fallback.launched("rotate_quantize_down" if z is not None else "rotate_quantize")
    return (q, s) if z is None else (q, s, z)
