"""comfy-kitchen's HIP backend (AMD, ROCm torch) as the pack's W8A8 GEMM: asking whether it serves
int8_linear on this GPU, and calling it.

comfy-kitchen (0.2.27+) imports its HIP backend only under a ROCm torch; the backend registers as "hip" only
on the gfx targets of its manifest (RDNA2/3/3.5/4) and advertises the GEMMs (int8_linear among them) only
where every visible GPU has WMMA; otherwise the registry records why (list_backends()["hip"]). MI300 (gfx942)
is not in that manifest. The call goes to that backend by name, so the pack's own comfy-kitchen backend
(first in the priority list) can never take it back. No pack imports here.
"""
from __future__ import annotations

import torch

# Group sizes comfy-kitchen's HIP int8_linear rotates (it raises on others).
HIP_GROUP_SIZES = (16, 64, 256)


def _registry():
    from comfy_kitchen.registry import registry
    return registry


def int8_linear_status() -> tuple[bool, str]:
    """(comfy-kitchen's HIP backend serves int8_linear here, why not)."""
    try:
        registry = _registry()
        import comfy_kitchen  # noqa: F401  (its import is what registers the HIP backend)
    except Exception as exc:
        return False, f"comfy-kitchen is not importable ({type(exc).__name__})"
    if not registry.is_available("hip"):
        why = registry.list_backends().get("hip", {}).get("unavailable_reason") or "not registered"
        return False, f"comfy-kitchen's HIP backend is unavailable ({why})"
    if registry.get_constraints("hip", "int8_linear") is None:
        return False, "comfy-kitchen's HIP backend has no int8_linear on this GPU (no WMMA)"
    return True, ""


def int8_linear(x2: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, bias, group_size,
                out_dtype: torch.dtype) -> torch.Tensor | None:
    """y = x2·W (ConvRot group `group_size`) by comfy-kitchen's HIP int8_linear, or None where it declines
    this call (group size, K not a multiple of 16, dtype): the caller then runs its fallback."""
    if group_size and group_size not in HIP_GROUP_SIZES:
        return None
    from comfy_kitchen.exceptions import BackendError
    kwargs = {"x": x2, "weight": codes, "weight_scale": row_scale, "bias": bias, "out_dtype": out_dtype,
              "convrot": bool(group_size), "convrot_groupsize": group_size or 256, "input_act": None,
              "input_act_weight": None, "input_act_eps": 0.0, "residual": None, "residual_scale": None}
    try:
        impl = _registry().get_implementation("int8_linear", backend="hip", kwargs=kwargs)
    except BackendError:   # declined by its constraints, or the backend is gone/disabled
        return None
    return impl(**kwargs)


__all__ = ["HIP_GROUP_SIZES", "int8_linear", "int8_linear_status"]
