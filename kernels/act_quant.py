"""The torch rotate + per-token quantize of activations: the reference every fused kernel matches, and
the path of the backends (and shapes) without one. Below linear.py and the Triton wrappers, which both
use it, so neither imports the other for it."""
from __future__ import annotations

import torch

from .quantize import quantize_rowwise
from .rotation import rotate

# Elements rotated and quantized per block on the torch path: ~2 MB of float32 stays in L2/L3
# (measured on a 2-core Zen3: 3-5x faster than one whole-tensor pass at 4096 tokens).
ROTATE_QUANT_ELEMENTS = 1 << 19


def rotated(x2: torch.Tensor, group_size) -> torch.Tensor:
    """x2 rotated group-wise in float32 (group_size None/0: not rotated, just float32)."""
    return rotate(x2, group_size, torch.float32) if group_size else x2.float()


def rotate_quantize_rows(x2: torch.Tensor, group_size, rows: int | None = None):
    """Rotate + per-token quantize, a block of rows at a time: the float32 temporaries stay in cache
    instead of costing a fresh multi-MB allocation (and its page faults) per call. Row-wise ops only,
    so the result does not depend on the block size."""
    m = x2.shape[0]
    rows = rows or max(16, ROTATE_QUANT_ELEMENTS // max(1, x2.shape[1]))
    if m <= rows:
        return quantize_rowwise(rotated(x2, group_size))
    qx = torch.empty(x2.shape, dtype=torch.int8, device=x2.device)
    sx = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    for start in range(0, m, rows):
        block = slice(start, min(start + rows, m))
        qx[block], sx[block] = quantize_rowwise(rotated(x2[block], group_size))
    return qx, sx
