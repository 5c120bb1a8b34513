#!/usr/bin/env bash
# Idempotent environment set-up, everything inside the checkout (.cache/): a venv with torch and the
# pack (editable, with its test extras). When a real ComfyUI is found ($COMFYUI_PATH, or the ComfyUI
# this pack is installed in) its own requirements go into the venv too; nothing of ComfyUI is fetched.
# $INT8_CONVROT_VENV picks another venv (one per ComfyUI version, say).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/.cache"
export PIP_CACHE_DIR="$cache/pip" PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$cache"
python=${PYTHON:-python3}
venv="${INT8_CONVROT_VENV:-$cache/venv}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
. "$root/scripts/comfyui_path.sh"
comfy="$(int8_convrot_comfyui_path "$root")"
stamp="$venv/.int8-convrot-setup"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" ${comfy:+"$comfy/requirements.txt"} \
        | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch 2.14.1 + torchvision 0.29.1 is a pair that imports together (ComfyUI needs torchvision);
  # the CPU-only wheel some machines carry breaks torchvision, so the regular build is used.
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" torchaudio
  "$py" -m pip install -q -e "$root[test,triton]"
  if [ -n "$comfy" ]; then
    # `requests` is missing from ComfyUI 0.8.0's requirements.
    "$py" -m pip install -q -r "$comfy/requirements.txt" requests
  else
    echo "setup: no ComfyUI found (set COMFYUI_PATH, or install the pack in ComfyUI/custom_nodes):" \
         "the real-ComfyUI tests will be skipped" >&2
  fi
  echo "$want" > "$stamp"
fi

# Optional: headless Chromium for tests/integration/test_browser.py (it skips, saying why, without
# one). Installed only as root with CI=1 or INT8_CONVROT_INSTALL_CHROMIUM=1; a failed apt never fails set-up.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && { [ -n "${CI:-}" ] || [ "${INT8_CONVROT_INSTALL_CHROMIUM:-}" = 1 ]; }; then
  echo "setup: installing chromium for the browser test" >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
       >"$cache/chromium-install.log" 2>&1; then
    echo "setup: could not install chromium (see $cache/chromium-install.log): the browser test will be skipped" >&2
  fi
fi
