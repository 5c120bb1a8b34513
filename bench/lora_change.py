"""The first forward after a LoRA change against a steady forward, our UNET loader (layers=pack) on CPU,
in a real ComfyUI: issue #18 item 4 ("a LoRA change costs about one forward"; target <= 1.5x).

Usage: COMFYUI_PATH=.../ComfyUI-0.29.0 python bench/lora_change.py [--dim 3840] [--layers 0] [--image 256]
       [--caption-tokens 32] [--lora-rank 64] [--reps 3] [--mode auto] [--no-write]
One model (Z-Image layout, ComfyUI's own NextDiT; default dim 3840 with the 4 refiner blocks: ~0.73 B
parameters) is loaded with the pack's loader, then driven as a ComfyUI user does with LoraLoaderModelOnly:
add LoRA A at 1.0, change its strength to 0.5, swap to LoRA B, remove it. Each step's "first forward" is
ComfyUI's load_models_gpu (which unpatches and re-patches the weights) plus one forward; it is set against
the best of --reps forwards of the same patched model right after. Both behaviours run in one process on a
freshly loaded model each, side by side:
- before: the CPU pack is dropped whenever ComfyUI re-assigns a weight (the code up to 71b42d8; restored
  here by making PrepackCache.packed_from say no, which is all that changed for plain LoRAs),
- after:  the pack survives while the codes are the same tensor, unwritten.
"re-packs" counts kernels.prepack calls during that step's first forward; outputs of both behaviours are
compared bit for bit. Times are the calling thread's CPU time with --threads torch threads (default 1,
where all the work runs in that thread): on a shared, oversubscribed machine wall time mostly measures
the other jobs.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, device_name  # noqa: E402
from native import install_detection, make_lora, shape_for  # noqa: E402


class PrepackCounter:
    """Counts kernels.prepack calls (each one is a full re-pack of one layer's weight)."""

    def __init__(self):
        from comfyui_int8_convrot import kernels
        self.kernels, self.original, self.calls = kernels, kernels.prepack, 0

        def counted(codes, scale):
            self.calls += 1
            return self.original(codes, scale)
        kernels.prepack = counted

    def restore(self):
        self.kernels.prepack = self.original


def run_steps(args, int8: Path, loras: dict, before: bool):
    """[(step, first s, steady s, re-packs, output)] for one freshly loaded model."""
    import comfy.model_management as mm
    import nodes
    from comfyui_int8_convrot.engine.linear import PrepackCache
    from comfyui_int8_convrot.nodes.loaders import load_unet

    original = PrepackCache.packed_from
    if before:
        PrepackCache.packed_from = lambda self, codes: False
    counter = PrepackCounter()
    try:
        shape = shape_for(args.dim, args.layers)
        gen = torch.Generator().manual_seed(0)
        lat = args.image // 8
        x = torch.randn(1, 16, lat, lat, generator=gen)
        ctx = torch.randn(1, args.caption_tokens, shape.cap_feat_dim, generator=gen)
        t = torch.tensor([0.5])
        base = load_unet(str(int8), args.mode, layers="pack")
        loader = nodes.LoraLoaderModelOnly()
        steps = [("no LoRA (first load)", lambda: base),
                 ("add LoRA A @1.0", lambda: loader.load_lora_model_only(base, loras["A"], 1.0)[0]),
                 ("strength A 1.0 -> 0.5", lambda: loader.load_lora_model_only(base, loras["A"], 0.5)[0]),
                 ("swap A -> B", lambda: loader.load_lora_model_only(base, loras["B"], 1.0)[0]),
                 ("remove LoRA", lambda: base)]
        out = []
        for name, make in steps:
            patcher = make()
            dm = patcher.model.diffusion_model
            counter.calls = 0
            t0 = time.thread_time()
            mm.load_models_gpu([patcher])
            y = dm(x, t, ctx, args.caption_tokens)
            first = time.thread_time() - t0
            repacks = counter.calls
            steady, y2 = float("inf"), None
            for _ in range(args.reps):
                t0 = time.thread_time()
                y2 = dm(x, t, ctx, args.caption_tokens)
                steady = min(steady, time.thread_time() - t0)
            assert torch.equal(y, y2), f"{name}: the steady forward differs from the first"
            out.append((name, first, steady, repacks, y))
            print(f"{'before' if before else 'after '} {name}: first {first:.3f} s, steady {steady:.3f} s, "
                  f"{first / steady:.2f}x, re-packs {repacks}", flush=True)
        mm.unload_all_models()
        return out
    finally:
        counter.restore()
        PrepackCache.packed_from = original


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=3840)
    ap.add_argument("--layers", type=int, default=0, help="main DiT blocks besides the 4 refiner blocks")
    ap.add_argument("--image", type=int, default=256, help="image side; tokens = (image/16)^2")
    ap.add_argument("--caption-tokens", type=int, default=32)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mode", default="auto", choices=["auto", "w8a8", "w8a16"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (times are the calling thread's CPU time)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        ap.error("set COMFYUI_PATH to a ComfyUI tree")
    sys.path.insert(0, comfy_path)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import folder_paths
    from safetensors.torch import save_file

    from comfyui_int8_convrot.engine.convert import convert_file
    from comfyui_int8_convrot.engine.synthetic import iter_zimage
    from comfyui_int8_convrot.kernels import cpu_int8_gemm

    shape = shape_for(args.dim, args.layers)
    if args.dim != 3840:
        install_detection(args.dim, shape.ffn)
    tokens = (args.image // 16) ** 2
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, torch.inference_mode():   # as ComfyUI runs nodes
        tmp = Path(tmp)
        src, int8 = tmp / "bf16.safetensors", tmp / "int8.safetensors"
        save_file(dict(iter_zimage(shape)), str(src))
        convert_file(src, int8, preset="zimage", group_size=64, overwrite=True)
        src.unlink()
        (tmp / "loras").mkdir()
        loras = {"A": "bench_lora_a.safetensors", "B": "bench_lora_b.safetensors"}
        make_lora(shape, args.lora_rank, tmp / "loras" / loras["A"], seed=11)
        make_lora(shape, args.lora_rank, tmp / "loras" / loras["B"], seed=12)
        folder_paths.add_model_folder_path("loras", str(tmp / "loras"))
        after = run_steps(args, int8, loras, before=False)
        before = run_steps(args, int8, loras, before=True)

    same = all(torch.equal(a[4], b[4]) for a, b in zip(after, before))
    lines = [f"- model: Z-Image layout (ComfyUI's NextDiT), dim {shape.dim}, FFN {shape.ffn}, {args.layers} main + "
             f"4 refiner blocks, {tokens} image + {args.caption_tokens} caption tokens, group size 64; our loader, "
             f"layers=pack, mode {args.mode}; CPU GEMM {cpu_int8_gemm.backend()}; LoRAs: rank {args.lora_rank} on "
             f"all {5 * (args.layers + 4)} block Linears, applied with LoraLoaderModelOnly",
             f"- ComfyUI {Path(comfy_path).name}; 'first' = load_models_gpu + one forward after the change; "
             f"'steady' = best of {args.reps} forwards right after; thread CPU time, {args.threads} torch "
             f"thread(s); load average at start {load_at_start:.2f} "
             "(a shared machine)",
             f"- outputs of before and after bit-identical at every step: {'yes' if same else 'NO'}",
             "",
             "| step | before: first s | before: steady s | before: first/steady | before: re-packs "
             "| after: first s | after: steady s | after: first/steady | after: re-packs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a, b in zip(after, before):
        lines.append(f"| {a[0]} | {b[1]:.3f} | {b[2]:.3f} | {b[1] / b[2]:.2f}x | {b[3]} "
                     f"| {a[1]:.3f} | {a[2]:.3f} | {a[1] / a[2]:.2f}x | {a[3]} |")
    print("\n".join(lines))
    if not same:
        print("ERROR: outputs differ between before and after", file=sys.stderr)
        return 1
    if not args.no_write:
        cmd = "COMFYUI_PATH=... python bench/lora_change.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        append_results("First forward after a LoRA change, our loader layers=pack (cpu)", cmd.strip(),
                       device_name(torch.device("cpu")), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
