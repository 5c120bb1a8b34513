"""A bar chart of per-layer errors (engine/quality.py) drawn with Pillow, which every ComfyUI has
(matplotlib is not a dependency). One panel per metric, one bar per quantized layer in model order,
coloured by layer kind, the mean as a dashed line, the worst layers marked and named.
"""
from __future__ import annotations

import math
import re

from PIL import Image, ImageDraw, ImageFont

from .quality import QualityReport

BG, FG, MUTED, GRID = (24, 26, 31), (230, 232, 236), (150, 155, 165), (52, 56, 64)
KIND_COLOURS = {"attention": (88, 166, 255), "feed-forward": (63, 185, 80), "other": (210, 153, 34)}
WORST_COLOUR = (248, 81, 73)
WIDTH, PANEL_H, TOP, LEFT, RIGHT = 1280, 300, 64, 76, 24


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: the bitmap font only
        return ImageFont.load_default()


def _axis(v: float, ticks: int = 4) -> tuple[float, float]:
    """(top, step): a round tick step and the smallest multiple of it >= v."""
    if v <= 0 or not math.isfinite(v):
        v = 0.01
    raw = v / ticks
    exp = 10 ** math.floor(math.log10(raw))
    step = next(m * exp for m in (1, 2, 2.5, 5, 10) if m * exp >= raw * 0.999)
    return step * math.ceil(v / step - 1e-9), step


def _pct(v: float, step: float) -> str:
    """v as a percentage with as many decimals as the tick step needs."""
    decimals = 0
    while decimals < 4 and abs(step * 100 * 10 ** decimals - round(step * 100 * 10 ** decimals)) > 1e-6:
        decimals += 1
    return f"{v * 100:.{decimals}f}%"


def _block(name: str) -> str | None:
    """'layers.12.attention.qkv' -> 'layers.12' (the repeated block a layer belongs to)."""
    m = re.match(r"^(.*?\.\d+)\.", name)
    return m.group(1) if m else None


def _block_label(block: str) -> str:
    """'layers.12' -> 'L12', 'model.layers.3' -> 'L3', 'context_refiner.1' -> 'context 1'."""
    head, idx = block.rsplit(".", 1)
    leaf = head.rsplit(".", 1)[-1]
    if leaf in ("layers", "blocks", "h", "layer"):
        return f"L{idx}"
    return f"{leaf.replace('_refiner', '').replace('_blocks', '')} {idx}"


def _text_w(draw, text, font) -> float:
    return draw.textlength(text, font=font)


