#!/usr/bin/env bash
# The main job on a built-in default: build a real-width Z-Image block (dim 3840, FFN 10240), convert it to
# INT8 ConvRot, compare each Linear at 1024² with bf16, print a table and write a PNG report (its path printed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
. "$root/scripts/comfyui_path.sh"
comfy="$(int8_convrot_comfyui_path "$root")"
if [ -n "$comfy" ]; then export COMFYUI_PATH="$comfy"; fi
py="${INT8_CONVROT_VENV:-$root/.cache/venv}/bin/python"
exec "$py" -m comfyui_int8_convrot.demo "$@"
