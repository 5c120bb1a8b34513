"""The main job's picture: per-layer speed and error of INT8 ConvRot against what ComfyUI computes for the
bf16 file, weight memory and file size, as one PNG. Drawn with Pillow like engine/plot.py (ComfyUI and
torchvision bring it; matplotlib is not a dependency). Horizontal bars with their values written on them,
so the figure reads without the table.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .engine_run import MODES, EngineReport

BG, FG, MUTED, GRID = (24, 26, 31), (230, 232, 236), (150, 155, 165), (52, 56, 64)
COLOURS = {None: (140, 146, 158), "w8a16": (88, 166, 255), "w8a8": (63, 185, 80)}
GOOD, BAD = (63, 185, 80), (248, 81, 73)
WIDTH, MARGIN, LABEL_W = 1280, 32, 250


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: the bitmap font only
        return ImageFont.load_default()


def _name(mode) -> str:
    return "INT8 ConvRot " + mode.upper() if mode else "bf16 file"


def _ratio(ref: float, t: float) -> str:
    """'2.1x faster' / '1.3x slower': a slow-down reads better as a factor above one."""
    if t <= 0 or ref <= 0:
        return "-"
    return f"{ref / t:.2f}x faster" if t <= ref else f"{t / ref:.2f}x slower"


def _card(draw, box, title, big, sub, colour):
    x0, y0, x1, y1 = box
    draw.rounded_rectangle(box, radius=10, fill=(34, 37, 44))
    draw.text((x0 + 16, y0 + 12), title, fill=MUTED, font=_font(15))
    draw.text((x0 + 16, y0 + 36), big, fill=colour, font=_font(34))
    draw.text((x0 + 16, y1 - 28), sub, fill=FG, font=_font(14))


def _bars(draw, y, title, rows, legend=True):
    """rows: [(label, [(mode, value, text)])]; one group of horizontal bars per row. Returns the next y."""
    f, fs = _font(14), _font(13)
    draw.text((MARGIN, y), title, fill=FG, font=_font(18))
    y += 30
    if legend:
        x = MARGIN + LABEL_W
        shown = {m for _, bars in rows for m, _, _ in bars}
        for mode in (m for m in COLOURS if m in shown):
            draw.rectangle([x, y + 3, x + 12, y + 15], fill=COLOURS[mode])
            draw.text((x + 18, y), _name(mode), fill=FG, font=f)
            x += 40 + draw.textlength(_name(mode), font=f)
        y += 24
    top = max(v for _, bars in rows for _, v, _ in bars) or 1.0
    longest = max(draw.textlength(t, font=fs) for _, bars in rows for _, _, t in bars)
    x0, x1 = MARGIN + LABEL_W, WIDTH - MARGIN - longest - 10
    bar_h, gap = 16, 10
    for label, bars in rows:
        h = len(bars) * (bar_h + 2)
        draw.text((MARGIN, y + h / 2 - 8), label, fill=FG, font=f)
        for mode, v, text in bars:
            w = (x1 - x0) * v / top
            draw.rectangle([x0, y, x0 + max(w, 1), y + bar_h], fill=COLOURS[mode])
            draw.text((x0 + w + 6, y + 1), text, fill=FG, font=fs)
            y += bar_h + 2
        y += gap
        draw.line([(MARGIN, y - gap / 2), (WIDTH - MARGIN, y - gap / 2)], fill=GRID)
    return y + 12


def draw_report(rep: EngineReport, machine: str) -> Image.Image:
    height = 300 + 2 * (len(rep.layers) + 1) * 62 + len(rep.layers) * 46 + 260
    img = Image.new("RGB", (WIDTH, height), BG)
    d = ImageDraw.Draw(img)
    img_tokens = (rep.image_size // 16) ** 2
    real = rep.shape.dim == 3840
    d.text((MARGIN, 18), "INT8 ConvRot against the bf16 file: " + (
        "one Z-Image block at its real size" if real else "a narrow Z-Image-shaped block (quick run, not real size)"),
        fill=FG, font=_font(24))
    d.text((MARGIN, 52), f"dim {rep.shape.dim}, FFN {rep.shape.ffn} · {rep.image_size}x{rep.image_size} image = "
           f"{img_tokens} + {rep.tokens - img_tokens} caption tokens · bf16 file computed in {rep.ref_dtype} as "
           f"ComfyUI does on {rep.device} · {machine}", fill=MUTED, font=_font(14))
    best = min(MODES, key=rep.total)
    speed = rep.total(None) / rep.total(best)
    cw = (WIDTH - 2 * MARGIN - 2 * 20) / 3
    cards = [
        ("speed, all quantized Linears", _ratio(rep.total(None), rep.total(best)),
         f"{_name(best)}: {rep.total(best):.1f} s vs {rep.total(None):.1f} s ({rep.clock} time)", GOOD if speed >= 1 else BAD),
        ("weight memory of those Linears", f"{rep.ref_weight_bytes / rep.int8_weight_bytes:.1f}x less",
         f"{rep.int8_weight_bytes / 2**20:.0f} MiB INT8 vs {rep.ref_weight_bytes / 2**20:.0f} MiB {rep.ref_dtype}", GOOD),
        ("error against bf16 (mean / worst)", f"{rep.mean_error('w8a8') * 100:.1f}% / "
         f"{rep.worst_error('w8a8') * 100:.1f}%", f"W8A8; W8A16 {rep.mean_error('w8a16') * 100:.1f}% / "
         f"{rep.worst_error('w8a16') * 100:.1f}%", FG),
    ]
    for i, c in enumerate(cards):
        x = MARGIN + i * (cw + 20)
        _card(d, (x, 84, x + cw, 184), *c)
    y = 210
    time_rows = []
    for r in rep.layers + [None]:
        ref = rep.seconds(r, None) if r else rep.total(None)
        label = f"{r.name.split('.', 2)[-1]}  {r.shape[0]}x{r.shape[1]}" if r else "all quantized Linears"
        bars = [(None, ref, f"{ref:.2f} s")]
        for m in MODES:
            s = rep.seconds(r, m) if r else rep.total(m)
            bars.append((m, s, f"{s:.2f} s  ({_ratio(ref, s)})"))
        time_rows.append((label, bars))
    clock = "wall-clock time" if rep.clock == "wall" else (
        f"CPU time (the machine was busy, load {rep.load:.0f}: wall clock would measure the neighbours)")
    y = _bars(d, y, f"Time per Linear at {rep.tokens} tokens, {clock} (shorter is faster)", time_rows)
    err_rows = [(f"{r.name.split('.', 2)[-1]}", [(m, r.rel_error[m], f"{r.rel_error[m] * 100:.2f}%") for m in MODES])
                for r in rep.layers]
    y = _bars(d, y, "Relative error of each Linear's output against the bf16 file's (|y - y_bf16| / |y_bf16|)",
              err_rows)
    mem_rows = [
        (f"weights in memory ({len(rep.layers)} Linears)",
         [(None, rep.ref_weight_bytes, f"{rep.ref_weight_bytes / 2**20:.0f} MiB ({rep.ref_dtype}, as ComfyUI holds "
                                       f"the bf16 file on {rep.device})"),
          ("w8a8", rep.int8_weight_bytes, f"{rep.int8_weight_bytes / 2**20:.0f} MiB (INT8 codes + row scales, "
                                          f"both modes)")]),
        ("checkpoint file on disk",
         [(None, rep.source_bytes, f"{rep.source_bytes / 2**20:.0f} MiB bf16"),
          ("w8a8", rep.int8_bytes, f"{rep.int8_bytes / 2**20:.0f} MiB INT8 ConvRot "
                                   f"({rep.int8_bytes / rep.source_bytes:.2f}x; embedders and norms stay bf16)")]),
    ]
    y = _bars(d, y, "Memory and file size (shorter is smaller)", mem_rows, legend=False)
    return img.crop((0, 0, WIDTH, int(y) + 8))


def write_png(rep: EngineReport, path: Path, machine: str) -> Path:
    """Draw and save through a temp file then rename (no half-written PNG under the final name)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        draw_report(rep, machine).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
