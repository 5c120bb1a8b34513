"""Lookup in an INT8 ConvRot embedding table (codes (num, dim) of the rotated rows, row scales).

Only the looked-up rows are gathered and dequantized: a 151936×2560 table stays one byte per value
and a prompt of T tokens costs T·dim work, not the whole table. The per-row math is exactly
`dequantize_weight`'s (codes·scale in float32, then the group-wise un-rotation), so a lookup is
bit-identical to dequantizing the whole table and indexing it.
"""
from __future__ import annotations

import torch

from .quantize import dequantize_weight


def embedding_lookup(ids: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group_size: int | None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `ids` (any shape of integer indices) of the dequantized table, shape ids.shape + (dim,).

    The gather runs where the table is (an offloaded table stays on the CPU: only the selected
    rows travel); the rows are dequantized on `ids`'s device."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"expected int8 embedding codes of shape (num, dim), got {codes.dtype} {tuple(codes.shape)}")
    flat = ids.reshape(-1).to(device=codes.device, dtype=torch.long)
    rows = codes.index_select(0, flat)
    scales = scale.reshape(-1, 1)
    if scales.shape[0] > 1:
        scales = scales.index_select(0, flat.to(scales.device))
    rows, scales = rows.to(ids.device), scales.to(ids.device)
    out = dequantize_weight(rows, scales, group_size, torch.float32)
    return out.to(dtype).reshape(*ids.shape, codes.shape[1])
