"""What the running ComfyUI can do by itself with INT8 ConvRot files (0.27+ loads them natively
through comfy-kitchen; 0.8.0-era ComfyUI cannot)."""
from __future__ import annotations


def native_int8() -> tuple[bool, str]:
    """Does this ComfyUI itself load INT8 ConvRot files (its quant_ops knows int8_tensorwise)? (yes/no, why
    not). 0.8.0 does not, even with a comfy-kitchen that has int8_linear: nothing of ComfyUI calls it."""
    try:
        import comfy.quant_ops as qo
    except Exception as exc:
        return False, f"ComfyUI's comfy.quant_ops is not importable ({type(exc).__name__}: {exc})"
    if "int8_tensorwise" not in getattr(qo, "QUANT_ALGOS", {}):
        return False, "this ComfyUI has no native INT8 (its quant_ops has no int8_tensorwise format)"
    if not getattr(qo, "_CK_AVAILABLE", True):
        return False, "this ComfyUI could not import comfy-kitchen, so it runs no native INT8"
    return True, ""


def has_native_int8() -> bool:
    """True when ComfyUI's own ops read `int8_tensorwise` layers (its stock loaders take our files)."""
    return native_int8()[0]


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
    import comfy.model_patcher as mp
    dynamic = getattr(mp, "ModelPatcherDynamic", None)
    if dynamic is not None and isinstance(patcher, dynamic):
        return "dynamic VRAM (ModelPatcherDynamic: weights streamed and cast per op)"
    return f"classic {type(patcher).__name__} (whole-model load, lowvram offload when short of memory)"


__all__ = ["dynamic_vram_active", "has_native_int8", "memory_mode", "native_int8"]
