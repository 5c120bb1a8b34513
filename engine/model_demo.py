"""The main job's pieces that need no ComfyUI: the built-in Z-Image-shaped checkpoint, its conversion
with the streaming converter, and the engine-only run (every Linear the converter quantized runs as
`Int8Linear` against its bf16 original on activations of the model's token count). The ComfyUI run
lives above the nodes, in `comfyui_demo.py`; `demo.py` picks one.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .quality import relative_error
from .synthetic import ZIMAGE_TINY, ZImageShape, iter_zimage


def cosine(ref: torch.Tensor, y: torch.Tensor) -> float:
    return F.cosine_similarity(ref.double().flatten(), y.double().flatten(), dim=0).item()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def convert(src: Path, dst: Path, group_size: int, out) -> None:
    """The converter's streaming convert_file (the same engine as the CLI and the Converter node)."""
    from .convert import convert_file
    summary = convert_file(src, dst, preset="zimage", group_size=group_size, overwrite=True)
    out(summary.to_text())


def write_source(path: Path, shape: ZImageShape, seed: int) -> None:
    from safetensors.torch import save_file
    save_file(dict(iter_zimage(shape, seed=seed)), str(path))


def run_engine_demo(*, modes=("w8a16", "w8a8"), group_size: int = 64, seed: int = 0, tokens: int = 256,
                    device: str | None = None, out=print) -> dict:
    """Every quantized Linear of the tiny Z-Image layout against its bf16 original; print and return a report."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from .linear import Int8Linear
    from .loading import quantize_state_dict
    from .format import QUANT_SUFFIX, SCALE_SUFFIX, parse_layer_tensor
    dev = torch.device(device)
    src = dict(iter_zimage(ZIMAGE_TINY, seed=seed))
    t0 = time.perf_counter()
    q, rep = quantize_state_dict(dict(src), "zimage", group_size)
    out(f"quantized {rep['quantized']} Linear layers (preset zimage, g={group_size}) in "
        f"{time.perf_counter() - t0:.2f} s")
    gen = torch.Generator().manual_seed(seed + 1)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    results = {m: {"seconds": 0.0, "errs": []} for m in modes}
    t_ref = 0.0
    bf16_bytes = int8_bytes = 0
    for key, w in src.items():
        qk = f"{key[: -len('.weight')]}{QUANT_SUFFIX}"
        if qk not in q:
            continue
        lq = parse_layer_tensor(q[qk])
        x = torch.randn(tokens, w.shape[1], generator=gen).to(dev, dtype)
        wf = w.to(dev, dtype)
        bf16_bytes += w.numel() * 2
        int8_bytes += q[key].numel() + q[f"{key[: -len('.weight')]}{SCALE_SUFFIX}"].numel() * 4
        t1 = time.perf_counter()
        ref = F.linear(x, wf)
        t_ref += time.perf_counter() - t1
        for mode in modes:
            lin = Int8Linear(q[key].to(dev), q[f"{key[: -len('.weight')]}{SCALE_SUFFIX}"].to(dev), None,
                             lq.group_size, mode)
            lin(x)
            t1 = time.perf_counter()
            y = lin(x)
            results[mode]["seconds"] += time.perf_counter() - t1
            results[mode]["errs"].append(relative_error(y, ref))
    out(f"engine only: the {rep['quantized']} quantized Linears of the tiny Z-Image layout, {tokens} tokens each, "
        f"on {dev}")
    out(f"{'Linear layers':<24}{'time s':>10}{'weights MiB':>13}{'mean rel. err':>15}{'worst':>10}")
    out(f"{'bf16 weights (' + str(dtype).replace('torch.', '') + ')':<24}{t_ref:>10.4f}{bf16_bytes / 2**20:>13.2f}")
    rows = []
    for mode, r in results.items():
        e = r["errs"]
        out(f"{'INT8 ConvRot ' + mode:<24}{r['seconds']:>10.4f}{int8_bytes / 2**20:>13.2f}"
            f"{sum(e) / len(e):>15.4f}{max(e):>10.4f}")
        rows.append({"model": f"INT8 ConvRot {mode}", "seconds": r["seconds"], "mean_rel_error": sum(e) / len(e),
                     "worst_rel_error": max(e)})
    return {"path": "engine", "results": rows, "bf16_seconds": t_ref, "bf16_bytes": bf16_bytes,
            "int8_bytes": int8_bytes}
