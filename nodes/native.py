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


def dynamic_vram_active(device=None) -> bool:
    """True when ComfyUI would give a model on `device` (default: its torch device) the dynamic-VRAM
    patcher (0.29's ModelPatcherDynamic, the default on NVIDIA outside WSL; it reroutes CPUs to the
    classic patcher)."""
    import comfy.model_management as mm
    import comfy.model_patcher as mp
    dynamic = getattr(mp, "ModelPatcherDynamic", None)
    if dynamic is None or mp.CoreModelPatcher is not dynamic:
        return False
    device = device if device is not None else mm.get_torch_device()
    return not mm.is_device_cpu(device)


def memory_mode(patcher) -> str:
    """How ComfyUI manages this model's weights, for the log."""
    dynamic = getattr(__import__("comfy.model_patcher", fromlist=["x"]), "ModelPatcherDynamic", None)
    if dynamic is not None and isinstance(patcher, dynamic):
        return "dynamic VRAM (ModelPatcherDynamic: weights streamed and cast per op)"
    return f"classic {type(patcher).__name__} (whole-model load, lowvram offload when short of memory)"


__all__ = ["dynamic_vram_active", "has_native_int8", "memory_mode"]
