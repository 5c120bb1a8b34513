"""ComfyUI's native INT8 ConvRot (0.29+: stock UNETLoader through comfy-kitchen) vs native + the pack's
comfy-kitchen backend vs the pack's own loader, with and without a LoRA, side by side in one run.

Usage: COMFYUI_PATH=.../ComfyUI-0.29.0 python bench/native.py [--device cpu|cuda] [--dim 1024] [--layers 0]
       [--image 256] [--caption-tokens 32] [--lora-rank 64] [--reps 1] [--no-write]
Rows (each in its own process, so the stock rows never import the pack):
- bf16:          comfy.sd.load_diffusion_model on the bf16 file the INT8 file was converted from (reference)
- native:        comfy.sd.load_diffusion_model on the INT8 file, INT8_CONVROT_CK_BACKEND=0 (stock ComfyUI)
- native + pack: the same stock loader after the pack's nodes were imported (its comfy-kitchen backend)
- our loader:    nodes/loaders.py load_unet (the pack's own ops)
With --lora-rank > 0 each row is run again with a LoRA of that rank on every block Linear (applied
the way LoraLoaderModelOnly does: comfy.sd.load_lora_for_models).
Printed and appended to bench/RESULTS.md: first forward (includes LoRA patching / weight packing),
best forward after it, the speed-up vs native, and each output's relative error vs the bf16 row with
the same LoRA (the quality figure) and vs the native row (comfy-kitchen's tolerance for two int8 paths
is 0.05).

The model is ComfyUI's own NextDiT with Z-Image's key layout. ComfyUI recognises Z-Image only at dim
3840; a smaller --dim gets the Z-Image config completed by a detection hook in the child (heads of
128, as the tests do for their tiny model): on a CPU the stock path's torch._int_mm is a scalar loop,
too slow for full-width layers on a shared 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, best_forward, device_name, peak_memory  # noqa: E402

VARIANTS = ("bf16", "native", "native+pack", "loader")
LABELS = {"bf16": "bf16 file (stock UNETLoader)", "native": "native (stock UNETLoader, comfy-kitchen)",
          "native+pack": "native + pack backend", "loader": "our loader (Int8ConvRot UNET Loader)"}


def shape_for(dim: int, layers: int):
    from comfyui_int8_convrot.engine.synthetic import ZImageShape
    if dim == 3840:
        return ZImageShape(n_layers=layers)
    ffn = ((int(dim * 8 / 3) + 255) // 256) * 256      # Z-Image's 8/3 multiplier, rounded like its 10240
    return ZImageShape(dim=dim, n_layers=layers, ffn=ffn, t_hidden=min(1024, dim))


def install_detection(dim: int, ffn: int) -> None:
    """Complete ComfyUI's Lumina2 config for a reduced-width Z-Image (what it sets itself at dim 3840)."""
    import comfy.model_detection as md
    original = md.detect_unet_config

    def detect(state_dict, key_prefix, metadata=None):
        cfg = original(state_dict, key_prefix, metadata=metadata)
        if cfg is not None and cfg.get("image_model") == "lumina2" and cfg.get("dim") == dim:
            cfg.update(n_heads=dim // 128, n_kv_heads=dim // 128, axes_dims=[32, 48, 48],
                       axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=ffn / dim,
                       multiple_of=64, z_image_modulation=True, time_scale=1000.0)
            if f"{key_prefix}cap_pad_token" in state_dict:
                cfg["pad_tokens_multiple"] = 32
        return cfg

    md.detect_unet_config = detect


