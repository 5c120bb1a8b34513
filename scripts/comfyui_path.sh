# Sourced by the set-up, test and demo scripts: find the real ComfyUI the tests and the demo use.
# $COMFYUI_PATH wins; else the ComfyUI this pack is installed in (ComfyUI/custom_nodes/<pack> -> ../..).
# Prints the tree's path, or nothing when there is none. Nothing is downloaded or unpacked.
int8_convrot_comfyui_path() {
  local root="$1" p
  if [ -n "${COMFYUI_PATH:-}" ]; then p="$COMFYUI_PATH"
  elif [ "$(basename "$(dirname "$root")")" = custom_nodes ]; then p="$(dirname "$(dirname "$root")")"
  else return 0; fi
  if [ -f "$p/main.py" ] && [ -d "$p/comfy" ]; then (cd "$p" && pwd); fi
}
