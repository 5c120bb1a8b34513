#!/usr/bin/env bash
# One prepared device run, ≤ 8 minutes on any CUDA GPU: the GPU test tier (Triton kernels vs the reference
# at Z-Image shapes, every mode, dtype and group size; autotune), bench/kernels.py (ours w8a8/w8a16 vs bf16
# F.linear, comfy-kitchen's int8_linear at g = 64 and 256, torch._int_mm), bench/lora.py (LoRA fused into the
# Triton kernels vs added after), bench/model.py (with peak VRAM),
# all appended with the GPU's name to bench/RESULTS.md.
#   bash bench/gpu_check.sh          needs CUDA; refuses clearly without it
#   bash bench/gpu_check.sh --dry    the same steps on CPU under the Triton interpreter with tiny shapes,
#                                    writing to a scratch RESULTS file (CI runs this so the script cannot rot)
# Environment: PYTHON (default: python), COMFYUI_PATH (bench/model.py and the dynamic-VRAM test need a ComfyUI;
# skipped, saying so, without).
#   bash bench/gpu_check.sh --prepare  (on a machine with network) puts pytest and its deps, ~4 MiB, in
#                                    .cache/gpu-carry for a GPU host without them: carry that folder along
# It serves Python >= 3.10, torch >= 2.7, Triton >= 3.3 (what scripts/stacks.sh tests), any numpy; it says at
# the start which it found and refuses in one line otherwise. comfy-kitchen is optional (its steps skip).
#
# Time on an H100 (budget 8 minutes), estimated from measured compile times; not yet run on a device:
# - compile: bench/aot_check.py compiled 338 variants (every launchable one, sm_80..90) in 126 s with 2 jobs
#   on this project's 2-core CPU (bench/RESULTS.md, Triton 3.8): 0.75 s per kernel specialization, frontend
#   and ptxas. On sm_90 the GPU tier and benches can compile at most: 12 GEMM configs (8 large + 4 small,
#   all autotuned) x 6 epilogues (out dtype x bias; K % BLOCK_K == 0 at Z-Image shapes) = 72, the LoRA
#   epilogue on the configs kept for it (~16), ~25 rotate+quant variants: ~115 x 0.75 s ~= 90 s, each once
#   (Triton's cache), in one process; ~3 min even at 2x slower per core.
# - autotune: Triton benchmarks every config (~25 ms warm-up + ~100 ms) per (M bucket, N, K, R) key; ~20
#   keys x 12 configs ~= 30 s.
# - the tests' and benches' own GPU work (--budget 0.3 s per timing, --reps 3): ~1-2 min.
# Estimate ~3-6 min, under 8; the summary appended to RESULTS.md prints the measured total per step.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python}"
dry=0
[ "${1:-}" = "--dry" ] && dry=1
carry="$root/.cache/gpu-carry"
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$root/.cache" && : > "$root/.cache/no-constraints.txt"   # this machine's pip caps no pytest
  PIP_CONSTRAINT="$root/.cache/no-constraints.txt" "$py" -m pip install -q --no-deps --upgrade --target "$carry" pytest pluggy iniconfig packaging
  echo "gpu_check.sh: $(du -sh "$carry" | cut -f1) in $carry; carry it to the GPU host with the checkout"
  exit 0
fi
# The pack from this checkout (a GPU host has it neither installed nor in a ComfyUI), and a carried pytest.
pp="$(mktemp -d)"
ln -s "$root" "$pp/comfyui_int8_convrot"
export PYTHONPATH="$pp${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$carry" ] && export PYTHONPATH="$PYTHONPATH:$carry"
trap 'rm -rf "$pp"' EXIT
if ! "$py" - <<'PY'
import sys
def version(name):
    try:
        return __import__(name).__version__
    except Exception:
        return None
def tup(v):
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in v.split("+")[0].split(".")[:2])
vs = {n: version(n) for n in ("torch", "triton", "numpy", "pytest")}
print(f"gpu_check.sh: Python {sys.version.split()[0]}, torch {vs['torch'] or 'missing'}, "
      f"Triton {vs['triton'] or 'missing'}, numpy {vs['numpy'] or 'missing'}, pytest {vs['pytest'] or 'missing'}",
      flush=True)
why = []
if sys.version_info < (3, 10):
    why.append("Python >= 3.10")
