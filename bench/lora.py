"""Exact LoRA on an INT8 ConvRot Linear: forward time with vs without the low-rank terms, and the
error of both against the float model, per Linear at Z-Image shapes.

Usage: python bench/lora.py [--device cpu|cuda] [--tokens 4096] [--ranks 16 64] [--dtype float32]
       [--reps 3] [--threads 1] [--no-write]
Each layer gets one plain LoRA of each rank (the fused qkv gets three, on its q/k/v rows, as a
diffusers-style to_q/to_k/to_v LoRA is mapped), stored in bf16 like LoRA files, with
‖ΔW‖ = 10% of ‖W‖. Base and LoRA calls alternate and each keeps its best of --reps. On CPU the
time is the calling thread's CPU time with --threads torch threads (default 1, where all the work
runs in the calling thread): on a shared, oversubscribed machine wall time mostly measures the
other jobs, thread CPU time the work itself. "with LoRA" is the layer as ComfyUI runs it (on CUDA the
terms are fused into the Triton W8A8 kernels where they can be: engine.linear.fuses_lowrank_triton);
"added after" is the INT8 call followed by apply_lowrank onto its output (the unfused path; on CPU the
same as "with LoRA"), timed side by side.
Errors are relative Frobenius errors against float64 x·(W + ΔW)ᵀ (resp. x·Wᵀ) on the first 256
tokens. ComfyUI computes in float32 on CPU, hence the default --dtype there. Results are appended to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from comfyui_int8_convrot.engine import linear as engine_linear
from comfyui_int8_convrot.engine.linear import LowRankTerm, PrepackCache, apply_lowrank, int8_forward
from comfyui_int8_convrot.engine.synthetic import linear_weight
from comfyui_int8_convrot.kernels import quantize_weight, resolve_mode, select_gemm_backend

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import append_results, device_name  # noqa: E402

# (in, out, row slices the LoRA terms cover; None: the whole output)
SHAPES = [(3840, 11520, [(0, 3840), (3840, 3840), (7680, 3840)]),   # qkv with to_q/to_k/to_v LoRAs
          (3840, 3840, [None]), (3840, 10240, [None]), (10240, 3840, [None])]
ERR_TOKENS = 256


def lora_terms(w: torch.Tensor, rows, rank: int, gen: torch.Generator, rel: float = 0.1):
    """bf16 LoRA terms whose dense update has ‖ΔW‖ ≈ rel·‖W‖ (split evenly over the row slices)."""
    terms = []
    for r in rows:
        n = w.shape[0] if r is None else r[1]
        up = torch.randn(n, rank, generator=gen)
        down = torch.randn(rank, w.shape[1], generator=gen)
        norm = (up @ down).norm()
        target = rel * w.norm() / len(rows) ** 0.5
        c = (target / norm).sqrt()
        terms.append(LowRankTerm((down * c).bfloat16(), (up * c).bfloat16(), 1.0, r))
    return tuple(terms)


def rel_err(ref: torch.Tensor, y: torch.Tensor) -> float:
    return ((ref - y.double()).norm() / ref.norm()).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dtype", default=None, help="activation dtype (default: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--mode", default="auto")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU only)")
    ap.add_argument("--shapes", default=None, help="comma-separated in→out subset, e.g. 3840x3840,10240x3840")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if dev.type == "cpu" else "bfloat16"))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    clock = time.perf_counter
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
        clock = time.thread_time if args.threads == 1 else time.process_time
    shapes = SHAPES
    if args.shapes:
        want = {tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")}
        shapes = [s for s in SHAPES if (s[0], s[1]) in want]
    load = os.getloadavg()[0]
    header = ("| in→out | LoRA terms | rank | base ms | with LoRA ms | ratio | added after ms | ratio | "
              "rel. error without | rel. error with | error ratio |")
    lines = [header, "|" + "---|" * 11]
    print(header, flush=True)
    gen = torch.Generator().manual_seed(0)
    for k, n, rows in shapes:
        w = linear_weight(n, k, gen)
        codes, scale = quantize_weight(w, 64)
        codes, scale = codes.to(dev), scale.to(dev)
        cache = PrepackCache()
        x = torch.randn(args.tokens, k, generator=gen).to(dev, dtype)
        xr = x[:ERR_TOKENS].double().cpu()
        ref_base = F.linear(xr, w.double())
        for rank in args.ranks:
            terms = lora_terms(w, rows, rank, gen)
            dense = w.double() + sum(t.delta(n, torch.float64) for t in terms)
            ref_lora = F.linear(xr, dense)
            # As nodes/ops.py attaches them: one LowRankSet per patch set (older engines: a tuple).
            terms_dev = getattr(engine_linear, "LowRankSet", tuple)(t.to(dev, t.down.dtype) for t in terms)

            def call(lr):
                y = int8_forward(x, codes, scale, None, 64, args.mode, cache, lr)
                sync()
                return y

            y_base, y_lora = call(()), call(terms_dev)   # warm-up (prepack, caches)
            best = {"base": float("inf"), "lora": float("inf"), "after": float("inf")}

            def after():   # the INT8 call, then the terms added onto its output
                y = apply_lowrank(call(()), x, terms_dev)
                sync()
                return y
            y_after = after()
            for _ in range(args.reps):
                for name, fn in (("base", lambda: call(())), ("lora", lambda: call(terms_dev)), ("after", after)):
                    t0 = clock()
                    fn()
                    best[name] = min(best[name], clock() - t0)
            e0 = rel_err(ref_base, y_base[:ERR_TOKENS].cpu())
            e1 = rel_err(ref_lora, y_lora[:ERR_TOKENS].cpu())
            e_after = rel_err(ref_lora, y_after[:ERR_TOKENS].cpu())
            if abs(e_after - e1) > 0.05 * e1:
                raise SystemExit(f"fused and added-after LoRA disagree: {e1:.5f} vs {e_after:.5f}")
            line = (f"| {k}→{n} | {len(terms)} | {rank} | {best['base'] * 1e3:.1f} | {best['lora'] * 1e3:.1f} | "
                    f"{best['lora'] / best['base']:.3f}× | {best['after'] * 1e3:.1f} | "
                    f"{best['after'] / best['base']:.3f}× | {e0:.5f} | {e1:.5f} | {e1 / e0:.3f} |")
            lines.append(line)
            print(line, flush=True)
    mode = resolve_mode(args.mode, x, args.tokens)
    meta = [f"- {args.tokens} tokens, activations {str(dtype).replace('torch.', '')}, mode {args.mode} "
            f"(runs {mode}, GEMM backend `{select_gemm_backend(dev)}`), group size 64, best of {args.reps} "
            f"interleaved; load average at start {load:.2f}"
            + (f"; {args.threads} torch thread(s), times are {clock.__name__}" if dev.type == "cpu" else ""), ""]
    print("\n".join(meta))
    if not args.no_write:
        cmd = "python bench/lora.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_results(f"bench/lora.py: LoRA overhead on an INT8 ConvRot Linear ({args.device})", cmd.strip(),
                       device_name(dev), meta + lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
