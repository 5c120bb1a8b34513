"""Preparing a state dict for the INT8 ConvRot loaders (no ComfyUI imports).

- the header-only check that runs before any tensor is read is `verdict.loader_check` (shared with
  the web badge and the Inspect node).
- `prepare_state_dict`: the state dict the ComfyUI ops load: per-layer `comfy_quant` tensors
  restored from the header's `_quantization_metadata` where a tool wrote only the header, every
  INT8 layer validated up front (format, group size the kernels accept, scale shape), and, on
  request, float Linear weights quantized on the fly (quantize on load) with the same layer choice
  and the same codes as the converter (`policy` presets, `kernels.quantize_weight`).
"""
from __future__ import annotations

import json
import torch

from .. import kernels
from .convert import quantize_tensors
from .errors import FileFormatError, Int8ConvRotError
from .format import QUANT_SUFFIX, SCALE_SUFFIX, parse_layer_tensor, parse_metadata
from .linear import check_layer
from .verdict import FP8_FORMATS, native_format_error, not_int8_error

# Checkpoint prefixes in front of a DiT's own keys (ComfyUI strips them when it loads a model).
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _strip_prefix(keys) -> list[str]:
    for p in MODEL_PREFIXES:
        if any(k.startswith(p) for k in keys):
            return [k[len(p):] for k in keys if k.startswith(p)]
    return list(keys)


def restore_layer_entries(sd: dict, metadata: dict | None, path=None) -> int:
    """Add `P.comfy_quant` tensors for layers described only in the header metadata. Returns how many."""
    layers = parse_metadata(metadata, path=path)
    if not layers:
        return 0
    added = 0
    for name, lq in layers.items():
        key = f"{name}{QUANT_SUFFIX}"
        if key not in sd and f"{name}.weight" in sd and sd[f"{name}.weight"].dtype == torch.int8:
            sd[key] = lq.to_tensor()
            added += 1
    return added