def child(args) -> None:
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    import comfy.cli_args
    comfy.cli_args.args.cpu = args.device == "cpu"
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    shape = shape_for(args.dim, args.layers)
    if args.dim != 3840:
        install_detection(args.dim, shape.ffn)
    served = "comfy-kitchen (stock)"
    with torch.inference_mode():      # as ComfyUI runs nodes
        if args.variant in ("native", "bf16"):
            patcher = comfy.sd.load_diffusion_model(args.int8 if args.variant == "native" else args.bf16)
        elif args.variant == "native+pack":
            from comfyui_int8_convrot.nodes import ck_registration
            st = ck_registration.state()
            served = ck_registration.badge_text(st)
            patcher = comfy.sd.load_diffusion_model(args.int8)
        else:
            from comfyui_int8_convrot.nodes.loaders import load_unet
            patcher = load_unet(args.int8, "auto")
            served = "the pack's ops"
        if args.lora:
            lora = comfy.utils.load_torch_file(args.lora, safe_load=True)
            patcher, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
        dev = mm.get_torch_device()
        dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
        gen = torch.Generator().manual_seed(0)
        lat = args.image // 8
        x = torch.randn(1, 16, lat, lat, generator=gen).to(dev, dtype)
        ctx = torch.randn(1, args.caption_tokens, shape.cap_feat_dim, generator=gen).to(dev, dtype)
        t = torch.tensor([0.5], device=dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        mm.load_models_gpu([patcher])           # applies the LoRA patches
        dm = patcher.model.diffusion_model
        y = dm(x, t, ctx, args.caption_tokens)
        sync()
        first = time.perf_counter() - t0
        best, y = best_forward(lambda: dm(x, t, ctx, args.caption_tokens), dev, args.reps)
    peak = peak_memory(dev)
    torch.save(y.float().cpu(), args.out)
    print(json.dumps({"seconds": best, "first": first, "peak": peak, "served": served,
                      "model": type(patcher.model.model_config).__name__, "device": device_name(dev)}))


def make_lora(shape, rank: int, path: Path, seed: int = 11) -> None:
    """rank-`rank` LoRA on every block Linear, main and refiner (ComfyUI key style), small enough to
    keep outputs sane."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    d, f = shape.dim, shape.ffn
    sd = {}
    blocks = [f"layers.{i}" for i in range(shape.n_layers)]
    blocks += [f"{r}.{i}" for r in ("noise_refiner", "context_refiner") for i in range(shape.n_refiner)]
    for blk in blocks:
        for name, out_f, in_f in (("attention.qkv", 3 * d, d), ("attention.out", d, d),
                                  ("feed_forward.w1", f, d), ("feed_forward.w3", f, d), ("feed_forward.w2", d, f)):
            p = f"diffusion_model.{blk}.{name}"
            sd[f"{p}.lora_up.weight"] = (torch.randn(out_f, rank, generator=gen) * 0.02).to(torch.bfloat16)
            sd[f"{p}.lora_down.weight"] = (torch.randn(rank, in_f, generator=gen) / in_f ** 0.5).to(torch.bfloat16)
    save_file(sd, str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dim", type=int, default=None, help="model width (default: 1024 on CPU, 3840 on GPU)")
    ap.add_argument("--layers", type=int, default=0, help="main DiT blocks besides the 4 refiner blocks")
    ap.add_argument("--image", type=int, default=None, help="image side; tokens = (image/16)^2 (default: 256 CPU, 1024 GPU)")
    ap.add_argument("--caption-tokens", type=int, default=None, help="default: 32 CPU, 128 GPU")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--lora-rank", type=int, default=64, help="0: no LoRA rows")
    ap.add_argument("--reps", type=int, default=None, help="timed forwards after the first (default: 1 CPU, 5 GPU)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", dest="variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--int8", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", help=argparse.SUPPRESS)
    ap.add_argument("--lora", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    args.dim = args.dim or (3840 if gpu else 1024)
    args.image = args.image or (1024 if gpu else 256)
    args.caption_tokens = args.caption_tokens or (128 if gpu else 32)
    args.reps = args.reps or (5 if gpu else 1)
    if args.variant:
        child(args)
        return 0
    if not os.environ.get("COMFYUI_PATH"):
        ap.error("set COMFYUI_PATH to a ComfyUI tree with native INT8 (0.29+)")

    from safetensors.torch import save_file

    from comfyui_int8_convrot.engine.convert import convert_file
    from comfyui_int8_convrot.engine.quality import relative_error
    from comfyui_int8_convrot.engine.synthetic import iter_zimage

    shape = shape_for(args.dim, args.layers)
    tokens = (args.image // 16) ** 2
    load_at_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src, dst, lora = Path(tmp) / "bf16.safetensors", Path(tmp) / "int8.safetensors", Path(tmp) / "lora.safetensors"
        save_file(dict(iter_zimage(shape)), str(src))
        convert_file(src, dst, preset="zimage", group_size=args.group_size, overwrite=True)
        if args.lora_rank:
            make_lora(shape, args.lora_rank, lora)
        refs = {}
        for with_lora in ([False, True] if args.lora_rank else [False]):
            for variant in args.variants:
                out = Path(tmp) / f"{variant}-{with_lora}.pt"
                cmd = [sys.executable, __file__, "--child", variant, "--int8", str(dst), "--bf16", str(src),
                       "--out", str(out),
                       "--device", args.device, "--dim", str(args.dim), "--layers", str(args.layers),
                       "--image", str(args.image), "--caption-tokens", str(args.caption_tokens),
                       "--reps", str(args.reps)] + (["--lora", str(lora)] if with_lora else [])
                env = dict(os.environ)
                if variant != "native+pack":
                    env["INT8_CONVROT_CK_BACKEND"] = "0"
                else:
                    env.pop("INT8_CONVROT_CK_BACKEND", None)
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if r.returncode != 0:
                    print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"variant {variant} (LoRA {with_lora}) failed")
                res = json.loads(r.stdout.strip().splitlines()[-1])
                y = torch.load(out)
                refs[(variant, with_lora)] = y
                for name, ref_variant in (("rel", "native"), ("rel_bf16", "bf16")):
                    ref = refs.get((ref_variant, with_lora))
                    res[name] = float("nan") if ref is None else relative_error(y, ref)
                res.update(variant=variant, lora=with_lora)
                rows.append(res)
                print(f"{variant} LoRA={with_lora}: first {res['first']:.2f} s, forward {res['seconds']:.2f} s, "
                      f"rel. error vs bf16 {_err(res['rel_bf16'])}, vs native {_err(res['rel'])}", flush=True)

    base = {r["lora"]: r for r in rows if r["variant"] == "native"}
    lines = [f"- model: Z-Image layout, dim {shape.dim}, FFN {shape.ffn}, {args.layers} main + 4 refiner blocks, "
             f"{tokens} image + {args.caption_tokens} caption tokens, group size {args.group_size}; "
             f"detected by ComfyUI as {rows[0]['model']}; LoRA: rank {args.lora_rank} on all "
             f"{5 * (args.layers + 4)} block Linears",
             f"- ComfyUI {Path(os.environ['COMFYUI_PATH']).name}, comfy-kitchen {_ck_version()}; "
             f"best of {args.reps} after a first forward; load average at start {load_at_start:.2f} "
             "(a shared machine: other jobs may run)",
             f"- native + pack served by: {next((r['served'] for r in rows if r['variant'] == 'native+pack'), '-')}",
             "",
             "| variant | LoRA | first forward s | forward s | vs native | LoRA cost | peak "
             f"{'GPU' if gpu else 'RSS'} GiB | rel. error vs bf16 | rel. error vs native |",
             "|---|---|---|---|---|---|---|---|---|"]
    plain = {r["variant"]: r for r in rows if not r["lora"]}
    for r in rows:
        b = base.get(r["lora"])
        ratio = f"{b['seconds'] / r['seconds']:.2f}x" if b else "-"
        # What the LoRA adds to the same variant's forward (issue #11's "LoRA at full speed": <= 1.05x).
        cost = f"{r['seconds'] / plain[r['variant']]['seconds']:.3f}x" if r["lora"] else "-"
        lines.append(f"| {LABELS[r['variant']]} | {'rank ' + str(args.lora_rank) if r['lora'] else 'none'} | "
                     f"{r['first']:.2f} | {r['seconds']:.2f} | {ratio} | {cost} | {r['peak'] / 2**30:.2f} | "
                     f"{_err(r['rel_bf16'])} | {_err(r['rel'])} |")
    print("\n".join(lines))
    if not args.no_write:
        cmd = "COMFYUI_PATH=... python bench/native.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        append_results(f"Native INT8 (stock loader) vs native + pack backend vs our loader ({args.device})",
                       cmd.strip(), rows[0]["device"], lines)
    return 0


def _err(e: float) -> str:
    return "-" if math.isnan(e) else f"{e:.4f}"   # nan: the reference variant was not run


def _ck_version() -> str:
    try:
        from importlib.metadata import version
        return version("comfy-kitchen")
    except Exception:
        return "not installed"


if __name__ == "__main__":
    raise SystemExit(main())
