"""ComfyUI adapters (V3 node classes, registered through NODE_CLASS_MAPPINGS so that one code path
serves every ComfyUI that has `comfy_api`). Each submodule exports NODES, a list of node classes."""
from __future__ import annotations

import importlib

_SUBMODULES = ("loaders", "converter", "inspect")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _name in _SUBMODULES:
    try:
        _module = importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as exc:  # a submodule not written yet; any other error must surface
        if exc.name != f"{__name__}.{_name}":
            raise
        continue
    for _cls in _module.NODES:
        _schema = _cls.GET_SCHEMA()
        NODE_CLASS_MAPPINGS[_schema.node_id] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_schema.node_id] = _schema.display_name or _schema.node_id

# The web badge's HTTP route, on the running ComfyUI server only (no-op when imported without one).
from .routes import register_routes  # noqa: E402

register_routes()

# The pack's one process-wide change to ComfyUI, explicit and logged: its kernels as a comfy-kitchen backend
# for the stock loaders' native INT8 (a logged no-op without native INT8; off with INT8_CONVROT_CK_BACKEND=0).
from . import ck_registration  # noqa: E402

ck_registration.install()
ck_registration.register_route()
