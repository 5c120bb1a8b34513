"""Per-layer quality numbers of an INT8 ConvRot model: which layers lose how much. No ComfyUI
imports; the Inspect node renders what these functions return.

Three numbers per quantized Linear, each with an honest name:
- `estimated`: relative weight error predicted from the codes and scales alone (no original
  needed). Rounding to the nearest code leaves an error uniform in ±scale/2, i.e. scale²/12 per
  value; the stored weight's energy is Σ (q·scale)² (the Hadamard rotation is orthonormal, so both
  are the same in the rotated and the original basis). estimated = sqrt(Σ_rows in·s²/12 / Σ (q·s)²).
  Row-wise scales keep it near 1/(√12·rms(q)); one tensor-wise scale makes every small row pay for
  the largest one, which is what the plot shows for waxy tensor-wise files. Values much smaller
  than the scale round to 0 with an error below scale/2, so it is an upper-side estimate.
- `weight_error` (bf16 source given): ||dequantize(q, s) − W|| / ||W||, measured.
- `output_error` (bf16 source given): ||int8_linear(X) − X·Wᵀ|| / ||X·Wᵀ|| on seeded random
  N(0, 1) activations X (bias left out: it is exact), in the compute mode the loader would use —
  "w8a8" also quantizes the activations per token, "w8a16" only dequantizes the weight.

Layers come one at a time (`iter_file_layers` reads one layer's codes with positioned reads;
`iter_module_layers` walks a loaded model), so a 12 GB model never sits in memory twice.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from ..kernels import dequantize_weight, int8_linear, use_backend
from .errors import FileFormatError
from .format import INT8_FORMAT, QUANT_SUFFIX, SCALE_SUFFIX, convrot_group_size
from .safetensors_header import read_header
from .safetensors_writer import ST_TO_TORCH
from .sources import DM_PREFIX, Source

METRICS = {
    "estimated": "estimated relative weight error (rounding model, from codes and scales only)",
    "weight_error": "relative weight error vs the bf16 source (measured)",
    "output_error": "relative output error on random N(0,1) activations (measured)",
}
# Rows per chunk for the code statistics: bounds the float temporaries to a few MB.
_CHUNK_ELEMENTS = 1 << 22
Progress = Callable[[int, int, str], None]   # (done layers, total layers, layer name)


@dataclass
class QuantLayer:
    """One quantized Linear as stored: int8 codes (out, in), float32 scale (out, 1) or (), group size."""
    name: str                      # layer name without a checkpoint prefix ("layers.0.attention.qkv")
    codes: torch.Tensor
    scale: torch.Tensor
    group_size: int | None

    @property
    def per_row(self) -> bool:
        return self.scale.numel() > 1


@dataclass
class LayerQuality:
    name: str
    shape: tuple[int, int]
    group_size: int | None
    scaling: str                   # "row" or "tensor"
    estimated: float
    weight_error: float | None = None
    output_error: float | None = None

    @property
    def kind(self) -> str:
        return layer_kind(self.name)


@dataclass
class QualityReport:
    layers: list[LayerQuality] = field(default_factory=list)
    source: str | None = None          # the bf16 original the errors were measured against
    tokens: int = 0
    mode: str | None = None
    seed: int = 0
    not_in_source: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> list[str]:
        """The metrics every layer has, in plot order."""
        out = ["estimated"]
        if self.layers and all(r.weight_error is not None for r in self.layers):
            out = ["weight_error", "output_error"] if all(r.output_error is not None for r in self.layers) \
                else ["weight_error"]
        return out

    def values(self, metric: str) -> list[float]:
        return [getattr(r, metric) for r in self.layers]

    def stats(self, metric: str) -> dict | None:
        vals = [(getattr(r, metric), r.name) for r in self.layers if getattr(r, metric) is not None]
        if not vals:
            return None
        xs = sorted(v for v, _ in vals)
        mid = len(xs) // 2
        median = xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2
        worst, where = max(vals)
        return {"mean": sum(xs) / len(xs), "median": median, "worst": worst, "worst_layer": where}

    def worst(self, metric: str, n: int = 5) -> list[LayerQuality]:
        return sorted((r for r in self.layers if getattr(r, metric) is not None),
                      key=lambda r: -getattr(r, metric))[:n]

    def metric_label(self, metric: str) -> str:
        if metric == "output_error":
            return (f"relative output error on {self.tokens} random N(0,1) activation rows, {self.mode} "
                    "(measured)")
        return METRICS[metric]

    def headline(self) -> list[str]:
        """Two or three short lines for the node's badge."""
        if not self.layers:
            return ["no INT8 layers to measure"]
        names = {"estimated": "est. weight error", "weight_error": "weight error", "output_error": "output error"}
        out = []
        for metric in self.metrics:
            s = self.stats(metric)
            out.append(f"{names[metric]}: mean {s['mean']:.2%}, worst {s['worst']:.2%} ({s['worst_layer']})")
        out.append(f"measured vs {self.source}" if self.source else "estimated from codes only: add bf16_source "
                                                                    "to measure")
        return out

    def to_text(self) -> str:
        if not self.layers:
            return "quality: no INT8 layers to measure"
        n = len(self.layers)
        scalings = sorted({r.scaling for r in self.layers})
        if self.source:
            head = f"quality of {n} quantized layers, measured against {self.source}"
        else:
            head = (f"quality of {n} quantized layers, estimated from codes and scales only (uniform rounding "
                    "model; give the bf16 source to measure the real errors)")
        lines = [head + f"; {'/'.join(scalings)} scales"]
        for metric in self.metrics:
            s = self.stats(metric)
            lines.append(f"  {self.metric_label(metric)}: mean {s['mean']:.2%}, median {s['median']:.2%}, "
                         f"worst {s['worst']:.2%} ({s['worst_layer']})")
        key = self.metrics[-1]
        lines.append("  worst layers by " + key.replace("_", " ") + ":")
        for r in self.worst(key):
            extra = f", weight {r.weight_error:.2%}" if key == "output_error" else ""
            lines.append(f"    {getattr(r, key):7.2%}  {r.name} {list(r.shape)}{extra}")
        if self.not_in_source:
            lines.append(f"  {len(self.not_in_source)} layers not found in the source (not measured): "
                         + ", ".join(self.not_in_source[:5]) + (" ..." if len(self.not_in_source) > 5 else ""))
        return "\n".join(lines)


