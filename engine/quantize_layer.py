"""Quantizing one Linear weight as the converter stores it, streaming row chunks, with its error.

The codes are bit-identical to convert-to-quant (`ctq --int8 --scaling_mode row --simple --convrot`):
- rotated, row scales: x·Hᵀ per group by one float32 matmul, then `kernels.quantize_rowwise`'s ops
  (scale = max|row|/127 floored at 1e-30, codes = round_half_even(x/scale) in [-128, 127]);
- not rotated (input not divisible by the group), row scales: ctq's TensorWiseINT8Layout formula,
  scale = 1 / (127 / max|row|), codes clamped to ±127 then rounded, which is not the ConvRot formula;
- tensor scales (one scale per matrix): `kernels.quantize_weight(..., scaling="tensor")`.

Row scales never need the whole matrix: rows are read, rotated and quantized a chunk (~4 MB of
float32) at a time and the int8 codes handed to a sink in order, so memory does not grow with the
layer. On CPU the chunks are spread over worker threads while torch ops run single-threaded
(`compute_threads`): no OpenMP barrier per small op, so a core busy with another process slows one
worker instead of every op. The relative error ‖W − dequant(Q)‖ / ‖W‖ is measured in the rotated
basis, where it is the same (the rotation is orthonormal) and costs no second rotation.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels import hadamard, quantize_weight, rotate_matmul
from ..kernels.quantize import SCALE_FLOOR, NonFiniteError, check_finite
from ..kernels.rotation import check_divisible
from .format import LayerQuant

CPU_CHUNK_ELEMENTS = 1 << 20      # 4 MB of float32 per scratch buffer: stays near the cache
GPU_CHUNK_ELEMENTS = 1 << 24      # 64 MB per scratch buffer

RowReader = Callable[[int, int], torch.Tensor]     # (start, stop) -> rows [start, stop) of the weight
CodeSink = Callable[[torch.Tensor], None]          # receives int8 code rows in order


@dataclass
class QuantizedWeight:
    codes: torch.Tensor | None   # int8 (out, in) on CPU; None when the codes went to a sink
    scale: torch.Tensor          # float32 (out, 1) for row scales, () for tensor scales or a 1-row layer
    rel_error: float


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return device


class _Workspace:
    """Scratch buffers reused across chunks and layers, one set per thread: no allocation (and no
    page faults) per chunk, which on CPU would cost more than the arithmetic."""

    def __init__(self):
        self._local = threading.local()

    def get(self, key: str, n: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
        bufs = self._local.__dict__.setdefault("bufs", {})
        buf = bufs.get((key, device, dtype))
        if buf is None or buf.numel() < n:
            buf = bufs[(key, device, dtype)] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]

    def release(self):
        """Drop this thread's buffers (GPU buffers must not outlive a conversion inside ComfyUI)."""
        self._local.__dict__.pop("bufs", None)


WORKSPACE = _Workspace()
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="int8-convrot")
        return _POOL


@contextmanager
def compute_threads(device: torch.device):
    """For a conversion on CPU: torch ops single-threaded, row chunks over as many worker threads as
    torch had intra-op threads (yielded); restored afterwards. The calling thread's scratch buffers
    are released at the end (on a GPU they would hold memory inside ComfyUI)."""
    n = torch.get_num_threads() if device.type == "cpu" else 1
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield n
    finally:
        if device.type == "cpu":
            torch.set_num_threads(n)
        WORKSPACE.release()


