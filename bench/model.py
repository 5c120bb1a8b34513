"""End-to-end DiT forward: a Z-Image-shaped model (full widths, fewer blocks) in bf16 vs INT8 ConvRot
(w8a16, w8a8), loaded through ComfyUI (stock loader vs our loader), side by side.

Usage: COMFYUI_PATH=... python bench/model.py [--device cuda|cpu] [--layers 4] [--image 1024]
       [--caption-tokens 128] [--modes w8a16 w8a8] [--reps 3] [--no-write]
Each variant runs in its own process (clean peak-memory figures): forward time (best of --reps after
a warm-up), weight memory as ComfyUI counts it (module_size), peak memory (GPU: max allocated; CPU:
the process's peak RSS, ComfyUI's own ~1 GB included) and the output's error against bf16.
Targets on a data-center GPU: weights ≤ 0.52× bf16, w8a8 forward ≥ 1.35× faster than bf16.
Results are appended to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, best_forward, device_name, peak_memory  # noqa: E402


def child(args) -> None:
    """One variant in this process: load, warm up, time, write the output and figures."""
    comfy = os.environ["COMFYUI_PATH"]
    sys.path.insert(0, comfy)
    import comfy.cli_args
    comfy.cli_args.args.cpu = args.device == "cpu"
    import comfy.model_management as mm
    import comfy.sd
    from comfyui_int8_convrot.nodes.loaders import load_unet

    if args.variant == "bf16":
        opts = {"dtype": torch.bfloat16} if args.device == "cuda" else {}
        patcher = comfy.sd.load_diffusion_model(args.src, model_options=opts)
    else:
        patcher = load_unet(args.int8, args.variant)
    mm.load_models_gpu([patcher])
    dev = mm.get_torch_device()
    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    gen = torch.Generator().manual_seed(0)
    lat = args.image // 8
    x = torch.randn(1, 16, lat, lat, generator=gen).to(dev, dtype)
    ctx = torch.randn(1, args.caption_tokens, 2560, generator=gen).to(dev, dtype)
    t = torch.tensor([0.5], device=dev)
    dm = patcher.model.diffusion_model
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        dm(x, t, ctx, args.caption_tokens)
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        best, y = best_forward(lambda: dm(x, t, ctx, args.caption_tokens), dev, args.reps)
    peak = peak_memory(dev)
    torch.save(y.float().cpu(), args.out)
    print(json.dumps({"seconds": best, "weights": patcher.model_size(), "peak": peak,
                      "dtype": str(dtype).replace("torch.", ""), "model": type(patcher.model.model_config).__name__,
                      "device": device_name(dev)}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None, help="main DiT blocks (default: 4 on GPU, 2 on CPU)")
    ap.add_argument("--image", type=int, default=None,
                    help="image side in pixels; tokens = (image/16)^2 (default: 1024 on GPU, 512 on CPU)")
    ap.add_argument("--caption-tokens", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["w8a16", "w8a8"])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=None, help="timed forwards per variant (default: 5 GPU, 1 CPU)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--machine", default=None, help="machine description for RESULTS.md (default: detected)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", dest="variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--int8", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    args.layers = args.layers if args.layers is not None else (4 if gpu else 2)
    args.image = args.image or (1024 if gpu else 512)
    args.reps = args.reps or (5 if gpu else 1)
    if args.variant:
        child(args)
        return 0
    if not os.environ.get("COMFYUI_PATH"):
        ap.error("set COMFYUI_PATH to a ComfyUI tree (the DiT is ComfyUI's own NextDiT)")

    from comfyui_int8_convrot.engine.convert import convert_file
    from comfyui_int8_convrot.engine.synthetic import ZImageShape, iter_zimage
    from safetensors.torch import save_file

    shape = ZImageShape(n_layers=args.layers)
    tokens = (args.image // 16) ** 2
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src, dst = Path(tmp) / "bf16.safetensors", Path(tmp) / "int8.safetensors"
        save_file(dict(iter_zimage(shape)), str(src))
        bf16_bytes = src.stat().st_size          # 2 bytes per parameter (+ a small header)
        summary = convert_file(src, dst, preset="zimage", group_size=args.group_size, overwrite=True)
        print(summary.to_text())
        rows, ref = [], None
        for variant in ["bf16"] + list(args.modes):
            out = Path(tmp) / f"{variant}.pt"
            cmd = [sys.executable, __file__, "--child", variant, "--src", str(src), "--int8", str(dst),
                   "--out", str(out), "--device", args.device, "--layers", str(args.layers), "--image", str(args.image),
                   "--caption-tokens", str(args.caption_tokens), "--reps", str(args.reps)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {variant} failed")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            y = torch.load(out)
            if ref is None:
                ref = y
            res["rel"] = ((ref.double() - y.double()).norm() / ref.double().norm()).item()
            res["cos"] = torch.nn.functional.cosine_similarity(ref.double().flatten(), y.double().flatten(), 0).item()
            res["variant"] = variant
            rows.append(res)
            print(f"{variant}: {res['seconds']:.3f} s", flush=True)

    base = rows[0]
    params = bf16_bytes / 2
    lines = [f"- model: Z-Image layout, dim {shape.dim}, FFN {shape.ffn}, {args.layers} main + 4 refiner blocks "
             f"({params / 1e9:.2f} B params), {tokens} image + {args.caption_tokens} caption tokens "
             f"({args.image}x{args.image}), group size {args.group_size}, compute {base['dtype']}, "
             f"best of {args.reps} after a warm-up; detected by ComfyUI as {base['model']}",
             f"- load average at start {load_at_start:.2f} (a shared machine: other jobs may run)",
             "",
             f"| variant | forward s | vs bf16 | weights GiB | weights / bf16 | peak {'GPU' if gpu else 'RSS'} GiB "
             "| rel. error | cosine |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "bf16 file, ComfyUI stock" if r["variant"] == "bf16" else f"INT8 ConvRot {r['variant']}"
        lines.append(f"| {name} | {r['seconds']:.3f} | {base['seconds'] / r['seconds']:.2f}x | "
                     f"{r['weights'] / 2**30:.3f} | {r['weights'] / bf16_bytes:.2f} | {r['peak'] / 2**30:.2f} | "
                     f"{r['rel']:.4f} | {r['cos']:.5f} |")
    if not gpu:
        lines.append("")
        lines.append("On CPU ComfyUI computes in float32 and upcasts the bf16 file's weights to float32 "
                     "(hence the stock row's weights = 2x bf16); 'weights / bf16' compares with 2 bytes per "
                     "parameter. Peak RSS includes ComfyUI's own imports.")
    print("\n".join(lines))
    if not args.no_write:
        machine = args.machine or base["device"]
        cmd = "COMFYUI_PATH=... python bench/model.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        append_results(f"DiT forward, bf16 vs INT8 ConvRot ({args.device})", cmd.strip(), machine, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
