"""The README's main job (`bash scripts/demo.sh`): build the built-in Z-Image checkpoint at the real
widths, convert it with the streaming converter, compare every quantized Linear at 1024² against what
ComfyUI computes for the bf16 file, and draw the result as a PNG. Inside a ComfyUI (--comfyui,
$COMFYUI_PATH, or the ComfyUI this pack is installed in) it adds whole-model rows through ComfyUI's
stock loader and ours.

Floors: `engine_run` and `report_png` import only engine/ and kernels/ (they run on a fresh clone);
`comfyui_run` imports nodes/ and ComfyUI and is imported only when a ComfyUI is found.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def find_comfyui(explicit=None) -> Path | None:
    """--comfyui, else $COMFYUI_PATH, else the ComfyUI this pack sits in (ComfyUI/custom_nodes/<pack>)."""
    pack = Path(__file__).resolve().parent.parent
    for p in (explicit, os.environ.get("COMFYUI_PATH"),
              pack.parent.parent if pack.parent.name == "custom_nodes" else None):
        if p and (Path(p) / "comfy").is_dir() and (Path(p) / "main.py").is_file():
            return Path(p)
    return None


def _machine(device: str) -> str:
    import platform

    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        from ..bench.machine import cpu_model   # the benchmarks' CPU line; bench/ is not in a wheel
    except ImportError:
        cpu_model = platform.processor
    return f"{cpu_model() or 'CPU'}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="int8-convrot demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--png", default="int8_convrot_demo.png", help="where the picture goes (default: %(default)s)")
    ap.add_argument("--small", action="store_true",
                    help="a narrow layout (dim 256) at 256x256: seconds instead of a minute (tests)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--comfyui", default=None, help="ComfyUI tree (default: $COMFYUI_PATH or the one the pack is in)")
    ap.add_argument("--no-comfyui", action="store_true", help="skip the ComfyUI rows even when a ComfyUI is found")
    ap.add_argument("--comfyui-layers", type=int, default=0,
                    help="ComfyUI rows: main DiT blocks on top of the 4 refiner blocks (Z-Image has 30)")
    ap.add_argument("--comfyui-image-size", type=int, default=256,
                    help="ComfyUI rows: pixels per side of the whole-model forward (default %(default)s)")
    args = ap.parse_args(argv)
    import torch
    from .engine_run import DEMO_SHAPE, SMALL_SHAPE, format_table, run_engine
    try:
        from .report_png import write_png
    except ImportError as exc:   # Pillow comes with ComfyUI and torchvision; say so rather than a traceback
        raise SystemExit(f"demo: the PNG report needs Pillow ({exc}); `pip install pillow`") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="int8-convrot-demo-") as tmp:
        rep = run_engine(Path(tmp), shape=SMALL_SHAPE if args.small else DEMO_SHAPE,
                         image_size=256 if args.small else 1024, group_size=args.group_size, device=device)
    print("\n".join(format_table(rep)))
    png = write_png(rep, Path(args.png), _machine(device))
    print(f"engine run: {time.perf_counter() - t0:.1f} s")
    print(f"report: {png.resolve()}")
    comfy = None if args.no_comfyui else find_comfyui(args.comfyui)
    if comfy is None:
        print("ComfyUI rows: no ComfyUI found (set COMFYUI_PATH, or install the pack in ComfyUI/custom_nodes)")
        return 0
    from .comfyui_run import run_comfyui_demo
    print(f"ComfyUI: {comfy}")
    with tempfile.TemporaryDirectory(prefix="int8-convrot-demo-") as tmp:
        run_comfyui_demo(comfy, Path(tmp), n_layers=args.comfyui_layers, image_size=args.comfyui_image_size,
                         group_size=args.group_size, device=device)
    return 0