def _non_finite(read_rows: RowReader, shape, name: str):
    """Count the NaN/Inf values (a second pass, only after a bad scale showed there are some)."""
    step, bad = max(1, CPU_CHUNK_ELEMENTS // max(1, shape[1])), 0
    for start in range(0, shape[0], step):
        bad += int((~torch.isfinite(read_rows(start, min(shape[0], start + step)).float())).sum())
    if bad:
        raise NonFiniteError(f"{name} has {bad} NaN/Inf value(s) of {shape[0] * shape[1]}: the source checkpoint "
                             "is damaged or was saved after a diverged training step; fix or re-export it "
                             "before quantizing")
    raise NonFiniteError(f"{name}: values too large to rotate in float32 (the rotated weight overflows); "
                         "the source checkpoint is damaged")


def _chunk(read_rows: RowReader, start: int, stop: int, in_f: int, g: int | None, device: torch.device):
    """Quantize rows [start, stop): int8 codes (CPU), float32 scales (r, 1), squared error and norm."""
    r, n = stop - start, (stop - start) * in_f
    x = WORKSPACE.get("x", n, device).view(r, in_f)
    x.copy_(read_rows(start, stop))
    if g:   # x · Hᵀ per group: the op convert-to-quant runs (same result as kernels.rotate_matmul)
        y = WORKSPACE.get("y", n, device).view(r, in_f)
        torch.matmul(x.view(r, in_f // g, g), hadamard(g, device, torch.float32).T, out=y.view(r, in_f // g, g))
    else:
        y = x
    q = WORKSPACE.get("q", n, device).view(r, in_f)
    amax = torch.abs(y, out=q).amax(dim=1, keepdim=True)     # 10x faster than aminmax on CPU
    ref2 = torch.linalg.vector_norm(y).double().square()
    if g:   # kernels.quantize_rowwise, op for op
        scale = (amax / 127.0).clamp_(min=SCALE_FLOOR)
        y.div_(scale)
        torch.round(y, out=q).clamp_(-128.0, 127.0)
    else:   # convert-to-quant's TensorWiseINT8Layout
        quant_scale = 127.0 / amax.clamp_min(1e-12)
        scale = 1.0 / quant_scale
        y.mul_(quant_scale)
        torch.clamp(y, -127.0, 127.0, out=q).round_()
    codes = q.to(torch.int8)
    y.sub_(q)   # the error of q·scale against the rotated rows, in units of each row's scale
    err2 = (torch.linalg.vector_norm(y, dim=1, keepdim=True) * scale).double().square().sum()
    return codes.cpu(), scale, err2, ref2


def quantize_rows(read_rows: RowReader, shape, quant: LayerQuant, *, sink: CodeSink | None = None,
                  device: torch.device | str = "cpu", workers: int = 1, name: str = "weight") -> QuantizedWeight:
    """Row-scaled quantization of an (out, in) weight read in row chunks by `read_rows`.

    Codes go to `sink` in row order (then `codes` is None) or into one tensor. Raises
    kernels.NonFiniteError for NaN/Inf weights.
    """
    device = resolve_device(device)
    out_f, in_f = (int(s) for s in shape)
    g = quant.group_size
    if g:
        check_divisible(in_f, g, f"input dimension of {name}")
    step = max(1, (CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS) // max(1, in_f))
    codes = None if sink is not None else torch.empty((out_f, in_f), dtype=torch.int8)
    scales = torch.empty((out_f, 1), dtype=torch.float32, device=device)
    acc = torch.zeros(2, dtype=torch.float64, device=device)

    def take(start, result):
        c, s, e2, r2 = result
        scales[start: start + c.shape[0]] = s
        acc[0] += e2
        acc[1] += r2
        if sink is not None:
            sink(c)
        else:
            codes[start: start + c.shape[0]] = c

    starts = range(0, out_f, step)
    workers = max(1, min(workers, len(starts))) if device.type == "cpu" else 1
    if workers == 1:
        for start in starts:
            take(start, _chunk(read_rows, start, min(start + step, out_f), in_f, g, device))
    else:   # in order: at most workers+1 chunks in flight, written as soon as their turn comes
        pool, pending = _pool(workers), deque()
        try:
            for start in starts:
                pending.append((start, pool.submit(_chunk, read_rows, start, min(start + step, out_f), in_f, g,
                                                   device)))
                if len(pending) > workers:
                    s0, fut = pending.popleft()
                    take(s0, fut.result())
            while pending:
                s0, fut = pending.popleft()
                take(s0, fut.result())
        finally:
            for _, fut in pending:
                fut.cancel()
            for _, fut in pending:
                if not fut.cancelled():
                    fut.exception()     # wait: no worker may outlive the call that owns its reader
    if not bool(torch.isfinite(scales).all()):   # NaN/Inf anywhere in a row makes its scale NaN/Inf
        _non_finite(read_rows, (out_f, in_f), name)
    err2, ref2 = acc.tolist()
    scales = scales.cpu()
    if scales.numel() == 1:      # convert-to-quant stores a 1-element scale as a scalar
        scales = scales.reshape(())
    return QuantizedWeight(codes, scales, (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0)


def quantize_layer(weight: torch.Tensor, quant: LayerQuant, *, device: torch.device | str = "cpu",
                   name: str = "weight", workers: int = 1, sink: CodeSink | None = None) -> QuantizedWeight:
    """Quantize a 2-D weight held in memory (any float dtype, scale already applied) as `quant` says."""
    device = resolve_device(device)
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D Linear weight, got shape {tuple(weight.shape)}")
    if quant.per_row:
        return quantize_rows(lambda a, b: weight[a:b], weight.shape, quant, sink=sink, device=device,
                             workers=workers, name=name)
    w = weight.to(device)
    g = quant.group_size
    check_finite(w, name)
    codes, scale = quantize_weight(w, g, "tensor", name)
    ref = rotate_matmul(w, g, torch.float32) if g else w.float()
    err = codes.float().mul_(scale).sub_(ref).norm() / ref.norm().clamp_min(1e-30)
    codes = codes.cpu()
    if sink is not None:
        sink(codes)
        codes = None
    return QuantizedWeight(codes, scale.cpu().reshape(()), float(err))


__all__ = ["NonFiniteError", "QuantizedWeight", "compute_threads", "quantize_layer", "quantize_rows",
           "resolve_device"]
