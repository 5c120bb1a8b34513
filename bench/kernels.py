"""INT8 ConvRot linear vs bf16/fp32 torch and comfy-kitchen, per Linear at Z-Image shapes.

Usage: python bench/kernels.py [--device cpu|cuda] [--tokens 256 1024 4096 8192] [--group-size 64]
Prints a table of times and ratios and appends it to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from comfyui_int8_convrot.kernels import int8_linear, prepack, quantize_weight
from comfyui_int8_convrot.kernels.linear import rotate_quantize_rows
from comfyui_int8_convrot.kernels.backends import cpu_has_amx, select_gemm_backend

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import append_results, device_name, timeit  # noqa: E402

SHAPES = [(3840, 11520), (3840, 3840), (3840, 10240), (10240, 3840)]  # (in, out): qkv, out, w1/w3, w2


def comfy_kitchen_linear():
    try:
        from comfy_kitchen.backends.eager.quantization import int8_linear as ck_int8_linear
    except Exception as exc:  # not installed or broken: the column says so
        print(f"comfy-kitchen unavailable: {exc}")
        return None
    return ck_int8_linear


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per cell")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="two small shapes (gpu_check.sh --dry)")
    args = ap.parse_args(argv)
    shapes = [(256, 96), (512, 64)] if args.tiny else SHAPES
    dev = torch.device(args.device)
    tokens = args.tokens or ([256, 1024, 4096, 8192] if dev.type == "cuda" else [256, 1024])
    g = args.group_size
    ck = comfy_kitchen_linear()
    act_dtype = torch.bfloat16
    header = ("| M | in→out | fp32 ms | bf16 ms | ck int8 ms | w8a16 ms | w8a8 ms | rot+quant ms | _int_mm w8a8 ms | "
              "w8a8 vs fp32 | w8a8 vs bf16 | w8a8 vs ck | w8a16 vs bf16 | rot+quant / w8a8 | w8a8 vs _int_mm |")
    lines = [header, "|" + "---|" * 15]
    print(f"device: {device_name(dev)}; gemm backend: {select_gemm_backend(dev)}; group size {g}")
    print(header)
    for k, n in shapes:
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(n, k, generator=gen) * k ** -0.5)
        codes, scale = quantize_weight(w, g)
        codes, scale, wb, wf = codes.to(dev), scale.to(dev), w.to(dev, torch.bfloat16), w.to(dev)
        packed = prepack(codes, scale)
        for m in tokens:
            x = torch.randn(m, k, generator=gen).to(dev, act_dtype)
            xf = x.float()
            t = {
                "fp32": timeit(lambda: F.linear(xf, wf), dev, args.budget),
                "bf16": timeit(lambda: F.linear(x, wb), dev, args.budget),
                "w8a16": timeit(lambda: int8_linear(x, codes, scale, None, g, "w8a16"), dev, args.budget),
                "w8a8": timeit(lambda: int8_linear(x, codes, scale, None, g, "w8a8", packed=packed), dev,
                               args.budget),
                # the rotate+quantize step exactly as w8a8 runs it on this device
                "rq": timeit(lambda: rotate_quantize_rows(x, g), dev, args.budget)
                if dev.type != "cuda" else timeit(lambda: _triton_rq(x, g), dev, args.budget),
            }
            # comfy-kitchen's CPU path is torch._int_mm: a scalar loop without AMX (~90 s per call at
            # M=1024), so there it is measured only at the smallest M ("nan" elsewhere); fast with AMX.
            fast_int_mm = dev.type == "cuda" or (dev.type == "cpu" and cpu_has_amx())
            ck_runs = ck is not None and (fast_int_mm or m == min(tokens))
            t["ck"] = (timeit(lambda: ck(x, codes, scale, None, act_dtype, True, g), dev, args.budget)
                       if ck_runs else float("nan"))
            # the same w8a8 with torch._int_mm as the GEMM (where it is not a scalar loop)
            t["int_mm"] = (timeit(lambda: _int_mm_w8a8(x, codes, scale, g), dev, args.budget)
                           if fast_int_mm else float("nan"))
            ms = {key: v * 1e3 for key, v in t.items()}
            row = (f"| {m} | {k}→{n} | {ms['fp32']:.1f} | {ms['bf16']:.1f} | {ms['ck']:.1f} | {ms['w8a16']:.1f} | "
                   f"{ms['w8a8']:.1f} | {ms['rq']:.1f} | {ms['int_mm']:.1f} | {t['fp32'] / t['w8a8']:.2f}× | "
                   f"{t['bf16'] / t['w8a8']:.2f}× | {t['ck'] / t['w8a8']:.2f}× | {t['bf16'] / t['w8a16']:.2f}× | "
                   f"{t['rq'] / t['w8a8']:.0%} | {t['int_mm'] / t['w8a8']:.2f}× |")
            print(row, flush=True)
            lines.append(row)
    if not args.no_write:
        append_results("bench/kernels.py: INT8 ConvRot linear", "python bench/kernels.py " + " ".join(argv or sys.argv[1:]),
                       f"{device_name(dev)}; activations bf16; w8a8 GEMM backend `{select_gemm_backend(dev)}`",
                       lines)
    return 0


def _int_mm_w8a8(x, codes, scale, g):
    from comfyui_int8_convrot.kernels import use_backend
    with use_backend("int_mm"):
        return int8_linear(x, codes, scale, None, g, "w8a8")


def _triton_rq(x, g):
    from comfyui_int8_convrot.kernels.triton import rotate_quantize
    return rotate_quantize(x, g)


if __name__ == "__main__":
    raise SystemExit(main())
