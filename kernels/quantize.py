"""Symmetric INT8 quantization of ConvRot-rotated tensors (float32 math, round half to even).

The formulas are the format's contract (../shared/FORMAT.md) and match convert-to-quant and
comfy-kitchen op for op, so the codes and scales are bit-identical:
    scale = max(|x_row|) / 127  (clamped below at 1e-30, float32)
    q     = round_half_even(x / scale).clamp(-128, 127)
"""
from __future__ import annotations

import torch

from .hadamard import check_group_size
from .rotation import check_divisible, rotate_matmul

SCALE_FLOOR = 1e-30
# Rows per chunk when quantizing a weight: bounds the float32 temporaries to a few MB per chunk.
WEIGHT_CHUNK_ELEMENTS = 1 << 22


class NonFiniteError(ValueError):
    """A weight holds NaN or Inf: quantizing it would silently produce garbage codes."""


def check_finite(x: torch.Tensor, name: str = "tensor") -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(
            f"{name} has {bad} NaN/Inf value(s) of {x.numel()}: the source checkpoint is damaged or was "
            "saved after a diverged training step; fix or re-export it before quantizing")


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) symmetric quantization: int8 codes and float32 scales of shape (..., 1)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = (amax.float() / 127.0).clamp(min=SCALE_FLOOR)
    divisor = scale.to(x.dtype)
    # A scale that underflows in x's dtype would divide by zero; peers use the dtype's tiny.
    divisor = torch.where(divisor == 0, torch.full_like(divisor, torch.finfo(x.dtype).tiny), divisor)
    q = (x / divisor).round_().clamp_(-128.0, 127.0).to(torch.int8)
    return q, scale


def quantize_tensorwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor (convert-to-quant's tensor mode: max/127, codes in ±127)."""
    scale = (x.abs().max().float().clamp_min(1e-12) / 127.0)
    q = (x.float() * (1.0 / scale)).clamp_(-127.0, 127.0).round_().to(torch.int8)
    return q, scale.reshape(())


def quantize_weight(weight: torch.Tensor, group_size: int | None, scaling: str = "row",
                    name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate a Linear weight (out, in) group-wise and quantize it.

    group_size None/0 quantizes without rotation. Row scaling works in row chunks so a
    10240×3840 layer needs only a few MB of float32 temporaries beyond its output.
    """
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D Linear weight, got shape {tuple(weight.shape)}")
    check_finite(weight, name)
    if group_size:
        check_group_size(group_size)
        check_divisible(weight.shape[1], group_size, f"input dimension of {name}")
    rotate = (lambda w: rotate_matmul(w, group_size, torch.float32)) if group_size else (lambda w: w.float())
    if scaling == "tensor":
        return quantize_tensorwise(rotate(weight))
    if scaling != "row":
        raise ValueError(f"unknown scaling {scaling!r}: use 'row' (recommended) or 'tensor'")
    out_features = weight.shape[0]
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty((out_features, 1), dtype=torch.float32, device=weight.device)
    step = max(1, WEIGHT_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, out_features, step):
        rows = slice(start, min(start + step, out_features))
        codes[rows], scales[rows] = quantize_rowwise(rotate(weight[rows]))
    return codes, scales


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, group_size: int | None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W ≈ (q · scale) · H_g group-wise, in float32, then cast to `dtype` (comfy-kitchen's order).

    A scale with the codes' rank (or one value) broadcasts as it is, as comfy-kitchen's `codes * scale`
    (N-D codes, e.g. stacked experts); a flat per-row scale of 2-D codes is read as (out, 1)."""
    scale = scale.float()
    if codes.dim() == 2 and scale.dim() != 2 and scale.numel() == codes.shape[0]:
        scale = scale.reshape(-1, 1)
    w = codes.float() * scale
    if group_size:
        w = rotate_matmul(w, group_size, torch.float32)
    return w.to(dtype)
