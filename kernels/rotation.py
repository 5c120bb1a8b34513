"""Group-wise ConvRot rotation of the last dimension: x[..., j*g:(j+1)*g] ← x[..., j*g:(j+1)*g] · H_g.

Two CPU/torch paths with the same result up to float rounding:
- `rotate_matmul`: one batched GEMM against the dense H_g (g MACs per element). It is the one
  convert-to-quant and comfy-kitchen use, so the converter uses it to produce bit-identical codes.
- `rotate_fwht`: the fast Walsh–Hadamard butterfly. H_g = ⊗(H4/2) and H4/2·v = sum(v)/2 − reverse(v),
  so each of the log4(g) stages is one sum and one flip per 4 elements (O(log g) work per element).
`rotate` picks the faster one for the device; the fused GPU kernels live in kernels/triton/.
"""
from __future__ import annotations

import torch

from .hadamard import check_group_size, hadamard


def check_divisible(n: int, group_size: int, what: str = "last dimension") -> None:
    if n % group_size:
        raise ValueError(
            f"ConvRot group size {group_size} does not divide the {what} ({n}): "
            f"use a group size that divides it, or keep this layer unrotated/high precision")


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    check_group_size(group_size)
    check_divisible(x.shape[-1], group_size)
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def rotate_matmul(x: torch.Tensor, group_size: int, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense block rotation. Same op order as convert-to-quant's `rotate_weight` (x_grouped @ Hᵀ)."""
    dtype = compute_dtype or x.dtype
    # Contiguous first: BLAS takes another path for a strided batch, and the result must not depend on
    # the input's layout (a column slice of a wider tensor gives the same codes and scales bit for bit).
    xg = _grouped(x.to(dtype).contiguous(), group_size)
    h = hadamard(group_size, x.device, dtype)
    return torch.matmul(xg, h.T).reshape(x.shape)


def rotate_fwht(x: torch.Tensor, group_size: int, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Butterfly rotation: log4(g) stages of y = sum(v)/2 − reverse(v) over axes of size 4."""
    dtype = compute_dtype or x.dtype
    xg = _grouped(x.to(dtype), group_size)
    stages = (group_size.bit_length() - 1) // 2
    y = xg.reshape(*xg.shape[:-1], *([4] * stages))
    for axis in range(y.dim() - stages, y.dim()):
        y = y.sum(dim=axis, keepdim=True).mul_(0.5) - y.flip(axis)
    return y.reshape(x.shape)


def rotate(x: torch.Tensor, group_size: int, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate with the faster path for the device: on CPU the dense GEMM (BLAS beats several
    memory-bound butterfly passes), elsewhere the butterfly (fewer FLOPs, no g×g operand)."""
    if x.device.type == "cpu":
        return rotate_matmul(x, group_size, compute_dtype)
    return rotate_fwht(x, group_size, compute_dtype)
