"""What the running ComfyUI can do by itself with INT8 ConvRot files (0.27+ loads them natively
through comfy-kitchen; 0.8.0-era ComfyUI cannot)."""
from __future__ import annotations


def has_native_int8() -> bool:
    """True when ComfyUI's own ops read `int8_tensorwise` layers (its stock loaders take our files)."""
    try:
        from comfy.quant_ops import QUANT_ALGOS
    except ImportError:
        return False
    return "int8_tensorwise" in QUANT_ALGOS


__all__ = ["has_native_int8"]