# -- per-layer numbers ---------------------------------------------------------------------------

def estimated_rel_error(codes: torch.Tensor, scale: torch.Tensor) -> float:
    """Relative weight error the rounding leaves, predicted from codes and scales (see module doc)."""
    rows, n_in = codes.shape
    s2 = scale.double().reshape(-1).square()
    if s2.numel() == 1:
        s2 = s2.expand(rows)
    energy = torch.zeros((), dtype=torch.float64)
    step = max(1, _CHUNK_ELEMENTS // max(1, n_in))
    for a in range(0, rows, step):
        q2 = codes[a:a + step].float().square().sum(dim=1, dtype=torch.float64)
        energy += (q2.cpu() * s2[a:a + step].cpu()).sum()
    noise = n_in * s2.sum().cpu() / 12.0
    if energy <= 0:
        return 0.0 if noise <= 0 else math.inf
    return math.sqrt(float(noise / energy))


def measured_errors(layer: QuantLayer, weight: torch.Tensor, *, tokens: int = 64, mode: str = "w8a8",
                    seed: int = 0) -> tuple[float, float | None]:
    """(relative weight error, relative output error on `tokens` random rows) against the original."""
    if tuple(weight.shape) != tuple(layer.codes.shape):
        raise ValueError(f"{layer.name}: source shape {list(weight.shape)} != quantized {list(layer.codes.shape)}")
    dev = layer.codes.device
    w = weight.to(dev, torch.float32)
    deq = dequantize_weight(layer.codes, layer.scale.to(dev), layer.group_size, torch.float32)
    w_err = relative_error(deq, w)
    if tokens <= 0:
        return w_err, None
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, w.shape[1], generator=gen).to(dev)
    ref = x @ w.t()
    # On the CPU the exact reference GEMM (integer sums in float64): packing a weight for the fast CPU
    # kernel costs more than one small GEMM, and the result is the same up to float rounding.
    with use_backend("reference") if dev.type == "cpu" else contextlib.nullcontext():
        y = int8_linear(x, layer.codes, layer.scale.to(dev), None, layer.group_size, mode, out_dtype=torch.float32)
    return w_err, relative_error(y, ref)


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a − ref‖ / ‖ref‖ in float64 (0 when both are zero, inf when only ref is)."""
    den = torch.linalg.vector_norm(ref.double())
    num = torch.linalg.vector_norm(a.double() - ref.double())
    return float(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def layer_kind(name: str) -> str:
    """attention / feed-forward / other, from the layer name (colours the plot)."""
    leaf = name.rsplit(".", 1)[-1]
    parts = name.split(".")
    if any(p in ("attention", "attn", "self_attn", "cross_attn") for p in parts) or leaf in (
            "qkv", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "to_q", "to_k", "to_v", "to_out"):
        return "attention"
    if any(p in ("feed_forward", "mlp", "ffn", "ff") for p in parts) or leaf in (
            "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"):
        return "feed-forward"
    return "other"


def natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# -- where layers come from ------------------------------------------------------------------------

def _strip(name: str) -> str:
    for prefix in (DM_PREFIX, "diffusion_model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _read(fd: int, entry, path) -> torch.Tensor:
    dtype = ST_TO_TORCH.get(entry.dtype)
    if dtype is None:
        raise FileFormatError(f"dtype {entry.dtype} cannot be read", path=path, tensor=entry.name)
    buf = bytearray(entry.nbytes)
    view, pos = memoryview(buf), 0
    while pos < entry.nbytes:
        n = os.preadv(fd, [view[pos:]], entry.begin + pos)
        if n <= 0:
            raise FileFormatError("file is truncated", path=path, tensor=entry.name)
        pos += n
    if not buf:
        return torch.empty(entry.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(entry.shape)


def count_file_layers(path) -> int:
    return sum(1 for k in read_header(path).tensors if k.endswith(QUANT_SUFFIX))


def iter_file_layers(path) -> Iterator[QuantLayer]:
    """The INT8 layers of a safetensors file, one at a time, in natural name order (other formats skipped)."""
    path = os.fspath(path)
    header = read_header(path)
    tensors = header.tensors
    names = sorted((k[: -len(QUANT_SUFFIX)] for k in tensors if k.endswith(QUANT_SUFFIX)), key=natural_key)
    fd = os.open(path, os.O_RDONLY)
    try:
        for base in names:
            raw = _read(fd, tensors[base + QUANT_SUFFIX], path)
            try:
                cfg = json.loads(bytes(raw.reshape(-1).tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise FileFormatError("comfy_quant is not valid JSON", path=path, tensor=base + QUANT_SUFFIX) from None
            w, s = tensors.get(base + ".weight"), tensors.get(base + SCALE_SUFFIX)
            if cfg.get("format") != INT8_FORMAT or w is None or w.dtype != "I8" or len(w.shape) != 2:
                continue
            if s is None:
                raise FileFormatError("INT8 layer without weight_scale", path=path, tensor=base + ".weight")
            group = convrot_group_size(cfg)
            yield QuantLayer(_strip(base), _read(fd, w, path), _read(fd, s, path).float(), group)
    finally:
        os.close(fd)


def iter_module_layers(model: torch.nn.Module) -> Iterator[QuantLayer]:
    """The INT8 Linear layers of a loaded model (modules holding int8 `weight` + `weight_scale`)."""
    for name, m in model.named_modules():
        w, s = getattr(m, "weight", None), getattr(m, "weight_scale", None)
        if isinstance(w, torch.Tensor) and w.dtype == torch.int8 and w.dim() == 2 and isinstance(s, torch.Tensor):
            yield QuantLayer(_strip(name), w.detach(), s.detach().float(), getattr(m, "group_size", None))


class SourceWeights:
    """Float weights of the bf16/fp16/fp32/fp8 original, by layer name (checkpoint prefix stripped)."""

    def __init__(self, path):
        try:
            self.source = Source(path)
        except FileFormatError as exc:
            raise FileFormatError(f"cannot be the bf16 source: {exc}", hint="choose the original bf16/fp16 file "
                                  "the INT8 file was converted from") from None
        self.by_name = {}
        for item in self.source.items:
            if item.name.endswith(".weight") and len(item.shape) == 2:
                self.by_name[_strip(item.name)[: -len(".weight")]] = item

    def get(self, layer: str) -> torch.Tensor | None:
        item = self.by_name.get(layer)
        return None if item is None else self.source.read(item).float()

    def close(self):
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def analyze(layers: Iterable[QuantLayer], source: SourceWeights | None = None, *, source_name: str | None = None,
            tokens: int = 64, mode: str = "w8a8", seed: int = 0, total: int | None = None,
            progress: Progress | None = None) -> QualityReport:
    """Per-layer numbers for every layer; measured against `source` where it has the layer."""
    report = QualityReport(source=source_name if source is not None else None, tokens=tokens if source else 0,
                           mode=mode if source else None, seed=seed)
    done = 0
    for layer in layers:
        shape = tuple(layer.codes.shape)
        row = LayerQuality(layer.name, shape, layer.group_size, "row" if layer.per_row else "tensor",
                           estimated_rel_error(layer.codes, layer.scale))
        if source is not None:
            w = source.get(layer.name)
            if w is None or tuple(w.shape) != shape:
                report.not_in_source.append(layer.name)
            else:
                row.weight_error, row.output_error = measured_errors(layer, w, tokens=tokens, mode=mode,
                                                                     seed=seed + done)
        report.layers.append(row)
        done += 1
        if progress is not None:
            progress(done, total or done, layer.name)
    if source is not None and report.layers and len(report.not_in_source) == len(report.layers):
        raise FileFormatError(f"none of the {len(report.layers)} quantized layers is in the source "
                              f"{source_name or ''} (different model?)", hint="choose the bf16 original of this file")
    report.layers.sort(key=lambda r: natural_key(r.name))
    return report


def file_quality(path, source_path=None, *, tokens: int = 64, mode: str = "w8a8", seed: int = 0,
                 progress: Progress | None = None) -> QualityReport:
    total = count_file_layers(path)
    if source_path is None:
        return analyze(iter_file_layers(path), total=total, progress=progress)
    with SourceWeights(source_path) as src:
        return analyze(iter_file_layers(path), src, source_name=os.path.basename(os.fspath(source_path)),
                       tokens=tokens, mode=mode, seed=seed, total=total, progress=progress)


__all__ = ["LayerQuality", "METRICS", "QualityReport", "QuantLayer", "SourceWeights", "analyze",
           "estimated_rel_error", "file_quality", "iter_file_layers", "iter_module_layers", "layer_kind",
           "measured_errors"]
