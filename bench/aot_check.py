"""Ahead-of-time compile check of the Triton kernels for the GPUs users have, on a machine without one.

Every config and variant the wrappers can launch is compiled with Triton's bundled ptxas to a cubin for
sm_80, sm_86, sm_89 and sm_90 (no GPU or driver needed). A variant fails the check when it does not
compile, when the GEMM has no integer MMA, when it needs more shared memory than the target allows per
block, or when ptxas reports register spills (anywhere in the kernel, which is stricter than "in the loop").

Usage: python bench/aot_check.py [--jobs 2] [--write] [--targets 80 86 89 90]
  --write appends the table to bench/RESULTS.md. tests/kernels/test_aot_compile.py runs the same code.
It must run without TRITON_INTERPRET (the interpreter replaces @triton.jit functions): it runs the
compiles in worker processes that unset it, so it can be called from an interpreter test session too.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import multiprocessing
import os
import re
import sys
import tempfile
import time

# Shared memory per block with opt-in (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TARGETS = tuple(SMEM_LIMIT)
_D16 = [["tt.divisibility", 16]]  # what a launch specializes for 16-byte aligned pointers and ints % 16


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: str        # "gemm" or "rotate_quant"
    name: str          # row label in the table
    target: int        # compute capability, e.g. 86
    constexprs: tuple  # sorted (name, value) pairs
    dtypes: tuple      # sorted (pointer arg, triton dtype) pairs
    num_warps: int
    num_stages: int


@dataclasses.dataclass
class Result:
    variant: Variant
    ok_compile: bool
    shared: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    mma: str = ""
    error: str = ""
    seconds: float = 0.0
    estimate: int | None = None  # gemm_configs.smem_bytes, which the runtime filters configs by

    def problems(self) -> list[str]:
        v = self.variant
        if not self.ok_compile:
            return [f"does not compile: {self.error}"]
        out = []
        if self.shared > SMEM_LIMIT[v.target]:
            out.append(f"shared memory {self.shared} B > {SMEM_LIMIT[v.target]} B")
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores}/{self.spill_loads} B")
        if v.kernel == "gemm" and not re.search(r"\bs8\b", self.mma):
            out.append(f"no integer MMA ({self.mma or 'none'})")
        if self.estimate is not None and self.shared > self.estimate:
            out.append(f"shared memory {self.shared} B above the runtime estimate {self.estimate} B")
        return out


# ---- what the wrappers can launch -------------------------------------------------------------------

def _gemm_configs(target: int, lora_rank: int = 0):
    try:
        from comfyui_int8_convrot.kernels.triton import gemm_configs
    except ImportError:  # before the per-architecture tables existed: one list for every GPU
        from comfyui_int8_convrot.kernels.triton import int8_gemm as G
        return G.LARGE_CONFIGS, G.SMALL_CONFIGS
    if lora_rank:
        return gemm_configs.configs_for((target // 10, target % 10), SMEM_LIMIT[target], lora_rank)
    return gemm_configs.configs_for((target // 10, target % 10), SMEM_LIMIT[target])


def _rotate_params(target: int, m: int, group_size: int, dot: str, rank: int = 0):
    import inspect
    from comfyui_int8_convrot.kernels.triton import rotate_quant as R
    if hasattr(R, "launch_params"):
        if "rank" in inspect.signature(R.launch_params).parameters:
            return R.launch_params(m, group_size, dot, rank=rank)
        return R.launch_params(m, group_size, dot)
    block_m = 16 if (m <= 2048 or group_size >= 1024) else 32  # before launch_params existed
    return block_m, (8 if group_size >= 1024 else 4), (1 if dot == "fp32" else 3)


def _rotate_launches_triton(dot: str, group_size: int) -> bool:
    from comfyui_int8_convrot.kernels.triton import rotate_quant as R
    return not (dot == "fp32" and group_size >= getattr(R, "TORCH_FP32_MIN_GROUP", 1 << 30))


def variants(targets=TARGETS) -> list[Variant]:
    out = []
    for t in targets:
        large, small = _gemm_configs(t)
        # Every config × EVEN_K (the loop), with the widest epilogue (bias, fp32 out); the other epilogues
        # (out dtype, no bias) with the first config of each list.
        for which, cfgs in (("large", large), ("small", small)):
            for i, c in enumerate(cfgs):
                kw = c.kwargs
                label = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
                epilogues = [(True, "fp32")]
                if i == 0:  # the epilogue does not touch the loop: its other variants once per list
                    epilogues += [(True, "bf16"), (True, "fp16"), (False, "bf16")]
                for even_k in (True, False):
                    for bias, out_dt in epilogues:
                        if not even_k and (bias, out_dt) != (True, "fp32"):
                            continue
                        name = f"{which} {label}" + ("" if even_k else " K-tail") + \
                            ("" if (bias, out_dt) == (True, "fp32") else f" bias={int(bias)} {out_dt}")
                        ce = dict(kw, HAS_BIAS=bias, EVEN_K=even_k, **_no_lora())
                        out.append(Variant("gemm", name, t, tuple(sorted(ce.items())),
                                           (("bias_ptr", out_dt), ("y_ptr", out_dt)), c.num_warps, c.num_stages))
        # The fused LoRA epilogue (z·upᵀ, rank padded to 16..128) on every config the runtime keeps for it.
        for rank in ((64, 128) if _has_lora() else ()):
            lora_large, lora_small = _gemm_configs(t, rank)
            for which, cfgs in (("large", lora_large), ("small", lora_small)):
                for c in cfgs:
                    kw = c.kwargs
                    label = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
                    for up_dt in ("bf16", "fp16"):
                        ce = dict(kw, HAS_BIAS=True, EVEN_K=True, R=rank)
                        out.append(Variant("gemm", f"{which} {label} LoRA r{rank} {up_dt}", t,
                                           tuple(sorted(ce.items())),
                                           (("bias_ptr", up_dt), ("u_ptr", up_dt), ("y_ptr", up_dt)),
                                           c.num_warps, c.num_stages))
        for dot in ("fp32", "bf16", "fp16"):
            for g in (0, 64, 256, 1024):  # g = 4 and 16 launch the g = 64 program with another tile
                seen = set()
                for m in (2048, 4096):
                    if not _rotate_launches_triton(dot, g):
                        continue
                    bm, warps, stages = _rotate_params(t, m, g, dot)
                    if (bm, warps, stages) in seen:
                        continue
                    seen.add((bm, warps, stages))
                    ce = dict(ROTATE=bool(g), NSUB=max(1, g // 64), BLOCK_M=bm, INTERPRET=False,
                              **_no_lora())
                    ptrs = (("h_ptr", dot if g else "fp32"), ("x_ptr", dot))
                    out.append(Variant("rotate_quant", f"{dot} g={g} BLOCK_M={bm} w{warps} s{stages}", t,
                                       tuple(sorted(ce.items())), ptrs, warps, stages))
                if g == 64 and dot != "fp32" and _has_lora():   # the fused LoRA down-projection
                    for rank in (16, 128, 256):
                        for bm, warps, stages in sorted({_rotate_params(t, m, g, dot, rank) for m in (2048, 4096)}):
                            ce = dict(ROTATE=True, NSUB=1, BLOCK_M=bm, INTERPRET=False, R=rank)
                            out.append(Variant("rotate_quant", f"{dot} g={g} BLOCK_M={bm} w{warps} s{stages} "
                                               f"LoRA r{rank}", t, tuple(sorted(ce.items())),
                                               (("h_ptr", dot), ("x_ptr", dot), ("d_ptr", dot)), warps, stages))
    return out


def _has_lora() -> bool:
    """Kernels with the fused LoRA (constexpr R) — older trees, compared by this script, have none."""
    from comfyui_int8_convrot.kernels.triton import rotate_quant as R
    return hasattr(R, "DOWN_RANKS")


def _no_lora() -> dict:
    return {"R": 0} if _has_lora() else {}


# ---- compiling one variant (in a worker process) ----------------------------------------------------

_GEMM_SIG = dict(a_ptr="*i8", b_ptr="*i8", sx_ptr="*fp32", sw_ptr="*fp32", bias_ptr="*fp32", y_ptr="*fp32",
                 M="i32", N="i32", K="i32", M_BUCKET="i32", stride_am="i32", stride_bn="i32", stride_ym="i32")
_GEMM_ALIGNED = ("a_ptr", "b_ptr", "sx_ptr", "sw_ptr", "bias_ptr", "y_ptr", "N", "K", "stride_am", "stride_bn",
                 "stride_ym")
_ROT_SIG = dict(x_ptr="*fp32", h_ptr="*fp32", q_ptr="*i8", s_ptr="*fp32", M="i32", K="i32", stride_xm="i32",
                stride_qm="i32")
_ROT_ALIGNED = ("x_ptr", "h_ptr", "q_ptr", "s_ptr", "K", "stride_xm", "stride_qm")


def _worker_init(cache_dir: str):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # fresh: a cache hit would skip ptxas and its -v report


def compile_variant(v: Variant) -> Result:
    t0 = time.time()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if v.kernel == "gemm":
        from comfyui_int8_convrot.kernels.triton.int8_gemm import _int8_gemm_rescale_kernel as fn
        sig, aligned = dict(_GEMM_SIG), _GEMM_ALIGNED
    else:
        from comfyui_int8_convrot.kernels.triton.rotate_quant import _rotate_quant_kernel as fn
        sig, aligned = dict(_ROT_SIG), _ROT_ALIGNED
    if "R" in dict(v.constexprs):   # kernels with the fused LoRA take two more pointers
        sig.update(dict(z_ptr="*fp32", u_ptr="*fp32", zc_ptr="*i32", stride_zm="i32") if v.kernel == "gemm"
                   else dict(d_ptr="*fp32", z_ptr="*fp32"))
        aligned = aligned + (("z_ptr", "u_ptr", "zc_ptr", "stride_zm") if v.kernel == "gemm" else ("d_ptr", "z_ptr"))
    for ptr, dt in v.dtypes:
        sig[ptr] = "*" + dt
    ce = dict(v.constexprs)
    sig.update({k: "constexpr" for k in ce})
    sig = {name: sig[name] for name in fn.arg_names if name in sig}   # the kernel's own argument order
    attrs = {(fn.arg_names.index(a),): _D16 for a in aligned}
    opts = dict(num_warps=v.num_warps, num_stages=v.num_stages)
    fusion = getattr(sys.modules[fn.__module__], "FP_FUSION", None)
    if fusion is not None:
        opts["enable_fp_fusion"] = fusion
    elif v.kernel == "gemm":
        opts["enable_fp_fusion"] = False  # what the GEMM wrapper passed before FP_FUSION existed
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, sig, ce, attrs), target=GPUTarget("cuda", v.target, 32), options=opts)
        # Triton < 3.4 has no triton.knobs and deletes ptxas's -v log: rerun the same ptxas on the same PTX.
        text = log.getvalue() if knobs is not None else _ptxas_report(k.asm["ptx"], v.target,
                                                                      opts.get("enable_fp_fusion", True))
    except Exception as exc:  # a failure to compile is a result, reported in the table
        msg = str(exc).strip().splitlines()
        return Result(v, False, error=(msg[0] if msg else type(exc).__name__)[:200], seconds=time.time() - t0)
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    ptx = k.asm["ptx"]
    mma = sorted(set(re.findall(r"\b((?:wgmma\.mma_async|mma\.sync)\.[\w.]+)", ptx)))
    fma = "fma" if re.search(r"\bfma\.rn\.f32\b", ptx) else ""
    estimate = None
    if v.kernel == "gemm":
        try:
            from comfyui_int8_convrot.kernels.triton import gemm_configs
            cfg = gemm_configs._cfg(ce["BLOCK_M"], ce["BLOCK_N"], ce["BLOCK_K"], v.num_stages, v.num_warps)
            estimate = gemm_configs.smem_bytes(cfg, (v.target // 10, v.target % 10))
        except ImportError:
            pass
    return Result(v, True, shared=int(k.metadata.shared), registers=max(regs, default=0), estimate=estimate,
                  spill_stores=sum(int(a) for a, _ in spills), spill_loads=sum(int(b) for _, b in spills),
                  mma=_short_mma(mma) or fma, seconds=time.time() - t0)


def _ptxas_report(ptx: str, target: int, fp_fusion: bool) -> str:
    """ptxas -v's register/spill report for this PTX, run as Triton's make_cubin runs it (bundled ptxas,
    --fmad=false without fp fusion, sm_90a on Hopper): for Triton versions whose compile keeps no log."""
    import subprocess
    from triton.backends.nvidia import compiler as nv
    ptxas = nv.get_ptxas(target)[0]
    with tempfile.TemporaryDirectory(prefix="int8-convrot-ptxas-") as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               f"--gpu-name={nv.sm_arch_from_capability(target)}", src, "-o", src + ".o"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr


def _refuse_unsupported() -> str | None:
    """Why this Triton cannot be checked (None: it can). 3.3 lacks triton.knobs (3.4+): shimmed above."""
    import triton
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.backends.nvidia import compiler as nv
    except ImportError as exc:
        return f"aot_check.py: Triton {triton.__version__} lacks what it needs ({exc}); Triton >= 3.3 is checked"
    if not hasattr(triton, "knobs") and not (hasattr(nv, "get_ptxas") and hasattr(nv, "sm_arch_from_capability")):
        return (f"aot_check.py: Triton {triton.__version__} has neither triton.knobs (3.4+) nor "
                "backends.nvidia.compiler.get_ptxas/sm_arch_from_capability to report register spills")
    return None


def _short_mma(names: list[str]) -> str:
    """mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32 → mma m16n8k32 s8 (one per kind)."""
    out = []
    for n in names:
        shape = re.search(r"\.(m\d+n\d+k\d+)", n)
        kind = "wgmma" if n.startswith("wgmma") else "mma"
        ab = re.findall(r"\.(s8|u8|bf16|f16|tf32|f32|e4m3|e5m2)\b", n)
        out.append(f"{kind} {shape.group(1) if shape else ''} {ab[-1] if ab else ''}".strip())
    return ", ".join(sorted(set(out)))


def run(targets=TARGETS, jobs: int = 2, only: str | None = None) -> list[Result]:
    vs = [v for v in variants(targets) if not only or re.search(only, f"{v.kernel} {v.name}")]
    ctx = multiprocessing.get_context("spawn")  # no forked CUDA/Triton state; picks up the env above
    with tempfile.TemporaryDirectory(prefix="int8-convrot-aot-") as cache:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                                    initargs=(cache,)) as pool:
            return list(pool.map(compile_variant, vs))


# ---- the table --------------------------------------------------------------------------------------

def _cell(r: Result) -> str:
    if not r.ok_compile:
        return "**FAILS**"
    spill = f"{r.spill_stores}/{r.spill_loads}" if (r.spill_stores or r.spill_loads) else "0"
    cell = f"{r.shared / 1024:.0f} KB, {r.registers} r, sp {spill}, {r.mma or '—'}"
    return f"**{cell}**" if r.problems() else cell


def table(results: list[Result]) -> str:
    targets = sorted({r.variant.target for r in results})
    rows: dict[tuple, dict[int, Result]] = {}
    for r in results:
        rows.setdefault((r.variant.kernel, r.variant.name), {})[r.variant.target] = r
    head = "| kernel | variant | " + " | ".join(f"sm_{t}" for t in targets) + " |"
    lines = [head, "|" + "---|" * (2 + len(targets))]
    for (kernel, name), per in rows.items():
        lines.append(f"| {kernel} | {name} | " + " | ".join(_cell(per[t]) if t in per else "not kept"
                                                         for t in targets) + " |")
    return "\n".join(lines)


def _mean_seconds(results: list[Result], target: int) -> float:
    """Mean wall seconds to compile one variant (frontend + ptxas) for a target: what a GPU run pays per
    kernel specialization it launches first (bench/gpu_check.sh estimates its compile time from it)."""
    secs = [r.seconds for r in results if r.variant.target == target]
    return sum(secs) / max(1, len(secs))


def failures(results: list[Result]) -> list[str]:
    return [f"{r.variant.kernel} {r.variant.name} sm_{r.variant.target}: {p}" for r in results for p in r.problems()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--targets", type=int, nargs="+", default=list(TARGETS))
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--title", default="AOT compile check")
    ap.add_argument("--only", help="a regular expression: check only the variants whose row label matches")
    args = ap.parse_args(argv)
    why = _refuse_unsupported()
    if why:
        print(why, file=sys.stderr)
        return 2
    t0 = time.time()
    results = run(tuple(args.targets), args.jobs, args.only)
    import triton
    bad = failures(results)
    text = table(results)
    summary = (f"- {len(results)} variants{f' matching {args.only!r}' if args.only else ''}, Triton {triton.__version__} with its bundled ptxas, no GPU; "
               f"{time.time() - t0:.0f} s with {args.jobs} jobs; compile per variant "
               + ", ".join(f"sm_{t} mean {_mean_seconds(results, t):.1f} s" for t in args.targets) + "\n"
               "- cell: shared memory per block, registers per thread, spill stores/loads (bytes per thread), "
               "MMA instruction in the PTX (`fma`: an FP32 FMA dot); **bold** fails the check\n"
               f"- shared-memory limits: " + ", ".join(f"sm_{t} {SMEM_LIMIT[t] // 1024} KB" for t in args.targets)
               + f"\n- failures: {len(bad)}")
    print(text)
    print(summary)
    for b in bad:
        print("FAIL", b)
    if args.write:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from common import append_results
        append_results(f"bench/aot_check.py: {args.title}", "python bench/aot_check.py --write",
                       "none (compiled for " + ", ".join(f"sm_{t}" for t in args.targets) + ")",
                       [summary, "", text])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
