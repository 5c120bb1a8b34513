#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up (.cache/), then pytest; the real-ComfyUI tests run
# when a ComfyUI is found ($COMFYUI_PATH or the ComfyUI the pack is installed in) and skip, saying so, without.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
. "$root/scripts/comfyui_path.sh"
comfy="$(int8_convrot_comfyui_path "$root")"
if [ -n "$comfy" ]; then export COMFYUI_PATH="$comfy"; fi
py="${INT8_CONVROT_VENV:-$root/.cache/venv}/bin/python"
set +e
"$py" -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure, not a pass.
if [ "$rc" -eq 5 ]; then echo "test.sh: no tests were collected" >&2; exit 1; fi
exit "$rc"
