"""Ahead-of-time compile of the Triton kernels for AMD gfx targets, with the pip Triton wheel alone (no GPU, no
ROCm): the wheel ships the AMD backend (triton/backends/amd, its ocml/ockl bitcode) and links the code object
with the LLD built into libtriton (amd.link_hsaco), so `GPUTarget("hip", "gfx942", 64)` compiles to an hsaco.

What it checks, per variant of bench/aot_check.py's generic (sm_80) config table: it compiles, the GEMM uses an
integer matrix instruction (v_mfma_i32_* on CDNA, v_wmma_i32_* on RDNA), and it reports LDS use against the
64 KB a workgroup gets on these targets, and VGPR/SGPR spills. Only compile and integer MMA fail the check: the
routing (kernels/routing.py) never launches these kernels on AMD, so LDS overflow and spills are facts
recorded for whoever tunes AMD configs, not regressions (the NVIDIA 96 KB tiles do not fit 64 KB of LDS).

Usage: python bench/aot_check_amd.py [--jobs 2] [--targets gfx942 gfx1100] [--write]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aot_check as nv  # noqa: E402  (the variant list and kernel signatures)

# target: (wave size, LDS bytes per workgroup)
AMD_TARGETS = {"gfx942": (64, 65536), "gfx1100": (32, 65536), "gfx1201": (32, 65536)}


@dataclasses.dataclass
class AmdResult:
    variant: object
    target: str
    ok_compile: bool
    lds: int = 0
    vgprs: int = 0
    spills: int = 0
    mma: str = ""
    error: str = ""

    def failures(self) -> list[str]:
        if not self.ok_compile:
            return [f"does not compile: {self.error}"]
        if self.variant.kernel == "gemm" and "_i32_" not in self.mma:
            return [f"no integer matrix instruction ({self.mma or 'none'})"]
        return []


def compile_amd(job) -> AmdResult:
    v, target = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if v.kernel == "gemm":
        from comfyui_int8_convrot.kernels.triton.int8_gemm import _int8_gemm_rescale_kernel as fn
        sig, aligned = dict(nv._GEMM_SIG), nv._GEMM_ALIGNED
    else:
        from comfyui_int8_convrot.kernels.triton.rotate_quant import _rotate_quant_kernel as fn
        sig, aligned = dict(nv._ROT_SIG), nv._ROT_ALIGNED
    if "R" in dict(v.constexprs):
        extra = (dict(z_ptr="*fp32", u_ptr="*fp32", zc_ptr="*i32", stride_zm="i32") if v.kernel == "gemm"
                 else dict(d_ptr="*fp32", z_ptr="*fp32"))
        sig.update(extra)
        aligned = aligned + tuple(extra)
    for ptr, dt in v.dtypes:
        sig[ptr] = "*" + dt
    ce = dict(v.constexprs)
    sig.update({k: "constexpr" for k in ce})
    sig = {name: sig[name] for name in fn.arg_names if name in sig}
    attrs = {(fn.arg_names.index(a),): nv._D16 for a in aligned if a in fn.arg_names}
    wave = AMD_TARGETS[target][0]
    try:
        k = triton.compile(ASTSource(fn, sig, ce, attrs), target=GPUTarget("hip", target, wave),
                           options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        return AmdResult(v, target, False, error=(msg[0] if msg else type(exc).__name__)[:200])
    asm = k.asm.get("amdgcn", "")
    vg = [int(x) for x in re.findall(r"\.vgpr_count:\s+(\d+)", asm)]
    sp = [int(x) for x in re.findall(r"\.(?:vgpr|sgpr)_spill_count:\s+(\d+)", asm)]
    mma = sorted(set(re.findall(r"\b(v_(?:mfma|wmma)_\w+)", asm)))
    return AmdResult(v, target, True, lds=int(k.metadata.shared), vgprs=max(vg, default=0), spills=sum(sp),
                     mma=", ".join(mma))


def run(targets, jobs: int):
    """Every variant of the generic config table for each target, in spawned workers without TRITON_INTERPRET
    (aot_check's worker setup: a fresh Triton cache)."""
    work = [(v, t) for t in targets for v in nv.variants((80,))]
    with tempfile.TemporaryDirectory(prefix="int8-convrot-aot-amd-") as cache, \
            concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                   initializer=nv._worker_init, initargs=(cache,)) as pool:
        return list(pool.map(compile_amd, work))


def _cell(r: AmdResult) -> str:
    if not r.ok_compile:
        return "**FAILS**"
    lds = AMD_TARGETS[r.target][1]
    cell = f"{r.lds / 1024:.0f} KB, {r.vgprs} v, sp {r.spills}, {r.mma.split(', ')[0] if r.mma else '—'}"
    return f"**{cell}**" if (r.failures() or r.lds > lds or r.spills) else cell


def table(results) -> str:
    targets = list(dict.fromkeys(r.target for r in results))
    rows: dict = {}
    for r in results:
        rows.setdefault((r.variant.kernel, r.variant.name), {})[r.target] = r
    lines = ["| kernel | variant | " + " | ".join(targets) + " |", "|" + "---|" * (2 + len(targets))]
    for (kernel, name), per in rows.items():
        lines.append(f"| {kernel} | {name} | " + " | ".join(_cell(per[t]) for t in targets) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--targets", nargs="+", default=list(AMD_TARGETS), choices=list(AMD_TARGETS))
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)
    t0 = time.time()
    results = run(args.targets, args.jobs)
    import triton
    bad = [f"{r.variant.kernel} {r.variant.name} {r.target}: {p}" for r in results for p in r.failures()]
    over = sum(1 for r in results if r.ok_compile and r.lds > AMD_TARGETS[r.target][1])
    spill = sum(1 for r in results if r.ok_compile and r.spills)
    text = table(results)
    summary = (f"- {len(results)} compiles, Triton {triton.__version__} pip wheel (AMD backend, built-in LLD), no GPU"
               f" and no ROCm; {time.time() - t0:.0f} s with {args.jobs} jobs\n"
               "- cell: LDS per workgroup, VGPRs, spill count, first matrix instruction; **bold**: fails, or "
               "exceeds 64 KB LDS, or spills\n"
               f"- failures (compile / integer MMA): {len(bad)}; over 64 KB LDS: {over}; spilling: {spill}")
    print(text)
    print(summary)
    for b in bad:
        print("FAIL", b)
    if args.write:
        from common import append_results
        append_results("bench/aot_check_amd.py: AOT compile for AMD gfx targets", "python bench/aot_check_amd.py "
                       "--write", "none (compiled for " + ", ".join(args.targets) + ")", [summary, "", text])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
