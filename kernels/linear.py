"""y = x·Wᵀ + b for a ConvRot-INT8 weight (codes int8 (N, K), per-row float32 scales (N, 1)).

Because H_g is orthonormal, x·Wᵀ = rot(x)·W_rotᵀ, and the stored codes are W_rot/scale. So the
weight is never un-rotated at run time: the activation is rotated instead (M·K·g work, not N·K·g).

Modes
- w8a16: rotate x, then GEMM in x's dtype against codes·scale materialized one tile of rows at a
  time (a layer never needs a full high-precision copy of its weight).
- w8a8: rotate x, quantize it per token (dynamic, symmetric), int8×int8→int32 GEMM, rescale by
  token-scale × row-scale, add bias, cast to x's dtype.
- auto: w8a8 where an int8 GEMM is fast and M is large enough to be compute-bound, else w8a16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends
from .act_quant import rotate_quantize_rows, rotated
from .cpu_prepack import cpu_int8_gemm, row_scales as _row_scales
from .hadamard import check_group_size
from .lora_ranks import LORA_UP_RANKS
from .rotation import check_divisible

MODES = ("auto", "w8a8", "w8a16")
# Rows of the weight materialized at once in w8a16: 2048×3840 bf16 is 15 MB.
W8A16_TILE_ELEMENTS = 1 << 23
# Below this many tokens a GEMM is bandwidth-bound: reading int8 and widening wins over
# quantizing the activation (the same crossover other int8 libraries use for GEMV paths).
W8A8_MIN_TOKENS = 16


def resolve_mode(mode: str, x: torch.Tensor, tokens: int) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown INT8 compute mode {mode!r}; choose one of {MODES}")
    if mode == "w8a16" or (mode == "w8a8" and (x.device.type == "cpu" or backends.forced_backend() is not None)):
        return mode
    if mode == "w8a8":   # asked for, but this device has no W8A8 route: W8A16 (its log line said why once)
        return "w8a8" if backends.route_w8a8(x.device) else "w8a16"
    if tokens < W8A8_MIN_TOKENS:
        return "w8a16"
    if x.device.type == "cpu":
        if backends.forced_backend() is not None:  # a forced backend is what the caller wants measured
            return "w8a8"
        from .cpu_int8_gemm import fast_backend_available
        return "w8a8" if fast_backend_available() else "w8a16"
    return "w8a8" if backends.route_w8a8(x.device) else "w8a16"


def _check(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group_size) -> None:
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"expected int8 codes of shape (out, in), got {codes.dtype} {tuple(codes.shape)}")
    if x.shape[-1] != codes.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features but the INT8 weight expects {codes.shape[1]}")
    if scale.numel() not in (1, codes.shape[0]):
        raise ValueError(f"weight scale of shape {tuple(scale.shape)} is neither per-row ({codes.shape[0]}) "
                         "nor per-tensor")
    if group_size:
        check_group_size(group_size)
        check_divisible(codes.shape[1], group_size, "input dimension")


def linear_w8a16(x2: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias, group_size,
                 out_dtype: torch.dtype) -> torch.Tensor:
    xr = rotated(x2, group_size).to(out_dtype)
    if bias is not None:  # F.linear wants one dtype; the output's, as comfy-kitchen casts its bias
        bias = bias.to(out_dtype)
    n, k = codes.shape
    scales = _row_scales(scale, n).to(out_dtype)
    step = max(1, W8A16_TILE_ELEMENTS // max(1, k))
    if step >= n:
        return F.linear(xr, codes.to(out_dtype) * scales, bias)
    out = torch.empty((x2.shape[0], n), dtype=out_dtype, device=x2.device)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        out[:, rows] = F.linear(xr, codes[rows].to(out_dtype) * scales[rows],
                                None if bias is None else bias[rows])
    return out


def _gemm_rescale_torch(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias, out_dtype):
    y = acc.float().mul_(sx).mul_(sw.reshape(1, -1))
    if bias is not None:
        y.add_(bias.float())
    return y.to(out_dtype)


def linear_w8a8(x2: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias, group_size,
                out_dtype: torch.dtype, packed=None, lora=None, cache=None) -> torch.Tensor:
    n = codes.shape[0]
    sw = _row_scales(scale, n)
    backend = backends.select_gemm_backend(x2.device)
    if lora is not None:
        if backend != "triton":
            raise ValueError("a fused LoRA needs the Triton backend (check fuses_lora first)")
        from .triton import linear_lora
        return linear_lora(x2.contiguous(), codes, sw, bias, group_size, out_dtype, *lora)
    if backend == "ck_hip":   # AMD: comfy-kitchen's HIP kernels; a call they decline runs the route's fallback
        from . import ck_hip
        y = ck_hip.int8_linear(x2, codes, sw, bias, group_size, out_dtype)
        if y is not None:
            return y
        backend = backends.route_fallback(x2.device)
        if backend is None:
            return linear_w8a16(x2, codes, scale, bias, group_size, out_dtype)
    if backend == "triton":
        from .triton import int8_gemm_rescale, rotate_quantize
        qx, sx = rotate_quantize(x2, group_size)
        return int8_gemm_rescale(qx, sx, codes, sw, bias, out_dtype)
    qx, sx = rotate_quantize_rows(x2, group_size)
    if backend == "cpu":
        if packed is not None:   # a caller's own pack (benchmarks, comfy-kitchen's backend): eager only
            # (else the custom op, which torch.compile traces as one node, with the layer's cached pack)
            from .cpu_int8_gemm import int8_gemm_rowscaled
            return int8_gemm_rowscaled(qx, sx, packed, bias, out_dtype)
        return cpu_int8_gemm(qx, sx, codes, scale, bias, out_dtype, cache)
    if backend == "int_mm":
        return _gemm_rescale_torch(torch._int_mm(qx, codes.t()), sx, sw, bias, out_dtype)
    # reference: exact integer accumulation in float64 (|sum| < 2**53 for any K below 5e11).
    acc = qx.double() @ codes.double().t()
    return _gemm_rescale_torch(acc, sx, sw, bias, out_dtype)


def fuses_lora(x: torch.Tensor, group_size: int | None, z_rank: int, up_rank: int, mode: str = "auto") -> bool:
    """Whether `int8_linear(..., lora=(down_t, up, zcol))` can fuse a LoRA for x (z of `z_rank` columns, up
    of `up_rank`): W8A8 on the Triton backend at group size ≤ 64 (kernels/triton: down-projection in the
    rotate+quant pass, up-projection in the GEMM epilogue), and on a GPU only where the epilogue keeps the
    GEMM's largest tile. Elsewhere the caller adds the update to the output."""
    if up_rank not in LORA_UP_RANKS:
        return False
    tokens = x.numel() // max(1, x.shape[-1])
    if tokens == 0 or resolve_mode(mode, x, tokens) != "w8a8" or backends.select_gemm_backend(x.device) != "triton":
        return False
    from .triton.rotate_quant import fuses_down
    if not fuses_down(x.reshape(-1, x.shape[-1]), group_size, z_rank):
        return False
    return not x.is_cuda or _lora_keeps_best_tile(x.device, up_rank)


