"""The README's main job on a built-in default: build a small Z-Image-shaped checkpoint, quantize
it to INT8 ConvRot, and report size and error against bf16."""
from __future__ import annotations

import argparse
import time

import torch

from ..kernels import dequantize_weight, int8_linear, quantize_weight
from .synthetic import ZIMAGE_TINY, iter_zimage


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m comfyui_int8_convrot.engine.demo", description=__doc__)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args(argv)
    bf16_bytes = int8_bytes = 0
    errs = []
    t0 = time.perf_counter()
    x = None
    for name, w in iter_zimage(ZIMAGE_TINY):
        bf16_bytes += w.numel() * 2
        if w.dim() != 2 or "layers." not in name or w.shape[1] % args.group_size:
            int8_bytes += w.numel() * 2
            continue
        codes, scale = quantize_weight(w, args.group_size, name=name)
        int8_bytes += codes.numel() + scale.numel() * 4
        werr = ((dequantize_weight(codes, scale, args.group_size) - w.float()).norm() / w.float().norm()).item()
        x = torch.randn(256, w.shape[1])
        ref = x @ w.float().T
        y = int8_linear(x, codes, scale, None, args.group_size, mode="w8a8")
        errs.append((name, werr, ((y - ref).norm() / ref.norm()).item()))
    print(f"INT8 ConvRot demo (g={args.group_size}), tiny Z-Image layout, {len(errs)} quantized Linear layers")
    print(f"size: bf16 {bf16_bytes / 2**20:.1f} MiB -> int8 {int8_bytes / 2**20:.1f} MiB "
          f"({int8_bytes / bf16_bytes:.2f}x)")
    worst = max(errs, key=lambda e: e[2])
    print(f"weight rel. error mean {sum(e[1] for e in errs) / len(errs):.4f}; "
          f"W8A8 output rel. error mean {sum(e[2] for e in errs) / len(errs):.4f}, worst {worst[2]:.4f} ({worst[0]})")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
