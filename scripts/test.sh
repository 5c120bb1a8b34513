#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up (.cache/), then pytest with the real ComfyUI.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
if [ -d "$root/.cache/ComfyUI" ]; then export COMFYUI_PATH="$root/.cache/ComfyUI"; fi
set +e
"$root/.cache/venv/bin/python" -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure, not a pass.
if [ "$rc" -eq 5 ]; then echo "test.sh: no tests were collected" >&2; exit 1; fi
exit "$rc"