@torch.compiler.assume_constant_result   # device properties: a constant for dynamo, not traced per call
def _lora_keeps_best_tile(device: torch.device, up_rank: int) -> bool:
    from .triton import gemm_configs
    return gemm_configs.lora_keeps_best_tile(torch.cuda.get_device_capability(device),
                                             gemm_configs.device_smem_limit(device), up_rank)


def lora_operand_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the fused LoRA operands for x: the Triton rotation's dot dtype (x's on sm80+; float32
    for fp32 x, and under the interpreter, which multiplies bf16 as raw bits)."""
    from .triton.rotate_quant import dot_dtype
    return dot_dtype(x.reshape(-1, x.shape[-1]))


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                group_size: int | None = 64, mode: str = "auto", *, packed=None, cache=None,
                out_dtype: torch.dtype | None = None, lora=None) -> torch.Tensor:
    """ConvRot-INT8 linear layer. `group_size` None/0 means the codes are not rotated.

    On the CPU GEMM the weight is prepacked: `cache` (a `PrepackCache`, one per layer) keeps that pack across
    calls, eager and compiled alike; `packed` is a pack the caller made itself (see `prepack`; eager only).
    `lora` = (down_t (K, RZ), up (N, R), zcol int32 (N,)) adds z = x·down_t, z[:, zcol[n]:zcol[n]+R]·up[n]
    to each output column n inside the W8A8 Triton pass (only where `fuses_lora(x, group_size, RZ, R, mode)`).
    """
    _check(x, codes, scale, group_size)
    out_dtype = out_dtype or (x.dtype if x.is_floating_point() else torch.float32)
    x2 = x.reshape(-1, x.shape[-1])
    if bias is not None:
        bias = bias.to(device=x.device)
    chosen = resolve_mode(mode, x, x2.shape[0])
    if lora is not None and not fuses_lora(x, group_size, lora[0].shape[1], lora[1].shape[1], mode):
        raise ValueError("this call cannot fuse a LoRA (check fuses_lora first)")
    if x2.shape[0] == 0:
        y = x2.new_zeros((0, codes.shape[0]), dtype=out_dtype)
    elif chosen == "w8a16":
        y = linear_w8a16(x2, codes, scale, bias, group_size, out_dtype)
    else:
        y = linear_w8a8(x2, codes, scale, bias, group_size, out_dtype, packed, lora, cache)
    return y.reshape(*x.shape[:-1], codes.shape[0])


def prepack(codes: torch.Tensor, scale: torch.Tensor):
    """Backend-specific packed weight for repeated w8a8 calls on CPU (None where nothing to pack)."""
    if codes.device.type != "cpu":
        return None
    from .cpu_int8_gemm import fast_backend_available, pack_int8_weight
    return pack_int8_weight(codes, _row_scales(scale, codes.shape[0])) if fast_backend_available() else None