for name, floor in (("torch", (2, 7)), ("triton", (3, 3)), ("numpy", (1, 0)), ("pytest", (7, 0))):
    if vs[name] is None or tup(vs[name]) < floor:
        why.append(f"{name} >= {'.'.join(map(str, floor))}")
if why:
    extra = " (bash bench/gpu_check.sh --prepare brings pytest in .cache/gpu-carry)" if vs["pytest"] is None else ""
    print(f"gpu_check.sh: this stack cannot serve the run: it needs {', '.join(why)}{extra}", file=sys.stderr)
    sys.exit(3)
PY
then exit 3; fi

if [ "$dry" = 0 ]; then
  if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to torch on this machine; this run needs a GPU." >&2
    echo "             (bash bench/gpu_check.sh --dry checks the same steps on CPU)" >&2
    exit 2
  fi
  unset TRITON_INTERPRET INT8_CONVROT_GPU_DRY
  gpu="$("$py" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB')")"
  kernel_args=(--device cuda --budget 0.3)
  lora_args=(--device cuda --reps 3)
  model_args=(--device cuda --reps 3)
  # Every gpu-marked test: the kernels, the CUDA converter, and (with COMFYUI_PATH) our loader on ComfyUI's
  # dynamic VRAM with a LoRA (it skips, saying why, without a ComfyUI). Named files, not tests/: some
  # interpreter test modules set TRITON_INTERPRET=1 when imported, which would turn this run into a CPU one.
  gpu_tests=(tests/kernels/test_gpu_kernels.py tests/engine/test_convert.py tests/nodes/test_layers_choice.py)
else
  export TRITON_INTERPRET=1 INT8_CONVROT_GPU_DRY=1
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch" "$pp"' EXIT
  export INT8_CONVROT_RESULTS="${INT8_CONVROT_RESULTS:-$scratch/RESULTS.md}"
  gpu="dry run on CPU (Triton interpreter)"
  kernel_args=(--device cpu --tiny --tokens 16 --budget 0.01)
  lora_args=(--device cpu --tokens 16 --ranks 16 --reps 1 --shapes 3840x3840)
  model_args=(--device cpu --layers 1 --image 64 --caption-tokens 8 --reps 1 --modes w8a8)
  gpu_tests=(tests/kernels/test_gpu_kernels.py)   # the others need a real CUDA device, not the interpreter
fi
export INT8_CONVROT_TRITON_FALLBACK=0  # a kernel that fails must fail here, not pass on the torch fallback
export PYTHONUNBUFFERED=1
results="${INT8_CONVROT_RESULTS:-$root/bench/RESULTS.md}"
log="$(mktemp)"
start=$(date +%s)
status=0

step() {  # step NAME CMD...: run, keep the output's tail for RESULTS.md, remember a failure
  local name="$1"; shift
  local t0=$(date +%s) rc=0
  echo "== $name: $*"
  "$@" 2>&1 | tee -a "$log" || rc=$?
  echo "- $name: exit $rc, $(( $(date +%s) - t0 )) s" >> "$log.summary"
  [ "$rc" = 0 ] || status=1
}

step "GPU test tier" "$py" -m pytest -q -m gpu -p no:cacheprovider "${gpu_tests[@]}" -rA
step "kernels g=64" "$py" bench/kernels.py "${kernel_args[@]}" --group-size 64
step "kernels g=256" "$py" bench/kernels.py "${kernel_args[@]}" --group-size 256
step "LoRA fused vs added after" "$py" bench/lora.py "${lora_args[@]}"
if [ -n "${COMFYUI_PATH:-}" ]; then
  step "model (peak VRAM)" "$py" bench/model.py "${model_args[@]}"
else
  echo "- model: skipped, COMFYUI_PATH is not set" >> "$log.summary"
fi

{
  echo
  echo "## bench/gpu_check.sh — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- device: $gpu"
  echo "- total: $(( $(date +%s) - start )) s; torch $("$py" -c 'import torch; print(torch.__version__)'), triton $("$py" -c 'import triton; print(triton.__version__)')"
  cat "$log.summary"
  echo
  echo "GPU test tier, last lines:"
  echo
  echo '```'
  grep -E "passed|failed|error|autotune" "$log" | tail -n 40 || true
  echo '```'
} >> "$results"
rm -f "$log" "$log.summary"
echo "gpu_check.sh: results appended to $results (exit $status)"
exit "$status"
