"""Benchmark: our streaming converter vs convert-to-quant (`ctq`) on the same bf16 file, side by side.

    python bench/convert.py [--workdir DIR] [--skip-full] [--keep]

1. Writes a ~1.46 GB bf16 file with Z-Image's key layout and full-size layers (dim 3840, FFN 10240;
   2 layers + 1 noise refiner + 1 context refiner: engine.synthetic.ZIMAGE_BENCH), streamed to disk.
2. Converts it with `ctq --int8 --scaling_mode row --simple --low-memory --convrot --convrot-group-size 64
   --zimage --comfy_quant --save-quant-metadata --device cpu` and with `int8-convrot convert --device cpu`,
   each in its own process: wall time, peak RSS (ru_maxrss from wait4, which includes the interpreter's
   teardown) and the peak VmHWM / RssAnon sampled from /proc while the process runs.
3. Checks that both outputs hold identical tensors (codes, scales, comfy_quant, kept tensors).
4. Converts a full-size Z-Image layout (6.15 B parameters, ~12.3 GB bf16) with ours, for its peak RSS.
Results are appended to bench/RESULTS.md; generated files are deleted unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parent))
# No torch here: the measuring process must stay small (see in_child); bench/common imports it at the end.
from machine import cpu_model  # noqa: E402

CTQ_FLAGS = ["--int8", "--scaling_mode", "row", "--simple", "--low-memory", "--convrot", "--convrot-group-size", "64",
             "--zimage", "--comfy_quant", "--save-quant-metadata", "--device", "cpu"]


def write_synthetic(path: Path, items, reserve: int = 1 << 20) -> int:
    """Stream tensors of unknown count to a safetensors file: data first, then the header (padded with
    spaces into a reserved area), so a 12 GB model never sits in memory."""
    from comfyui_int8_convrot.engine.safetensors_writer import st_dtype, tensor_bytes
    header, offset = {}, 0
    with open(path, "wb") as f:
        f.seek(8 + reserve)
        for name, t in items:
            mv = tensor_bytes(t)
            f.write(mv)
            header[name] = {"dtype": st_dtype(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + mv.nbytes]}
            offset += mv.nbytes
        raw = json.dumps(header).encode()
        assert len(raw) <= reserve, "header larger than the reserved area"
        f.seek(0)
        f.write(struct.pack("<Q", reserve) + raw + b" " * (reserve - len(raw)))
    return path.stat().st_size


def run_measured(cmd: list[str]) -> dict:
    """Run `cmd`; wall time, ru_maxrss, and VmHWM/RssAnon peaks sampled every 20 ms from /proc."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"VmHWM": 0, "RssAnon": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall_s": wall, "maxrss": rusage.ru_maxrss * 1024, "hwm": peaks["VmHWM"], "anon": peaks["RssAnon"],
            "user_s": rusage.ru_utime, "sys_s": rusage.ru_stime, "log": out}


def compare(a_path: Path, b_path: Path) -> list[str]:
    import torch
    from safetensors import safe_open
    diffs = []
    with safe_open(str(a_path), "pt") as a, safe_open(str(b_path), "pt") as b:
        if set(a.keys()) != set(b.keys()):
            return [f"tensor names differ: {sorted(set(a.keys()) ^ set(b.keys()))[:5]}"]
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                diffs.append(k)
        ma, mb = a.metadata() or {}, b.metadata() or {}
        if json.loads(ma["_quantization_metadata"]) != json.loads(mb["_quantization_metadata"]):
            diffs.append("_quantization_metadata")
        diffs += [f"header key {k}" for k in sorted(set(ma) ^ set(mb))]
    return diffs


def in_child(*args: str) -> str:
    """Run a torch-using step in a child process: the measuring parent stays small, because a forked
    child starts with its parent's resident pages and they would count in the child's ru_maxrss."""
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout.strip()


