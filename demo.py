"""The README's main job on a built-in default: make a Z-Image-shaped bf16 checkpoint, convert it to
INT8 ConvRot with the streaming converter, load it through the INT8 ConvRot UNET Loader (inside
ComfyUI when one is found: --comfyui, $COMFYUI_PATH, or the ComfyUI this pack is installed in) or the
engine alone, and report speed, memory and error against bf16 (and against ComfyUI's own INT8 where it
has it)."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch


def find_comfyui(explicit=None) -> Path | None:
    """--comfyui, else $COMFYUI_PATH, else the ComfyUI this pack sits in (ComfyUI/custom_nodes/<pack>)."""
    here = Path(__file__).resolve().parent
    for p in (explicit, os.environ.get("COMFYUI_PATH"),
              here.parent.parent if here.parent.name == "custom_nodes" else None):
        if p and (Path(p) / "comfy").is_dir() and (Path(p) / "main.py").is_file():
            return Path(p)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="int8-convrot demo", description=__doc__)
    ap.add_argument("--layers", type=int, default=0,
                    help="main DiT blocks on top of the 4 refiner blocks (Z-Image has 30; default 0)")
    ap.add_argument("--image-size", type=int, default=256, help="pixels per side (tokens = (size/16)^2)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--comfyui", default=None, help="ComfyUI tree (default: $COMFYUI_PATH or the one the pack is in)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    comfy = find_comfyui(args.comfyui)
    if comfy is None:
        print("ComfyUI not found (set COMFYUI_PATH, or install the pack in ComfyUI/custom_nodes): running the "
              "engine alone on the tiny Z-Image layout")
        from .engine.model_demo import run_engine_demo
        run_engine_demo(group_size=args.group_size, tokens=(args.image_size // 16) ** 2, device=device)
        return 0
    from .comfyui_demo import run_comfyui_demo
    print(f"ComfyUI: {comfy}")
    with tempfile.TemporaryDirectory() as tmp:
        run_comfyui_demo(comfy, Path(tmp), n_layers=args.layers, image_size=args.image_size,
                         group_size=args.group_size, device=device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
