"""bench/gpu_check.sh cannot rot: CI runs its steps in --dry mode (CPU, Triton interpreter, tiny shapes;
bench/model.py is left out here: at Z-Image widths it is minutes on 2 cores), and without CUDA the real
run refuses clearly."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COMFYUI_PATH")}
    env.update(PYTHON=sys.executable, **extra)
    return env


@pytest.mark.slow
def test_dry_run_passes_and_appends_its_section(tmp_path):
    pytest.importorskip("triton")
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry"], cwd=ROOT, capture_output=True,
                          text=True, env=_env(INT8_CONVROT_RESULTS=str(results)), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = results.read_text()
    assert "## bench/gpu_check.sh" in text and "dry run on CPU" in text
    assert "- GPU test tier: exit 0" in text and "- kernels g=256: exit 0" in text
    assert "bench/kernels.py: INT8 ConvRot linear" in text  # the benchmark's own table landed there too


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_real_run_refuses_without_cuda(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, capture_output=True, text=True,
                          env=_env(INT8_CONVROT_RESULTS=str(tmp_path / "R.md")), timeout=300)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert re.search(r"gpu_check.sh: Python 3\.\d+.*, torch .*, Triton .*, numpy ", proc.stdout)  # what it found
    assert not (tmp_path / "R.md").exists()


def test_refuses_in_one_line_a_stack_it_cannot_serve(tmp_path):
    """A stack without Triton (or below the floors) is refused before anything runs, naming what is missing."""
    (tmp_path / "triton.py").write_text("raise ImportError('no triton on this stack')\n")
    env = _env(INT8_CONVROT_RESULTS=str(tmp_path / "R.md"))
    env["PYTHONPATH"] = str(tmp_path)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry"], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Triton missing" in proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "gpu_check.sh: this stack cannot serve the run: it needs triton >= 3.3"]
    assert not (tmp_path / "R.md").exists()


def test_real_run_names_every_gpu_test_file():
    """The device run is the only place gpu-marked tests run: a new one must not be left out of it, and none
    of the files it names may set TRITON_INTERPRET when imported (that would make the GPU run a CPU one)."""
    import re
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    real = script.split("\nelse\n", 1)[0]
    named = set(re.search(r"gpu_tests=\(([^)]*)\)", real).group(1).split())
    marked = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
              if re.search(r"pytest\.mark\.gpu\b", p.read_text())}
    assert named == marked
    for f in named - {"tests/kernels/test_gpu_kernels.py"}:   # that one sets it only in its dry mode
        assert not re.search(r"""environ(\.setdefault\(|\[)\s*["']TRITON_INTERPRET""", (ROOT / f).read_text()), f