def child_main(argv: list[str]) -> int:
    if argv[0] == "--generate":
        from comfyui_int8_convrot.engine import synthetic
        shape = {"bench": synthetic.ZIMAGE_BENCH, "full": synthetic.ZIMAGE_FULL}[argv[2]]
        print(write_synthetic(Path(argv[1]), synthetic.iter_zimage(shape)))
    elif argv[0] == "--compare":
        print(json.dumps(compare(Path(argv[1]), Path(argv[2]))))
    return 0


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def bin_of(name: str) -> str:
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if not found:
        raise SystemExit(f"{name} is not installed (pip install -e .[test])")
    return found


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("--generate", "--compare"):
        return child_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None, help="where to write the generated files (default: a temp dir on /work)")
    ap.add_argument("--skip-full", action="store_true", help="skip the 6B full-size peak-RSS run")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="int8convrot-bench-", dir=str(ROOT / ".cache")))
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))   # run the clean-up below on kill, too
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [f"- machine: {os.cpu_count()}-core {cpu_model()}, {ram:.0f} GiB; load average at start "
             f"{os.getloadavg()[0]:.2f} (the machine is shared: other jobs may run)"]
    try:
        src = work / "zimage_bench_bf16.safetensors"
        t = time.perf_counter()
        size = int(in_child("--generate", str(src), "bench"))
        print(f"input: {src} {gb(size)} written in {time.perf_counter() - t:.1f} s", flush=True)
        base = run_measured([sys.executable, "-c", "import torch, os; os._exit(0)"])
        ctq = run_measured([bin_of("ctq"), "-i", str(src), "-o", str(work / "ctq.safetensors"), *CTQ_FLAGS])
        print(f"ctq: {ctq['wall_s']:.1f} s, {gb(ctq['maxrss'])}", flush=True)
        ours = run_measured([bin_of("int8-convrot"), "convert", str(src), str(work / "ours.safetensors"),
                             "--device", "cpu", "-q"])
        print(f"ours: {ours['wall_s']:.1f} s, {gb(ours['maxrss'])}\n{ours['log']}", flush=True)
        diffs = json.loads(in_child("--compare", str(work / "ctq.safetensors"), str(work / "ours.safetensors")))
        same = [d for d in diffs if d != "header key int8_convrot_converter"]
        lines += [
            f"- input: {gb(size)} bf16, Z-Image key layout, dim 3840 / FFN 10240, 2 layers + 1 noise + 1 context "
            f"refiner (engine.synthetic.ZIMAGE_BENCH); outputs {gb((work / 'ctq.safetensors').stat().st_size)} (ctq) "
            f"and {gb((work / 'ours.safetensors').stat().st_size)} (ours)",
            f"- ctq: `ctq -i IN -o OUT {' '.join(CTQ_FLAGS)}`",
            "- ours: `int8-convrot convert IN OUT --device cpu -q`",
            "",
            "| | wall | CPU (user+sys) | peak RSS (ru_maxrss) | peak VmHWM while running | peak RssAnon |",
            "|---|---|---|---|---|---|",
            *(f"| {n} | {r['wall_s']:.1f} s | {r['user_s'] + r['sys_s']:.1f} s | {gb(r['maxrss'])} | {gb(r['hwm'])} "
              f"| {gb(r['anon'])} |" for n, r in (("ctq 1.3.4", ctq), ("int8-convrot", ours),
                                                 ("`import torch` alone", base))),
            "",
            f"- speed-up: **{ctq['wall_s'] / ours['wall_s']:.1f}×** wall, {(ctq['user_s'] + ctq['sys_s']) / (ours['user_s'] + ours['sys_s']):.1f}× CPU time",
            f"- peak RSS: ours is **{ours['maxrss'] / ctq['maxrss']:.0%}** of ctq's (ru_maxrss), "
            f"{ours['hwm'] / ctq['hwm']:.0%} (VmHWM); above the `import torch` baseline "
            f"({gb(base['maxrss'])}): {gb(ours['maxrss'] - base['maxrss'])} vs {gb(ctq['maxrss'] - base['maxrss'])} "
            f"({(ours['maxrss'] - base['maxrss']) / (ctq['maxrss'] - base['maxrss']):.0%})",
            f"- identical output: {'yes — every tensor (codes, scales, comfy_quant, kept tensors) and the ' if not same else 'NO: ' + ', '.join(same[:10])}"
            f"{'_quantization_metadata match; our header adds one provenance key (int8_convrot_converter)' if not same else ''}",
        ]
        for p in ("ctq.safetensors", "ours.safetensors"):
            (work / p).unlink()
        src.unlink()

        if not args.skip_full:
            free = shutil.disk_usage(work).free
            if free < 20e9:
                lines.append(f"- full-size run skipped: {gb(free)} free, 20 GB needed")
            else:
                full = work / "zimage_full_bf16.safetensors"
                t = time.perf_counter()
                fsize = int(in_child("--generate", str(full), "full"))
                print(f"full input: {gb(fsize)} written in {time.perf_counter() - t:.1f} s", flush=True)
                r = run_measured([bin_of("int8-convrot"), "convert", str(full), str(work / "full_int8.safetensors"),
                                  "--device", "cpu", "-q"])
                osize = (work / "full_int8.safetensors").stat().st_size
                print(r["log"], flush=True)
                lines += [
                    "",
                    f"Full-size Z-Image layout (engine.synthetic.ZIMAGE_FULL: 30 layers + 2+2 refiners, "
                    f"{gb(fsize)} bf16 -> {gb(osize)} INT8 ConvRot), ours only:",
                    "",
                    "| | wall | CPU (user+sys) | peak RSS (ru_maxrss) | peak VmHWM while running | peak RssAnon |",
                    "|---|---|---|---|---|---|",
                    f"| int8-convrot | {r['wall_s']:.1f} s | {r['user_s'] + r['sys_s']:.1f} s | {gb(r['maxrss'])} | "
                    f"{gb(r['hwm'])} | {gb(r['anon'])} |",
                    "",
                    f"- the 6B conversion peaks at {gb(r['maxrss'])} RSS ({gb(r['anon'])} anonymous) against "
                    f"{gb(ours['maxrss'])} for the 1.46 GB file: memory follows the row chunk, not the model; "
                    + ("it fits an 8 GB-RAM laptop" if r["maxrss"] < 4e9 else "CHECK: more than 4 GB"),
                ]
                for p in (full, work / "full_int8.safetensors"):
                    p.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    from common import append_results
    append_results("Converter: int8-convrot vs convert-to-quant (CPU)", "python bench/convert.py", MACHINE, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
