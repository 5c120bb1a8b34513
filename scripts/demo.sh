#!/usr/bin/env bash
# The main job on a built-in default: make a small Z-Image-shaped checkpoint, convert it to
# INT8 ConvRot, load it, compare with bf16 and print a report.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
if [ -d "$root/.cache/ComfyUI" ]; then export COMFYUI_PATH="$root/.cache/ComfyUI"; fi
exec "$root/.cache/venv/bin/python" -m comfyui_int8_convrot.engine.demo "$@"
