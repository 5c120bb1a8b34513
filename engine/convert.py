"""The streaming converter: a bf16/fp16/fp32/fp8 checkpoint in, an INT8 ConvRot file out, one tensor
in memory at a time. No ComfyUI imports: the CLI, the nodes and the UNET loader all call this.

    convert_file(src, dst, preset=None, group_size=64, scaling="row", device="auto")  -> ConvertSummary
    save_state_dict(state_dict, dst, policy, ...)                                     -> ConvertSummary
    quantize_tensors(items, policy, ...)                     -> iterator of (name, tensor) (quantize on load)

Every output name, dtype and shape follows from the input header and the layer policy, so the
output header is written first and each tensor's bytes follow in order (engine/safetensors_writer.py).
Peak memory is one input tensor, its int8 codes and a few row chunks of float32 temporaries.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from ..kernels.quantize import NonFiniteError
from .errors import Int8ConvRotError
from ..kernels import dequantize_weight
from .format import METADATA_KEY, QUANT_SUFFIX, SCALE_SUFFIX, LayerQuant, build_metadata, parse_layer_tensor
from .policy import TENSOR_SCALING_WARNING, Decision, Policy, detect_preset, get_policy
from .quantize_layer import WORKSPACE, compute_threads, quantize_layer, quantize_rows, resolve_device
from .safetensors_writer import SafetensorsWriter, TensorSpec, check_output_path, human_bytes, st_dtype
from .sources import Source

VERSION = "0.1.0"
PROVENANCE_KEY = "int8_convrot_converter"
Progress = Callable[[int, int, str], None]   # (done bytes, total bytes, tensor name)


@dataclass
class LayerReport:
    name: str
    action: str                  # "quantized", "unrotated" (quantized without rotation), "kept"
    reason: str
    shape: tuple[int, ...]
    rel_error: float | None = None


@dataclass
class ConvertSummary:
    dst: str
    preset: str
    preset_reason: str
    group_size: int
    scaling: str
    device: str
    src: str | None = None
    input_kind: str = "plain"
    layers: list[LayerReport] = field(default_factory=list)
    tensors_in: int = 0
    tensors_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(1 for r in self.layers if r.action == action)

    @property
    def errors(self) -> list[tuple[float, str]]:
        return [(r.rel_error, r.name) for r in self.layers if r.rel_error is not None]

    @property
    def mean_error(self) -> float | None:
        e = self.errors
        return sum(x for x, _ in e) / len(e) if e else None

    @property
    def worst_error(self) -> tuple[float, str] | None:
        return max(self.errors) if self.errors else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(quantized=self.count("quantized"), unrotated=self.count("unrotated"), kept=self.count("kept"),
                 mean_rel_error=self.mean_error, worst_rel_error=self.worst_error)
        return d

    def to_text(self) -> str:
        q, u, k = self.count("quantized"), self.count("unrotated"), self.count("kept")
        lines = [f"INT8 ConvRot: {os.path.basename(self.dst)}",
                 f"  preset {self.preset} ({self.preset_reason}), group size {self.group_size}, "
                 f"{self.scaling} scales, on {self.device}, input {self.input_kind}",
                 f"  layers: {q + u} quantized ({q} rotated, {u} without rotation), {k} kept in high precision",
                 f"  size: {human_bytes(self.bytes_in)} -> {human_bytes(self.bytes_out)}"
                 + (f" ({self.bytes_out / self.bytes_in:.0%})" if self.bytes_in else "")
                 + f", {self.tensors_in} -> {self.tensors_out} tensors, {self.seconds:.1f} s"]
        if self.errors:
            worst, where = self.worst_error
            lines.append(f"  relative weight error: mean {self.mean_error:.2%}, worst {worst:.2%} ({where})")
        for r in self.layers:
            if r.action == "unrotated":
                lines.append(f"  unrotated: {r.name} ({r.reason})")
        kept = [r for r in self.layers if r.action == "kept"]
        if kept:
            reasons: dict[str, int] = {}
            for r in kept:
                reasons[r.reason] = reasons.get(r.reason, 0) + 1
            lines.append("  kept: " + "; ".join(f"{n} × {why}" for why, n in reasons.items()))
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# -- planning ----------------------------------------------------------------------------------
@dataclass
class _Step:
    name: str
    decision: Decision
    specs: list[TensorSpec]
    nbytes_in: int
    fetch: Callable[[], torch.Tensor]          # the tensor's values (scale applied)
    copy: Callable[[], Iterable] | None = None  # raw byte pieces, for tensors written unchanged
    read_rows: Callable[[int, int], torch.Tensor] | None = None   # rows of a weight, read on demand
    prequantized: bool = False                  # an INT8 layer written as it is: fetch gives its 3 tensors


def _scale_shape(quant: LayerQuant, shape) -> tuple[int, ...]:
    return (shape[0], 1) if quant.per_row and shape[0] > 1 else ()


def _specs(name: str, decision: Decision, shape, dtype: str) -> list[TensorSpec]:
    q = decision.quant
    if q is None:
        return [TensorSpec(name, dtype, tuple(shape))]
    base = name[: -len(".weight")]
    return [TensorSpec(name, "I8", tuple(shape)),
            TensorSpec(base + SCALE_SUFFIX, "F32", _scale_shape(q, shape)),
            TensorSpec(base + QUANT_SUFFIX, "U8", (q.to_tensor().numel(),))]


def _outside(reason: str = "outside the diffusion model") -> Decision:
    return Decision(None, reason)


def _plan_source(source: Source, policy: Policy) -> list[_Step]:
    steps = []
    for item in source.items:
        decision = policy.explain(item.model_name, item.shape, item.dtype) if item.model_name is not None \
            else _outside()
        dtype = item.dtype
        copy = None
        if decision.quant is None and item.scale is not None:
            dtype = "BF16"        # a scaled-fp8 layer kept in high precision is written dequantized
            fetch = (lambda it=item: source.read(it).to(torch.bfloat16))
        else:
            fetch = (lambda it=item: source.read(it))
            if decision.quant is None:
                copy = (lambda e=item.entry: source.iter_raw(e))
        nbytes = item.entry.nbytes + (item.scale.nbytes if item.scale is not None else 0)
        rows = (lambda a, b, it=item, cache={}: cache.setdefault("r", source.row_reader(it))(a, b)) \
            if decision.quant is not None else None
        steps.append(_Step(item.name, decision, _specs(item.name, decision, item.shape, dtype), nbytes, fetch, copy,
                           rows))
    return steps


def _plan_state_dict(sd: dict[str, torch.Tensor], policy: Policy) -> list[_Step]:
    """Steps for an in-memory state dict. INT8 ConvRot layers in it (e.g. a model loaded with our
    loader) keep their codes when the policy would store them the same way; otherwise they are
    dequantized (row chunks) and go through the policy like a float weight."""
    int8 = {}
    for k, t in sd.items():
        if k.endswith(QUANT_SUFFIX):
            base = k[: -len(QUANT_SUFFIX)]
            lq = parse_layer_tensor(t, layer=base)
            w, scale = sd.get(base + ".weight"), sd.get(base + SCALE_SUFFIX)
            if w is None or scale is None or w.dtype != torch.int8:
                raise Int8ConvRotError("INT8 layer without its int8 weight or weight_scale", tensor=base + ".weight")
            int8[base] = (lq, w, scale)
    steps = []
    for name, t in sd.items():
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if name.endswith((QUANT_SUFFIX, SCALE_SUFFIX)) and name.rsplit(".", 1)[0] in int8:
            continue                                   # written with their layer's weight
        if base in int8:
            lq, codes, scale = int8[base]
            dtype = lq.orig_dtype or torch.bfloat16
            decision = policy.explain(name, t.shape, dtype)
            q = decision.quant
            if q is not None and q.group_size == lq.group_size and q.per_row == lq.per_row:
                kept = Decision(lq, "already INT8 ConvRot with these settings: codes kept", True)
                specs = [TensorSpec(name, "I8", tuple(t.shape)),
                         TensorSpec(base + SCALE_SUFFIX, "F32", tuple(scale.shape)),
                         TensorSpec(base + QUANT_SUFFIX, "U8", (lq.to_tensor().numel(),))]
                steps.append(_Step(name, kept, specs, codes.numel() + scale.numel() * 4,
                                   (lambda c=codes, s=scale, lq=lq: (c, s.float(), lq.to_tensor())),
                                   prequantized=True))
                continue
            rows = (lambda a, b, c=codes, s=scale, g=lq.group_size:
                    dequantize_weight(c[a:b], s if s.numel() == 1 else s.reshape(-1, 1)[a:b], g))
            fetch = (lambda r=rows, n=t.shape[0], dt=dtype: r(0, n).to(dt))
            spec_dtype = st_dtype(dtype)
            steps.append(_Step(name, decision, _specs(name, decision, t.shape, spec_dtype), codes.numel(), fetch,
                               None, rows))
            continue
        decision = policy.explain(name, t.shape, t.dtype)
        steps.append(_Step(name, decision, _specs(name, decision, t.shape, st_dtype(t.dtype)),
                           t.numel() * t.element_size(), (lambda t=t: t), None, (lambda a, b, t=t: t[a:b])))
    return steps


# -- execution ---------------------------------------------------------------------------------
def _quantize_step(step: _Step, device, where, workers: int = 1, sink=None):
    """Quantize one layer; codes go to `sink` when given. Returns the QuantizedWeight."""
    quant = step.decision.quant
    try:
        if quant.per_row:
            rows = step.read_rows or (lambda a, b, t=step.fetch(): t[a:b])
            return quantize_rows(rows, step.specs[0].shape, quant, sink=sink, device=device, workers=workers,
                                 name=step.name)
        return quantize_layer(step.fetch(), quant, device=device, name=step.name, workers=workers, sink=sink)
    except NonFiniteError as exc:
        msg = str(exc)
        for prefix in (f"{step.name} has ", f"{step.name}: "):   # the tensor is named by the error itself
            msg = msg[len(prefix):] if msg.startswith(prefix) else msg
        raise Int8ConvRotError(msg, path=where, tensor=step.name,
                               hint="or keep this layer as it is with --exclude") from None


def _run(steps: list[_Step], dst, metadata: dict[str, str], summary: ConvertSummary, *, device, overwrite,
         sources, progress: Progress | None, where) -> ConvertSummary:
    t0 = time.perf_counter()
    layers = {s.name[: -len(".weight")]: s.decision.quant for s in steps if s.decision.quant is not None}
    if not layers:
        raise Int8ConvRotError(f"no layer would be quantized with preset {summary.preset!r} "
                               f"(group size {summary.group_size})", path=where,
                               hint="check the preset, --include/--exclude and the group size; nothing was written")
    meta = {k: v for k, v in metadata.items() if k != METADATA_KEY}
    meta[PROVENANCE_KEY] = (f"ComfyUI-INT8-ConvRot {VERSION}: preset={summary.preset} "
                            f"group_size={summary.group_size} scaling={summary.scaling}")
    meta = build_metadata(layers, meta)
    specs = [spec for s in steps for spec in s.specs]
    total = sum(s.nbytes_in for s in steps)
    done = 0
    if progress:
        progress(0, total, "")
    with SafetensorsWriter(dst, specs, meta, overwrite=overwrite, sources=sources) as writer, \
            compute_threads(device) as workers:
        for step in steps:
            d = step.decision
            if step.prequantized:
                for spec, t in zip(step.specs, step.fetch()):      # an INT8 layer kept as it is
                    writer.write(spec.name, t)
                summary.layers.append(LayerReport(step.name, d.action, d.reason, step.specs[0].shape))
            elif d.quant is not None:
                w_spec, s_spec, q_spec = step.specs
                qw = _quantize_step(step, device, where, workers, sink=lambda c, n=w_spec.name: writer.write(n, c))
                writer.write(s_spec.name, qw.scale)
                writer.write(q_spec.name, d.quant.to_tensor())
                summary.layers.append(LayerReport(step.name, d.action, d.reason, w_spec.shape, qw.rel_error))
            else:
                if step.copy is not None:
                    for piece in step.copy():
                        writer.write(step.name, piece)
                else:
                    writer.write(step.name, step.fetch())
                if d.candidate:
                    summary.layers.append(LayerReport(step.name, "kept", d.reason, step.specs[0].shape))
            done += step.nbytes_in
            if progress:
                progress(done, total, step.name)
    summary.tensors_out = len(specs)
    summary.bytes_out = os.path.getsize(writer.path)
    summary.seconds = time.perf_counter() - t0
    return summary


def _summary(dst, policy: Policy, preset_reason: str, device) -> ConvertSummary:
    s = ConvertSummary(dst=os.fspath(dst), preset=policy.name, preset_reason=preset_reason,
                       group_size=policy.group_size, scaling=policy.scaling, device=str(device))
    if policy.scaling == "tensor":
        s.warnings.append(TENSOR_SCALING_WARNING)
    return s


def _device(device) -> torch.device:
    try:
        return resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        raise Int8ConvRotError(str(exc)) from None


def convert_file(src, dst, *, preset: str | None = None, group_size: int = 64, scaling: str = "row",
                 device: str = "auto", include=(), exclude=(), overwrite: bool = False,
                 progress: Progress | None = None) -> ConvertSummary:
    """Convert checkpoint `src` into INT8 ConvRot file `dst` (temp file + rename; `src` is only read)."""
    device = _device(device)
    get_policy(preset or "generic", group_size, scaling, include, exclude)      # options first: fail fast
    check_output_path(dst, sources=(src,), overwrite=overwrite)
    with Source(src) as source:
        model_names = [t.model_name for t in source.items if t.model_name is not None]
        if preset:
            reason = "chosen"
        else:
            preset, reason = detect_preset(model_names)
            reason = f"detected: {reason}"
        policy = get_policy(preset, group_size, scaling, include, exclude)
        summary = _summary(dst, policy, reason, device)
        summary.src, summary.input_kind = os.fspath(src), source.kind
        summary.tensors_in, summary.bytes_in = len(source.header.tensors), source.header.file_size
        if source.dropped:
            summary.warnings.append(f"dropped {len(source.dropped)} fp8 scale/marker tensors (scales were applied)")
        steps = _plan_source(source, policy)
        return _run(steps, dst, source.header.metadata, summary, device=device, overwrite=overwrite,
                    sources=(src,), progress=progress, where=os.fspath(src))


def save_state_dict(state_dict: dict[str, torch.Tensor], dst, policy: Policy | str = "generic", *,
                    group_size: int = 64, scaling: str = "row", device: str = "auto",
                    metadata: dict[str, str] | None = None, overwrite: bool = False,
                    progress: Progress | None = None, preset_reason: str = "chosen") -> ConvertSummary:
    """Write an in-memory state dict (e.g. a patched ComfyUI model) as an INT8 ConvRot file."""
    device = _device(device)
    policy = get_policy(policy, group_size, scaling)
    summary = _summary(dst, policy, preset_reason, device)
    summary.input_kind = "model in memory"
    summary.tensors_in = len(state_dict)
    summary.bytes_in = sum(t.numel() * t.element_size() for t in state_dict.values())
    steps = _plan_state_dict(state_dict, policy)
    return _run(steps, dst, metadata or {}, summary, device=device, overwrite=overwrite, sources=(),
                progress=progress, where="model")


def quantize_tensors(items: Iterable[tuple[str, torch.Tensor]], policy: Policy | str = "generic",
                     group_size: int | None = None, scaling: str | None = None, device: str = "auto",
                     report: list[LayerReport] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Quantize a stream of (name, tensor) the way the converter would write them (quantize on load).

    Yields `P.weight` (int8), `P.weight_scale`, `P.comfy_quant` for each quantized layer and every
    other tensor unchanged. Per-layer reports are appended to `report` when given.
    """
    policy = get_policy(policy, group_size or 64, scaling or "row") if isinstance(policy, str) \
        else policy.with_options(group_size, scaling)
    device = _device(device)
    try:
        for name, t in items:
            d = policy.explain(name, t.shape, t.dtype)
            if d.quant is None:
                if report is not None and d.candidate:
                    report.append(LayerReport(name, "kept", d.reason, tuple(t.shape)))
                yield name, t
                continue
            step = _Step(name, d, _specs(name, d, t.shape, st_dtype(t.dtype)), 0, (lambda t=t: t), None,
                         (lambda a, b, t=t: t[a:b]))
            qw = _quantize_step(step, device, "model")   # torch's own intra-op threads
            if report is not None:
                report.append(LayerReport(name, d.action, d.reason, tuple(t.shape), qw.rel_error))
            base = name[: -len(".weight")]
            yield name, qw.codes
            yield base + SCALE_SUFFIX, qw.scale
            yield base + QUANT_SUFFIX, d.quant.to_tensor()
    finally:
        WORKSPACE.release()   # scratch buffers (GPU memory on a GPU) do not outlive the stream
