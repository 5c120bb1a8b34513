"""What a safetensors file holds, from its header and its tiny `comfy_quant` tensors only (a 12 GB
model is inspected in milliseconds): used by `int8-convrot inspect`, a node and a web route."""
from __future__ import annotations

import json
import os
from collections import Counter

from .errors import FileFormatError
from .format import (METADATA_KEY, QUANT_SUFFIX, SCALE_SUFFIX, SUPPORTED_FORMAT_VERSIONS, convrot_group_size,
                     metadata_layer_configs)
from .policy import detect_preset
from .safetensors_header import read_header
from .safetensors_writer import human_bytes
from .convert import PROVENANCE_KEY
from .sources import DM_PREFIX

FLOAT_DTYPES = ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2")


def _read_json_tensor(fd: int, begin: int, end: int):
    raw = os.pread(fd, end - begin, begin)
    return json.loads(raw.decode("utf-8"))


def _layer_kind(cfg: dict) -> str:
    fmt = cfg.get("format", "?")
    if fmt == "int8_tensorwise":
        return "int8_convrot" if convrot_group_size(cfg) else "int8_unrotated"
    return fmt


def inspect_file(path) -> dict:
    """A JSON-able description of the file. Raises FileFormatError only when it cannot be read."""
    path = os.fspath(path)
    header = read_header(path)
    tensors = header.tensors
    problems: list[str] = []
    dtypes: dict[str, dict[str, int]] = {}
    params = 0
    for e in tensors.values():
        d = dtypes.setdefault(e.dtype, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += e.nbytes
        n = 1
        for s in e.shape:
            n *= s
        params += n

    kinds, groups, scalings, orig = Counter(), Counter(), Counter(), Counter()

    def count(base: str, cfg: dict):
        kind = _layer_kind(cfg)
        kinds[kind] += 1
        group = convrot_group_size(cfg)
        if group is not None:
            groups[group] += 1
        if kind.startswith("int8"):
            scale = tensors.get(base + SCALE_SUFFIX)
            if scale is None:
                problems.append(f"{base}: no {SCALE_SUFFIX[1:]} tensor")
            else:
                scalings["row" if (cfg.get("per_row") or len(scale.shape) == 2 and scale.shape[0] > 1)
                         else "tensor"] += 1
        orig[str(cfg.get("orig_dtype"))] += 1

    fd = os.open(path, os.O_RDONLY)
    try:
        for name, e in tensors.items():
            if not name.endswith(QUANT_SUFFIX):
                continue
            try:
                cfg = _read_json_tensor(fd, e.begin, e.end)
            except (UnicodeDecodeError, json.JSONDecodeError):
                problems.append(f"{name}: comfy_quant is not valid JSON")
                continue
            count(name[: -len(QUANT_SUFFIX)], cfg)
        # Layers described only in the header (the loaders restore their comfy_quant from it).
        for base, cfg in metadata_layer_configs(header.metadata).items():
            codes = tensors.get(base + ".weight")
            if base + QUANT_SUFFIX not in tensors and codes is not None and codes.dtype == "I8":
                count(base, cfg)
    finally:
        os.close(fd)

    quantized = {k[: -len(QUANT_SUFFIX)] for k in tensors if k.endswith(QUANT_SUFFIX)}
    high_precision = sorted(k for k, e in tensors.items() if k.endswith(".weight") and len(e.shape) == 2
                            and e.dtype in FLOAT_DTYPES and k[: -len(".weight")] not in quantized)
    meta = header.metadata
    qmeta = None
    if METADATA_KEY in meta:
        try:
            obj = json.loads(meta[METADATA_KEY])
            version = str(obj.get("format_version"))
            qmeta = {"format_version": version, "layers": len(obj.get("layers", {}) or {})}
            if version not in SUPPORTED_FORMAT_VERSIONS:
                problems.append(f"{METADATA_KEY} format_version {version!r} is unknown to this version "
                                f"(reads {', '.join(SUPPORTED_FORMAT_VERSIONS)})")
            elif quantized and qmeta["layers"] != len(quantized):
                problems.append(f"{METADATA_KEY} lists {qmeta['layers']} layers but {len(quantized)} carry comfy_quant")
        except (json.JSONDecodeError, AttributeError):
            problems.append(f"{METADATA_KEY} is not valid JSON")

    legacy_fp8 = any(k.endswith(".scale_weight") or k.split(".")[-1] == "scaled_fp8" for k in tensors)
    if kinds.get("int8_convrot"):
        fmt = "int8_convrot"
    elif kinds:
        fmt = "+".join(sorted(kinds))
    elif legacy_fp8:
        fmt = "scaled_fp8"
    else:
        fmt = "plain"
    prefix = DM_PREFIX if any(k.startswith(DM_PREFIX) for k in tensors) else None
    model_keys = [k[len(prefix):] for k in tensors if k.startswith(prefix)] if prefix else list(tensors)
    preset, why = detect_preset(model_keys)
    return {
        "path": path, "size_bytes": header.file_size, "format": fmt,
        "written_by": meta.get(PROVENANCE_KEY), "checkpoint_prefix": prefix,
        "preset": preset, "preset_reason": why,
        "tensors": len(tensors), "parameters": params,
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1]["bytes"])),
        "layers": dict(kinds) | {"high_precision_linear": len(high_precision)},
        "group_sizes": {str(k): v for k, v in sorted(groups.items())},
        "scaling": dict(scalings), "orig_dtypes": dict(orig),
        "quantization_metadata": qmeta,
        "metadata_keys": sorted(meta),
        "problems": problems,
    }


FORMAT_NAMES = {"int8_convrot": "INT8 ConvRot", "plain": "plain (not quantized)", "scaled_fp8": "ComfyUI scaled fp8"}


def format_report(info: dict) -> str:
    lines = [f"{info['path']}: {human_bytes(info['size_bytes'])}, {info['tensors']} tensors, "
             f"{info['parameters'] / 1e9:.3g} B parameters"]
    fmt = FORMAT_NAMES.get(info["format"], info["format"])
    if info["quantization_metadata"]:
        fmt += f" (_quantization_metadata {info['quantization_metadata']['format_version']})"
    lines.append(f"  format: {fmt}" + (f"; written by {info['written_by']}" if info["written_by"] else ""))
    where = f" under {info['checkpoint_prefix']}" if info["checkpoint_prefix"] else ""
    lines.append(f"  model: preset {info['preset']} ({info['preset_reason']}){where}")
    layers = info["layers"]
    parts = [f"{n} {k}" for k, n in layers.items() if k != "high_precision_linear"]
    parts.append(f"{layers['high_precision_linear']} high-precision Linear weights")
    lines.append("  layers: " + ", ".join(parts))
    if info["group_sizes"]:
        lines.append("  group sizes: " + ", ".join(f"{g} ({n})" for g, n in info["group_sizes"].items())
                     + "; scaling: " + ", ".join(f"{k} ({n})" for k, n in info["scaling"].items()))
    if info["orig_dtypes"]:
        lines.append("  orig_dtype: " + ", ".join(f"{k} ({n})" for k, n in info["orig_dtypes"].items()))
    lines.append("  dtypes: " + ", ".join(f"{d} {human_bytes(v['bytes'])} ({v['tensors']})"
                                         for d, v in info["dtypes"].items()))
    lines += [f"  problem: {p}" for p in info["problems"]]
    return "\n".join(lines)


__all__ = ["FileFormatError", "format_report", "inspect_file"]
