#!/usr/bin/env bash
# The kernel and engine tier (no ComfyUI) on the torch/Triton stacks users run, each in its own venv under
# .cache/stacks/<name> (built once from the registry; a stamp skips the install on a rerun, and
# .cache/pip keeps the wheels). Per stack: the interpreter kernel tests (bench/gpu_check.sh --dry's GPU tier
# included), the torch.compile tests, the engine tests, bench/compile_graphs.py (dynamo's graphs and breaks
# per case), then bench/aot_check.py (every launchable variant for
# sm_80/86/89/90 with that Triton's ptxas). Each stack prints ONE result line; any failure fails the script.
#   bash scripts/stacks.sh              every stack below
#   bash scripts/stacks.sh host old     those stacks only
# Environment: PYTHON312 (an interpreter to use instead of searching for Python 3.12).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# name | pip requirements (the torch pin brings its own Triton; Triton is pinned where torch allows two).
# old = the floor pyproject.toml admits: torch 2.7.1 + Triton 3.3.1 (raise it here, and in pyproject.toml).
declare -A STACKS=(
  [host]="torch==2.11.0 triton==3.6.0 numpy"   # the GPU cloud image: Python 3.12, newest numpy
  [new]="torch==2.15.0 triton==3.9.0 numpy"    # the newest release
  [old]="torch==2.7.1 triton==3.3.1 numpy"     # the floor
)
ORDER=(host new old)
# What runs where, so the matrix catches what differs between stacks (Triton's interpreter with numpy >= 2.4
# before 3.7, Triton 3.3's autotuner without a driver, dynamo's graph breaks before torch 2.14, spills per
# Triton version) within CI's 45 minutes: every stack runs the interpreter kernel tests with the fallback off,
# the torch.compile test, the layering test and gpu_check.sh --dry's GPU tier; the GPU host stack, the one
# users' cloud GPUs run, also runs the rest of the kernel and engine tests (no ComfyUI).
FOCUSED="tests/kernels/test_triton_kernels.py tests/kernels/test_triton_lora.py tests/kernels/test_triton_fallback.py
         tests/kernels/test_compile_layer.py tests/kernels/test_compile_gpu_routes.py tests/test_layering.py"
declare -A TESTS=(
  [host]="tests/kernels tests/engine tests/test_layering.py"
  [new]="$FOCUSED"
  [old]="$FOCUSED"
)
# Not here: the compile check runs as bench/aot_check.py below (its count goes on the line), the --dry GPU
# tier runs as its own pytest (INT8_CONVROT_GPU_DRY=1 un-skips every gpu test), gpu_check.sh's own test runs
# the benches too (minutes; the default stack runs it).
DESELECT=(--deselect tests/kernels/test_aot_compile.py::test_every_launchable_variant_compiles_for_sm80_to_sm90_without_spills
          --deselect tests/kernels/test_gpu_check_dry.py::test_dry_run_passes_and_appends_its_section)

find_py312() {
  local c
  for c in "${PYTHON312:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python /usr/local/bin/python3.12 \
           /usr/bin/python3.12 python3; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      command -v "$c" 2>/dev/null || echo "$c"; return 0
    fi
  done
  return 1
}

cache="$root/.cache"
export PIP_CACHE_DIR="$cache/pip" PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$cache/stacks/pp"
ln -sfn "$root" "$cache/stacks/pp/comfyui_int8_convrot"
# This machine's pip config caps torch (/etc/xdg/pip/constraints.txt): an empty constraints file lifts it
# for our installs only.
: > "$cache/stacks/no-constraints.txt"

if ! py312="$(find_py312)"; then
  echo "stacks.sh: no Python 3.12 found (python3.12 on PATH, pyenv, /usr/bin; or set PYTHON312): cannot build the stacks" >&2
  exit 1
fi

build() {  # build NAME: the venv with that stack's pins, idempotent
  local name="$1" venv="$cache/stacks/$1"
  # The stamp names the pins and pyproject.toml (the pack's dependencies and test extras): a change rebuilds.
  local want; want="$( (echo "$py312 ${STACKS[$name]}"; cat pyproject.toml) | sha256sum | cut -c1-16)"
  [ "$(cat "$venv/.stamp" 2>/dev/null)" = "$want" ] && return 0
  rm -rf "$venv"
  # Each step returns on failure: `set -e` does not apply inside a function called from an `if`, and a
  # stamp written after a failed install would skip the install next time.
  "$py312" -m venv "$venv" || return 1
  # One resolve for the pins and the pack (editable, for its console script: tests/engine/test_cli.py) with
  # its dependencies and test extras from pyproject.toml, so nothing upgrades torch behind the pins.
  PIP_CONSTRAINT="$cache/stacks/no-constraints.txt" "$venv/bin/python" -m pip install -q \
    ${STACKS[$name]} -e "$root[test]" || return 1
  echo "$want" > "$venv/.stamp"
}

