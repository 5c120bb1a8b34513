"""What CPU the benchmarks ran on, without importing torch (bench/convert.py measures small processes)."""
from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's name and its widest int8/float ISA (AVX2 / AVX-512 / VNNI / AMX): the CPU figures
    depend on it more than on anything else. Reads /proc/cpuinfo only (no torch: bench/convert.py's
    measuring process must stay small)."""
    model, flags = None, None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and flags is None:
                flags = set(line.split(":", 1)[1].split())
            if flags is not None and model is not None:
                break
    except OSError:
        pass
    model, flags = model or platform.processor() or "CPU", flags or set()
    isa = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("VNNI", "avx512_vnni"),
                                   ("AMX", "amx_int8")) if flag in flags]
    return f"{model} ({', '.join(isa)})" if isa else model
