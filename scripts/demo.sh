#!/usr/bin/env bash
# The main job on a built-in default: make a small Z-Image-shaped checkpoint, convert it to
# INT8 ConvRot, load it, compare with bf16 and print a report.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
. "$root/scripts/comfyui_path.sh"
comfy="$(int8_convrot_comfyui_path "$root")"
if [ -n "$comfy" ]; then export COMFYUI_PATH="$comfy"; fi
py="${INT8_CONVROT_VENV:-$root/.cache/venv}/bin/python"
exec "$py" -m comfyui_int8_convrot.demo "$@"