tier() {  # tier PY LOG ARGS...: one pytest run, its counts added to the caller's; pytest's exit status
  local py="$1" log="$2" prc=0; shift 2
  env -u COMFYUI_PATH PYTHONPATH="$cache/stacks/pp" INT8_CONVROT_TRITON_FALLBACK=0 \
    "$py" -m pytest -q -p no:cacheprovider "$@" >>"$log" 2>&1 || prc=$?
  local summary; summary="$(grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected).* in [0-9.]+s' "$log" | tail -1)"
  count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE '[0-9]+' || echo 0; }
  passed=$(( passed + $(count passed) )); failed=$(( failed + $(count failed) ))
  skipped=$(( skipped + $(count skipped) )); errors=$(( errors + $(count error) ))
  return "$prc"   # pytest exits 5 when it collected nothing: a failure like any other non-zero
}

run_stack() {  # run_stack NAME: prints the stack's one line, returns non-zero on any failure
  local name="$1" venv="$cache/stacks/$1" log="$cache/stacks/$1.log" t0; t0=$(date +%s)
  : > "$log"
  if ! build "$name" >>"$log" 2>&1; then
    echo "stack $name: FAILED to install ${STACKS[$name]} (see $log)"; return 1
  fi
  local py="$venv/bin/python"
  local versions; versions="$("$py" -c 'import sys, torch, triton, numpy
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")')"
  local rc=0 prc=0 arc=0 passed=0 failed=0 skipped=0 errors=0
  # No ComfyUI here (its tests skip), the fallback off (a kernel test must not pass on the torch path).
  # shellcheck disable=SC2086
  tier "$py" "$log" ${TESTS[$name]} "${DESELECT[@]}" || prc=$?
  INT8_CONVROT_GPU_DRY=1 tier "$py" "$log" -m gpu tests/kernels/test_gpu_kernels.py || prc=$?
  [ "$prc" = 0 ] || rc=1
  local dry=""
  if [ "$name" = host ]; then   # the device run's script, whole, on the stack it is meant for
    local drc=0
    env -u COMFYUI_PATH PYTHON="$py" bash bench/gpu_check.sh --dry >>"$log" 2>&1 || drc=$?
    dry="; gpu_check.sh --dry exit $drc"
    [ "$drc" = 0 ] || rc=1
  fi
  # torch.compile's graphs and breaks per case (the tests assert fullgraph; this puts the counts on the line).
  local crc=0 graphs
  TRITON_INTERPRET=1 PYTHONPATH="$cache/stacks/pp" "$py" bench/compile_graphs.py > "$log.compile" 2>&1 || crc=$?
  graphs="$(grep -E '^torch.compile: ' "$log.compile" | tail -1 | sed -E 's/ \(torch [^)]*\)$//')"
  [ -n "$graphs" ] || graphs="torch.compile check did not run (exit $crc: $(tail -1 "$log.compile"))"
  [ "$crc" = 0 ] || rc=1
  env -u TRITON_INTERPRET PYTHONPATH="$cache/stacks/pp" "$py" bench/aot_check.py --jobs 2 \
    > "$log.aot" 2>&1 || arc=$?
  local variants fails
  variants="$(grep -oE '^- [0-9]+ variants' "$log.aot" | grep -oE '[0-9]+' || echo '?')"
  fails="$(grep -c '^FAIL' "$log.aot" || true)"
  [ "$arc" = 0 ] || rc=1
  local aot="compile check $fails failures of $variants variants"
  [ "$arc" = 0 ] || [ "$arc" = 1 ] || aot="compile check did not run (exit $arc: $(tail -1 "$log.aot"))"
  echo "stack $name: $versions: $passed passed, $skipped skipped, $failed failed, $errors errors (pytest exit $prc)$dry;" \
       "$graphs; $aot; $(( $(date +%s) - t0 )) s -> $([ "$rc" = 0 ] && echo OK || echo "FAILED (see $log, $log.compile, $log.aot)")"
  return "$rc"
}

status=0
names=("$@")
[ "${#names[@]}" -gt 0 ] || names=("${ORDER[@]}")
for name in "${names[@]}"; do
  if [ -z "${STACKS[$name]:-}" ]; then echo "stacks.sh: unknown stack '$name' (have: ${ORDER[*]})" >&2; exit 2; fi
  run_stack "$name" || status=1
done
exit "$status"