def _fit(draw, text: str, font, width: float) -> str:
    if _text_w(draw, text, font) <= width:
        return text
    while text and _text_w(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def _panel(draw, report: QualityReport, metric: str, y0: int, width: int):
    f_small, f_label = _font(12), _font(14)
    layers = report.layers
    vals = [getattr(r, metric) for r in layers]
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    top, step = _axis(max(finite) * 1.08 if finite else 0.01)
    x0, x1 = LEFT, width - RIGHT
    py0, py1 = y0 + 28, y0 + PANEL_H - 44          # plot area (y grows downwards)
    draw.text((x0, y0 + 4), _fit(draw, report.metric_label(metric), f_label, x1 - x0), fill=FG, font=f_label)
    # y grid
    for i in range(round(top / step) + 1):
        v = step * i
        y = py1 - (py1 - py0) * v / top
        draw.line([(x0, y), (x1, y)], fill=GRID, width=1)
        label = _pct(v, step)
        draw.text((x0 - 8 - _text_w(draw, label, f_small), y - 7), label, fill=MUTED, font=f_small)
    n = len(layers)
    slot = (x1 - x0) / max(1, n)
    bar = max(1.0, slot * 0.8)
    worst = {r.name for r in report.worst(metric, 3)}
    # block separators and labels
    prev, start = None, 0
    blocks = []
    for i, r in enumerate(layers + [None]):
        b = _block(r.name) if r is not None else object()
        if b != prev:
            if prev is not None and i > start:
                blocks.append((prev, start, i))
            prev, start = b, i
    for name, a, b in blocks:
        xa, xb = x0 + a * slot, x0 + b * slot
        if a:
            draw.line([(xa, py0), (xa, py1 + 4)], fill=GRID, width=1)
        label = _block_label(name)
        if _text_w(draw, label, f_small) < xb - xa - 2:
            draw.text(((xa + xb - _text_w(draw, label, f_small)) / 2, py1 + 6), label, fill=MUTED, font=f_small)
    for i, (r, v) in enumerate(zip(layers, vals)):
        if v is None:
            continue
        h = (py1 - py0) * min(v, top) / top if math.isfinite(v) else py1 - py0
        xa = x0 + i * slot + (slot - bar) / 2
        colour = KIND_COLOURS.get(r.kind, KIND_COLOURS["other"])
        draw.rectangle([xa, py1 - h, xa + bar - (1 if bar > 2 else 0), py1], fill=colour)
        if r.name in worst:
            cx = xa + bar / 2
            draw.polygon([(cx - 5, py1 - h - 11), (cx + 5, py1 - h - 11), (cx, py1 - h - 3)], fill=WORST_COLOUR)
    s = report.stats(metric)
    if s:
        y = py1 - (py1 - py0) * min(s["mean"], top) / top
        for xa in range(int(x0), int(x1), 12):
            draw.line([(xa, y), (min(xa + 6, x1), y)], fill=FG, width=1)
        label = f"mean {_pct(s['mean'], step / 10)}"
        lw = _text_w(draw, label, f_small)
        draw.rectangle([x1 - lw - 6, y - 17, x1, y - 2], fill=BG)
        draw.text((x1 - lw - 3, y - 16), label, fill=FG, font=f_small)
        worst_text = "worst: " + ", ".join(f"{r.name} {_pct(getattr(r, metric), step / 10)}"
                                           for r in report.worst(metric, 3))
        draw.polygon([(x0, py1 + 25), (x0 + 10, py1 + 25), (x0 + 5, py1 + 33)], fill=WORST_COLOUR)
        draw.text((x0 + 16, py1 + 22), _fit(draw, worst_text, f_small, x1 - x0 - 16), fill=WORST_COLOUR,
                  font=f_small)
    draw.line([(x0, py1), (x1, py1)], fill=MUTED, width=1)


def plot_quality(report: QualityReport, title: str, width: int = WIDTH) -> Image.Image:
    """The per-layer error chart as an RGB image (a message instead when there is nothing to plot)."""
    metrics = report.metrics if report.layers else []
    height = TOP + max(1, len(metrics)) * PANEL_H + 8
    img = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(img)
    f_title, f_small = _font(18), _font(12)
    draw.text((LEFT - 56, 12), _fit(draw, title, f_title, width - LEFT), fill=FG, font=f_title)
    if not report.layers:
        draw.text((LEFT, TOP + PANEL_H // 2 - 10), "no INT8 layers: nothing to plot (not an INT8 ConvRot file?)",
                  fill=WORST_COLOUR, font=_font(16))
        return img
    scalings = "/".join(sorted({r.scaling for r in report.layers}))
    groups = sorted({r.group_size for r in report.layers}, key=lambda g: (g is None, g or 0))
    sub = (f"{len(report.layers)} quantized layers · group {', '.join(str(g) if g else 'none' for g in groups)} · "
           f"{scalings} scales · " + (f"vs {report.source}" if report.source else "no source: estimates only"))
    draw.text((LEFT - 56, 38), _fit(draw, sub, f_small, width * 0.6), fill=MUTED, font=f_small)
    if "tensor" in scalings:
        note = "tensor-wise scales: soft, waxy images likely"
        draw.text((width - RIGHT - _text_w(draw, note, f_small), 14), note, fill=WORST_COLOUR, font=f_small)
    x = width - RIGHT
    for kind in reversed(list(KIND_COLOURS)):   # legend, right-aligned
        w = _text_w(draw, kind, f_small)
        x -= w
        draw.text((x, 38), kind, fill=FG, font=f_small)
        x -= 16
        draw.rectangle([x, 40, x + 10, 50], fill=KIND_COLOURS[kind])
        x -= 14
    for i, metric in enumerate(metrics):
        _panel(draw, report, metric, TOP + i * PANEL_H, width)
    return img


__all__ = ["plot_quality"]
