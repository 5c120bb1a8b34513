"""bench/aot_check.py as a CI gate: every Triton config and variant the wrappers can launch compiles to a
cubin for sm_80/86/89/90 with Triton's bundled ptxas (no GPU), uses integer MMA in the GEMM, fits the
target's shared memory (and the runtime's estimate of it) and does not spill registers.

It runs in a subprocess without TRITON_INTERPRET: the interpreter the other kernel tests use replaces
@triton.jit functions, and it is decided once per process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not importable: nothing to compile")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_launchable_variant_compiles_for_sm80_to_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "aot_check.py"), "--jobs", jobs],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    fails = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL")]
    assert proc.returncode == 0 and not fails, "\n".join(fails) or proc.stderr[-3000:]
