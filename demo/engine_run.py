"""The engine-only half of the main job (no ComfyUI, nothing from nodes/): build the built-in Z-Image
checkpoint at the real widths, convert it with the streaming converter, and run every Linear the
converter quantized at the token count it sees in a 1024² image: what ComfyUI computes for the bf16
file on this device (float32 on CPU, bf16 on CUDA) against INT8 ConvRot W8A16 and W8A8.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine.convert import convert_file
from ..engine.format import SCALE_SUFFIX
from ..engine.linear import Int8Linear
from ..engine.quality import layer_kind, natural_key, relative_error
from ..engine.synthetic import ZImageShape, iter_zimage

MODES = ("w8a16", "w8a8")
# One whole main block plus the embedders and final layer, at Z-Image's real widths (dim 3840, FFN 10240).
DEMO_SHAPE = ZImageShape(n_layers=1, n_refiner=0)
# The same layout, narrow: for the quick test only.
SMALL_SHAPE = ZImageShape(dim=256, n_layers=1, n_refiner=0, ffn=704, head_dim=64, cap_feat_dim=256, t_hidden=256)
CAPTION_TOKENS = 128   # a typical prompt's Qwen3 tokens, padded as Z-Image pads them
WARMUP_TOKENS = 16     # a small first call pays one-off costs (CPU weight pre-pack, kernel compile) untimed


@dataclass
class LayerRow:
    name: str
    kind: str
    shape: tuple[int, int]
    wall: dict          # None (the bf16 file) or a mode -> seconds of wall clock
    cpu: dict           # the same in this process's CPU seconds (all threads)
    rel_error: dict[str, float]


@dataclass
class EngineReport:
    device: str
    ref_dtype: str
    image_size: int
    tokens: int
    shape: ZImageShape
    source_bytes: int
    int8_bytes: int
    convert_seconds: float
    ref_weight_bytes: int = 0     # the quantized layers' weights as the bf16 file's compute holds them
    int8_weight_bytes: int = 0    # the same layers as INT8 codes + float32 row scales
    layers: list[LayerRow] = field(default_factory=list)
    # "wall", or "CPU" when other work shared the CPU while measuring: wall-clock ratios then say more
    # about the neighbours than about the kernels, while CPU seconds are what each path consumed.
    clock: str = "wall"
    load: float = 0.0

    def seconds(self, row: LayerRow, mode: str | None) -> float:
        return (row.wall if self.clock == "wall" else row.cpu)[mode]

    def total(self, mode: str | None) -> float:
        return sum(self.seconds(r, mode) for r in self.layers)

    def mean_error(self, mode: str) -> float:
        return sum(r.rel_error[mode] for r in self.layers) / len(self.layers)

    def worst_error(self, mode: str) -> float:
        return max(r.rel_error[mode] for r in self.layers)


# Within a block, in the order the forward runs them (the file lists tensors alphabetically).
FORWARD_ORDER = ("qkv", "out", "w1", "w3", "w2")


def model_order(name: str):
    block, _, leaf = name.rpartition(".")
    return natural_key(block), FORWARD_ORDER.index(leaf) if leaf in FORWARD_ORDER else len(FORWARD_ORDER), leaf


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, x: torch.Tensor, dev: torch.device) -> tuple[torch.Tensor, float, float]:
    """(output, wall seconds, process CPU seconds) of one call after an untimed small one."""
    fn(x[:WARMUP_TOKENS])
    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    y = fn(x)
    _sync(dev)
    return y, time.perf_counter() - t0, time.process_time() - c0


def _busy_load(dev: torch.device) -> float:
    """The 1-minute load average when it says other work shared this CPU, else 0."""
    if dev.type != "cpu" or not hasattr(os, "getloadavg"):
        return 0.0
    load = os.getloadavg()[0]
    return load if load > (os.cpu_count() or 1) + 0.5 else 0.0


def build_and_convert(tmp: Path, shape: ZImageShape, group_size: int, seed: int, out) -> tuple[Path, Path, float]:
    from safetensors.torch import save_file
    src, dst = tmp / "zimage_bf16.safetensors", tmp / "zimage_int8_convrot.safetensors"
    t0 = time.perf_counter()
    save_file(dict(iter_zimage(shape, seed=seed)), str(src))
    out(f"built-in checkpoint: Z-Image key layout, dim {shape.dim}, FFN {shape.ffn}, {shape.n_layers} main + "
        f"{2 * shape.n_refiner} refiner blocks + embedders and final layer; {src.stat().st_size / 2**20:.0f} MiB bf16 "
        f"({time.perf_counter() - t0:.1f} s)")
    summary = convert_file(src, dst, preset="zimage", group_size=group_size, overwrite=True)
    out(f"streaming converter: {dst.stat().st_size / 2**20:.0f} MiB INT8 ConvRot "
        f"({dst.stat().st_size / src.stat().st_size:.2f}x of bf16), "
        f"{sum(1 for r in summary.layers if r.action == 'quantized')} Linears quantized at group {group_size}, "
        f"{summary.seconds:.1f} s")
    return src, dst, summary.seconds


def run_engine(tmp: Path, *, shape: ZImageShape = DEMO_SHAPE, image_size: int = 1024,
               caption_tokens: int = CAPTION_TOKENS, group_size: int = 64, seed: int = 0, device: str | None = None,
               out=print) -> EngineReport:
    """Build, convert and compare every quantized Linear; returns the report (the caller prints/draws it)."""
    from safetensors import safe_open
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    src, dst, conv_s = build_and_convert(tmp, shape, group_size, seed, out)
    # Every quantized Linear sits in a main block, which runs on the image and caption tokens together.
    tokens = (image_size // 16) ** 2 + caption_tokens
    rep = EngineReport(str(dev), str(ref_dtype).replace("torch.", ""), image_size, tokens, shape,
                       src.stat().st_size, dst.stat().st_size, conv_s)
    gen = torch.Generator().manual_seed(seed + 1)
    with safe_open(str(src), "pt") as fs, safe_open(str(dst), "pt") as fq:
        names = sorted((k[: -len(SCALE_SUFFIX)] for k in fq.keys() if k.endswith(SCALE_SUFFIX)), key=model_order)
        for i, name in enumerate(names):
            w = fs.get_tensor(f"{name}.weight")
            codes, scale = fq.get_tensor(f"{name}.weight"), fq.get_tensor(name + SCALE_SUFFIX)
            x = torch.randn(tokens, w.shape[1], generator=gen).to(dev, ref_dtype)
            wf = w.to(dev, ref_dtype)
            ref, w_ref, c_ref = _timed(lambda a: F.linear(a, wf), x, dev)
            rep.ref_weight_bytes += wf.numel() * wf.element_size()
            rep.int8_weight_bytes += codes.numel() * codes.element_size() + scale.numel() * 4
            del wf
            wall, cpu, errs = {None: w_ref}, {None: c_ref}, {}
            for mode in MODES:
                lin = Int8Linear(codes.to(dev), scale.to(dev), None, group_size, mode)
                y, wall[mode], cpu[mode] = _timed(lin, x, dev)
                errs[mode] = relative_error(y, ref)
                del lin, y
            rep.layers.append(LayerRow(name, layer_kind(name), tuple(w.shape), wall, cpu, errs))
            out(f"  [{i + 1}/{len(names)}] {name} {tuple(w.shape)}: {rep.ref_dtype} {w_ref:.2f} s, "
                + ", ".join(f"{m} {wall[m]:.2f} s ({errs[m] * 100:.2f}%)" for m in MODES) + " (wall)")
            rep.load = max(rep.load, _busy_load(dev))
    if rep.load:
        rep.clock = "CPU"
        out(f"load average {rep.load:.1f} on {os.cpu_count()} CPUs while measuring: other work shared the CPU, so "
            f"the report compares CPU seconds (what each path consumed), not wall clock")
    return rep


def format_table(rep: EngineReport) -> list[str]:
    lines = [f"{len(rep.layers)} quantized Linears, {rep.tokens} tokens each ({rep.image_size}x{rep.image_size} image "
             f"+ {rep.tokens - (rep.image_size // 16) ** 2} caption), on {rep.device}",
             f"{'':<26}{rep.clock + ' s':>9}{'speed-up':>10}{'weights MiB':>13}{'mean rel. err':>15}{'worst':>9}",
             f"{'bf16 file (' + rep.ref_dtype + ' compute)':<26}{rep.total(None):>9.2f}{1:>9.2f}x"
             f"{rep.ref_weight_bytes / 2**20:>13.0f}{'0 (reference)':>15}"]
    for m in MODES:
        lines.append(f"{'INT8 ConvRot ' + m.upper():<26}{rep.total(m):>9.2f}{rep.total(None) / rep.total(m):>9.2f}x"
                     f"{rep.int8_weight_bytes / 2**20:>13.0f}{rep.mean_error(m) * 100:>14.2f}%"
                     f"{rep.worst_error(m) * 100:>8.2f}%")
    lines.append(f"file: {rep.source_bytes / 2**20:.0f} MiB bf16 -> {rep.int8_bytes / 2**20:.0f} MiB INT8 ConvRot "
                 f"({rep.int8_bytes / rep.source_bytes:.2f}x)")
    return lines
