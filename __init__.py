"""ComfyUI-INT8-ConvRot: ComfyUI entry point, and the `comfyui_int8_convrot` library package.

ComfyUI imports this folder as a custom node; everything else (kernels/, engine/, the CLI) imports
without ComfyUI, so the node registry below is filled only when ComfyUI is present.
"""
WEB_DIRECTORY = "./web"

try:
    import comfy.model_management  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
