"""Shared helpers for the benchmarks: device naming, timing, and appending to bench/RESULTS.md."""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import torch

from machine import cpu_model

# INT8_CONVROT_RESULTS redirects the appends (bench/gpu_check.sh --dry writes to a scratch file).
RESULTS = Path(os.environ.get("INT8_CONVROT_RESULTS") or Path(__file__).with_name("RESULTS.md"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu_model()}, {torch.get_num_threads()} threads, {mem:.0f} GiB, torch {torch.__version__}"


def timeit(fn, device: torch.device, budget_s: float = 1.0, max_reps: int = 50) -> float:
    """Best-of-n seconds per call after one warm-up; n grows until the budget is used."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    best, spent, reps = float("inf"), 0.0, 0
    while reps < max_reps and (reps < 2 or spent < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
        if dt > budget_s:  # one slow call is enough
            break
    return best


def best_forward(fn, device: torch.device, reps: int):
    """(best wall time of `reps` calls of fn(), the last output), synchronizing CUDA around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best, y = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        y = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, y


def peak_memory(device: torch.device) -> int:
    """Peak CUDA memory allocated, or the process's peak RSS on the CPU (bytes)."""
    import resource
    return (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def append_results(title: str, command: str, device: str, lines: list[str]) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    new = not RESULTS.exists()
    with open(RESULTS, "a") as f:
        if new:
            f.write("# Benchmark results\n\nEach section is appended by a script in bench/; figures are "
                    "measured side by side in one run.\n")
        f.write(f"\n## {title} — {stamp}\n\n- device: {device}\n- command: `{command}`\n\n")
        f.write("\n".join(lines) + "\n")
