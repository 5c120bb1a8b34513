"""The pack's HTTP route on ComfyUI's server (read-only), for the web badge under the loader nodes:

    GET /int8_convrot/inspect?folder=diffusion_models&name=z_image_int8.safetensors   (also under /api)
    200 {"folder", "name", "info": <int8-convrot inspect --json>, "summary": <engine/facts.py>, "report": str}
    400 bad folder or name · 403 outside the model folders · 404 no such file · 422 not a readable safetensors file
    (every error: {"error": message}; messages never show absolute paths)

Only files of ComfyUI's own model folders are served: the name is resolved with
`folder_paths.get_full_path` and the resolved real path must lie inside one of that folder's
configured directories, so '..', absolute paths and symlinks that lead elsewhere are refused.
`inspect_model_file` is the whole logic and runs without a server (tests call it in-process).
"""
from __future__ import annotations

import logging
import os
import sys
from collections import OrderedDict

import folder_paths

from ..engine.errors import Int8ConvRotError
from ..engine.facts import file_facts

log = logging.getLogger(__name__)

ROUTE = "/int8_convrot/inspect"
ALLOWED_FOLDERS = ("diffusion_models", "unet", "text_encoders", "clip", "checkpoints")
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64
_REGISTERED = False


def _error(status: int, message: str) -> tuple[int, dict]:
    return status, {"error": message}


def _inside(path: str, roots) -> bool:
    for root in roots:
        root = os.path.realpath(root)
        try:
            if os.path.commonpath([path, root]) == root:
                return True
        except ValueError:   # different drives (Windows)
            continue
    return False


def resolve_model_file(folder: str, name: str) -> tuple[int, str]:
    """(200, real path) of a file in one of ComfyUI's model folders, else (status, error message)."""
    if folder not in ALLOWED_FOLDERS:
        return 400, f"folder {folder!r} is not one of {', '.join(ALLOWED_FOLDERS)}"
    if not isinstance(name, str) or not name.strip():
        return 400, "no file name given"
    if "\x00" in name:
        return 400, "the file name contains a NUL byte"
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or os.path.splitdrive(name)[0]:
        return 400, "absolute paths are not allowed: give the name as listed in the models folder"
    if ".." in parts:
        return 400, "'..' is not allowed in the file name"
    full = folder_paths.get_full_path(folder, name)
    if full is None:
        return 404, f"{name} is not in models/{folder}"
    real = os.path.realpath(full)
    if not _inside(real, folder_paths.get_folder_paths(folder)):
        return 403, f"{name} resolves outside the {folder} model folders (a symlink to elsewhere?)"
    return 200, real


def inspect_model_file(folder: str, name: str) -> tuple[int, dict]:
    """The route's answer as (HTTP status, JSON payload)."""
    status, where = resolve_model_file(folder, name)
    if status != 200:
        return _error(status, where)
    try:
        st = os.stat(where)
    except OSError:
        return _error(404, f"{name} is not readable")
    key = (where, st.st_size, st.st_mtime_ns)
    hit = _CACHE.get(key)
    if hit is None:
        try:
            facts = file_facts(where, f"{folder}/{name}")
        except Int8ConvRotError as exc:
            text = str(exc).replace(where, name)
            return _error(422, text if text.startswith(name) else f"{name}: {text}")
        except OSError as exc:
            return _error(422, f"{name}: cannot be read ({exc.strerror or type(exc).__name__})")
        hit = _CACHE[key] = facts
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return 200, {"folder": folder, "name": name, **hit}


async def handle_inspect(request):
    import asyncio

    from aiohttp import web
    folder, name = request.query.get("folder", ""), request.query.get("name", "")
    try:
        status, payload = await asyncio.get_running_loop().run_in_executor(None, inspect_model_file, folder, name)
    except Exception as exc:   # never a bare 500 page for the badge: say what happened
        log.exception("INT8 ConvRot: inspecting %s/%s failed", folder, name)
        status, payload = _error(500, f"{name}: {type(exc).__name__}: {exc}")
    return web.json_response(payload, status=status)


def register_routes(server=None) -> bool:
    """Add the route to ComfyUI's PromptServer (the running one when `server` is None). Without a server
    (the pack imported in-process by tests or tools) this does nothing and returns False."""
    global _REGISTERED
    if server is None:
        module = sys.modules.get("server")   # ComfyUI's server.py, imported by main.py before custom nodes
        server = getattr(getattr(module, "PromptServer", None), "instance", None)
    if server is None or _REGISTERED:
        return _REGISTERED
    server.routes.get(ROUTE)(handle_inspect)
    _REGISTERED = True
    return True


__all__ = ["ALLOWED_FOLDERS", "ROUTE", "handle_inspect", "inspect_model_file", "register_routes",
           "resolve_model_file"]
