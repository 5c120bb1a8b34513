"""The INT8 ConvRot checkpoint format (../shared/FORMAT.md): per-layer `comfy_quant` JSON tensors
and the `_quantization_metadata` header entry, serialized byte for byte as convert-to-quant does."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..kernels.hadamard import VALID_GROUP_SIZES, is_power_of_4
from .errors import FileFormatError

INT8_FORMAT = "int8_tensorwise"
FORMAT_VERSION = "1.0"
SUPPORTED_FORMAT_VERSIONS = ("1.0",)
METADATA_KEY = "_quantization_metadata"
QUANT_SUFFIX = ".comfy_quant"
SCALE_SUFFIX = ".weight_scale"

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "half": torch.float16, "float": torch.float32,
           "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype)  # "torch.bfloat16", as convert-to-quant writes it


def parse_dtype(name: str | None) -> torch.dtype | None:
    """Accepts 'torch.bfloat16', 'bfloat16' and None (files without orig_dtype)."""
    if name is None:
        return None
    key = name[len("torch."):] if name.startswith("torch.") else name
    return _DTYPES.get(key)


@dataclass(frozen=True)
class LayerQuant:
    """How one Linear layer is stored. group_size None: quantized without rotation."""
    orig_dtype: torch.dtype | None = torch.bfloat16
    group_size: int | None = 64
    per_row: bool = True
    format: str = INT8_FORMAT

    def to_json(self) -> dict:
        # Key order and presence exactly as convert-to-quant's create_comfy_quant_tensor.
        d = {"format": self.format}
        if self.orig_dtype is not None:
            d["orig_dtype"] = dtype_name(self.orig_dtype)
        if self.group_size:
            d["convrot"] = True
            d["convrot_groupsize"] = self.group_size
        if self.per_row:
            d["per_row"] = True
        return d

    def metadata_entry(self) -> dict:
        d = {"format": self.format, "orig_dtype": dtype_name(self.orig_dtype) if self.orig_dtype else None}
        if self.group_size:
            d["convrot"] = True
            d["convrot_groupsize"] = self.group_size
        return d

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(list(json.dumps(self.to_json()).encode("utf-8")), dtype=torch.uint8)


def convrot_group_size(cfg: dict):
    """The layer's ConvRot group (None: not rotated), read as ComfyUI 0.29 reads it: top-level keys
    win, then the same keys under "params"; 256 when `convrot` is set without a size."""
    params = cfg.get("params")
    params = params if isinstance(params, dict) else {}
    if not cfg.get("convrot", params.get("convrot", False)):
        return None
    return cfg.get("convrot_groupsize", params.get("convrot_groupsize", 256))


def parse_layer_json(cfg: dict, *, path=None, layer: str | None = None) -> LayerQuant:
    tensor = f"{layer}{QUANT_SUFFIX}" if layer else None
    fmt = cfg.get("format")
    if fmt != INT8_FORMAT:
        raise FileFormatError(f"layer format {fmt!r} is not INT8 ConvRot ({INT8_FORMAT!r})", path=path, tensor=tensor,
                              hint="load FP8/NVFP4 files with ComfyUI's own loader")
    group = convrot_group_size(cfg)
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or not is_power_of_4(group)):
        raise FileFormatError(f"ConvRot group size {group!r} is not a power of 4 ({', '.join(map(str, VALID_GROUP_SIZES))}"
                              ", ...)", path=path, tensor=tensor,
                              hint="the file was written by an incompatible tool; re-convert it")
    orig = cfg.get("orig_dtype")
    dtype = parse_dtype(orig)
    if orig is not None and dtype is None:
        raise FileFormatError(f"unknown orig_dtype {orig!r}", path=path, tensor=tensor)
    return LayerQuant(orig_dtype=dtype, group_size=group, per_row=bool(cfg.get("per_row", False)), format=fmt)


def parse_layer_tensor(t: torch.Tensor, *, path=None, layer: str | None = None) -> LayerQuant:
    try:
        cfg = json.loads(bytes(t.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"comfy_quant is not valid JSON ({exc})", path=path,
                              tensor=f"{layer}{QUANT_SUFFIX}" if layer else None) from None
    return parse_layer_json(cfg, path=path, layer=layer)


def build_metadata(layers: dict[str, LayerQuant], keep: dict[str, str] | None = None) -> dict[str, str]:
    out = dict(keep or {})
    out[METADATA_KEY] = json.dumps({"format_version": FORMAT_VERSION,
                                    "layers": {k: v.metadata_entry() for k, v in layers.items()}})
    return out


def parse_metadata(metadata: dict[str, str] | None, *, path=None) -> dict[str, LayerQuant] | None:
    """Layers listed in the header metadata, None if the file has none. Unknown versions are refused."""
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{METADATA_KEY} is not valid JSON ({exc})", path=path) from None
    version = str(obj.get("format_version", ""))
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise FileFormatError(f"unknown INT8 ConvRot format_version {version!r} (this pack reads "
                              f"{', '.join(SUPPORTED_FORMAT_VERSIONS)})", path=path,
                              hint="update ComfyUI-INT8-ConvRot, or re-convert the file with this version")
    return {name: parse_layer_json(cfg, path=path, layer=name) for name, cfg in obj.get("layers", {}).items()}


def metadata_layer_configs(metadata: dict[str, str] | None) -> dict[str, dict]:
    """The header's per-layer JSON objects as written, {} when absent or unreadable: for looking at a file
    (inspection, naming its formats); `parse_metadata` is what the loaders read, and raises."""
    try:
        layers = json.loads((metadata or {}).get(METADATA_KEY, "{}")).get("layers", {}) or {}
    except (json.JSONDecodeError, AttributeError):
        return {}
    return {k: v for k, v in layers.items() if isinstance(v, dict)} if isinstance(layers, dict) else {}


def quantized_layer_names(keys) -> list[str]:
    return sorted(k[: -len(QUANT_SUFFIX)] for k in keys if k.endswith(QUANT_SUFFIX))