def _layer_json(t: torch.Tensor, path, layer) -> dict:
    try:
        return json.loads(bytes(t.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"comfy_quant is not valid JSON ({exc})", path=path, tensor=f"{layer}{QUANT_SUFFIX}") \
            from None


def dequantize_other_formats(sd: dict, path=None) -> int:
    """Turn fp8 mixed-precision layers (comfy_quant float8_*) back into bf16 weights (for quantize on load)."""
    n = 0
    for key in [k for k in sd if k.endswith(QUANT_SUFFIX)]:
        layer = key[: -len(QUANT_SUFFIX)]
        cfg = _layer_json(sd[key], path, layer)
        fmt = cfg.get("format")
        if fmt == "int8_tensorwise":
            continue
        if fmt not in FP8_FORMATS:
            raise native_format_error(str(fmt), path=path, tensor=key)
        w = sd[f"{layer}.weight"].float()
        scale = sd.pop(f"{layer}{SCALE_SUFFIX}", None)
        if scale is not None:
            w = w * scale.float()
        sd[f"{layer}.weight"] = w.to(torch.bfloat16)
        sd.pop(key)
        sd.pop(f"{layer}.input_scale", None)
        n += 1
    return n


def validate_int8_layers(sd: dict, path=None) -> int:
    """Check every INT8 layer before a model is built; returns the number of INT8 layers."""
    n = 0
    for key in [k for k in sd if k.endswith(QUANT_SUFFIX)]:
        layer = key[: -len(QUANT_SUFFIX)]
        quant = parse_layer_tensor(sd[key], path=path, layer=layer)
        codes = sd.get(f"{layer}.weight")
        scale = sd.get(f"{layer}{SCALE_SUFFIX}")
        if codes is None or scale is None:
            raise FileFormatError("INT8 layer without its weight or weight_scale", path=path, tensor=key,
                                  hint="the file is incomplete; re-convert it")
        check_layer(codes, scale, quant, layer=layer, path=path)
        n += 1
    for key, t in sd.items():
        if t.dtype == torch.int8 and key.endswith(".weight") and f"{key[:-len('.weight')]}{QUANT_SUFFIX}" not in sd:
            raise FileFormatError("int8 weight without a comfy_quant entry (its ConvRot group size is unknown)",
                                  path=path, tensor=key,
                                  hint="convert the original with the INT8 ConvRot Converter or ctq --comfy_quant")
    return n


def int8_tensor_keys(sd: dict) -> set[str]:
    """Keys whose data only an INT8-aware layer can read: every int8 tensor, and the weight of every
    layer that carries a `comfy_quant` entry. A module that read them as plain numbers would compute
    garbage without an error."""
    keys = {k for k, t in sd.items() if t.dtype == torch.int8}
    keys.update(f"{k[: -len(QUANT_SUFFIX)]}.weight" for k in sd if k.endswith(QUANT_SUFFIX))
    return keys


def check_int8_consumed(expected, consumed, path=None) -> None:
    """Raise unless every key of `expected` (file names) was read by an INT8-aware layer (`consumed`:
    the keys as the model saw them, which may carry a prefix or have lost one)."""
    consumed = set(consumed)

    def read(k):
        return k in consumed or any(c.endswith("." + k) or k.endswith("." + c) for c in consumed)

    unread = sorted(k for k in expected if not read(k))
    if unread:
        more = f" (and {len(unread) - 1} more: {', '.join(unread[1:4])}{', ...' if len(unread) > 4 else ''})" \
            if len(unread) > 1 else ""
        raise FileFormatError(
            f"INT8 data reached a layer or parameter that cannot dequantize it{more}: it would be used as raw "
            "integers", path=path, tensor=unread[0],
            hint="only Linear and Embedding weights can be INT8 ConvRot; re-convert the file with the INT8 ConvRot "
                 "Converter (or ctq without quantizing this tensor) and load it again")


def resolve_preset(preset: str, keys) -> str:
    from .policy import detect_preset
    if preset in ("auto", None):
        return detect_preset(_strip_prefix(keys))[0]
    return preset


def quantize_state_dict(sd: dict, preset: str = "auto", group_size: int = 64, scaling: str = "row",
                        device: torch.device | str | None = None, on_tensor=None,
                        include=()) -> tuple[dict, dict]:
    """Quantize a float state dict in memory (quantize on load) with the converter's engine
    (`convert.quantize_tensors`: the `policy` presets' layer choice, codes bit-identical to
    convert-to-quant's).

    Tensors stream through one at a time (on `device`, e.g. the GPU, then back to the CPU) and each
    float source tensor leaves the dict as its codes arrive, so the peak stays near one copy of the
    model. Returns (state dict, {"preset", "quantized", "kept"}).
    """
    from .policy import get_policy
    name = resolve_preset(preset, sd.keys())
    policy = get_policy(name, group_size=group_size, scaling=scaling, include=include)
    dev = "auto" if device is None else str(torch.device(device).type)
    out: dict = {}
    quantized = 0

    def drain():
        for k in list(sd):
            yield k, sd.pop(k)

    for key, t in quantize_tensors(drain(), policy, device=dev):
        out[key] = t
        if key.endswith(QUANT_SUFFIX):
            quantized += 1
            if on_tensor is not None:
                on_tensor()
    sd.update(out)
    kept = sum(1 for k, t in sd.items() if t.dim() == 2 and k.endswith(".weight") and t.is_floating_point())
    return sd, {"preset": name, "quantized": quantized, "kept": kept}


def count_quantizable(sd: dict, preset: str = "auto", group_size: int = 64) -> int:
    from .policy import get_policy
    policy = get_policy(resolve_preset(preset, sd.keys()), group_size=group_size)
    return sum(1 for k, t in sd.items()
               if policy.decide(_strip_prefix([k])[0] if any(k.startswith(p) for p in MODEL_PREFIXES) else k,
                                t.shape, t.dtype) is not None)


def prepare_state_dict(sd: dict, metadata: dict | None = None, *, path=None, quantize: str | None = None,
                       group_size: int = 64, device=None, on_tensor=None) -> tuple[dict, dict]:
    """The state dict our ops load, validated. `quantize`: None/"off" (the file must be INT8 ConvRot)
    or a preset ("auto", "zimage", "qwen3", "generic") for the float layers of a bf16/fp16/fp8 file.
    Returns (state dict, report)."""
    restore_layer_entries(sd, metadata, path)
    report = {"path": str(path) if path else None, "quantized_on_load": 0, "preset": None}
    has_int8 = any(_layer_json(sd[k], path, k[: -len(QUANT_SUFFIX)]).get("format") == "int8_tensorwise"
                   for k in sd if k.endswith(QUANT_SUFFIX))
    if quantize in (None, "off"):
        if not has_int8:
            raise not_int8_error(path)
    elif not has_int8:
        dequantize_other_formats(sd, path)
        try:
            kernels.check_group_size(group_size)
        except ValueError as exc:
            raise Int8ConvRotError(str(exc)) from None
        sd, q = quantize_state_dict(sd, quantize, group_size, device=device, on_tensor=on_tensor)
        if q["quantized"] == 0:
            raise Int8ConvRotError(f"quantize on load ({q['preset']} preset) found no Linear weight to quantize",
                                   hint="is this a diffusion model / text encoder file?")
        report.update(quantized_on_load=q["quantized"], preset=q["preset"])
    report["int8_layers"] = validate_int8_layers(sd, path)
    return sd, report
