"""The README's main job on a built-in default: make a Z-Image-shaped bf16 checkpoint, convert it
to INT8 ConvRot with the streaming converter, load it through the INT8 ConvRot UNET Loader's code
path (inside ComfyUI when $COMFYUI_PATH points at a tree, else the engine alone), and report speed,
memory and error against bf16."""
from __future__ import annotations

import argparse

from .model_demo import run_model_demo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="int8-convrot demo", description=__doc__)
    ap.add_argument("--layers", type=int, default=0,
                    help="main DiT blocks on top of the 4 refiner blocks (Z-Image has 30; default 0)")
    ap.add_argument("--image-size", type=int, default=256, help="pixels per side (tokens = (size/16)^2)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--comfyui", default=None, help="ComfyUI tree (default: $COMFYUI_PATH; none: engine only)")
    args = ap.parse_args(argv)
    run_model_demo(comfyui=args.comfyui, n_layers=args.layers, image_size=args.image_size,
                   group_size=args.group_size, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
