"""The one check that decides whether the INT8 ConvRot loaders read a file, from its header and its
small scale / `comfy_quant` tensors only (milliseconds for a 12 GB model). The loaders call
`loader_check` before reading any weight; the web badge, the Inspect node and `int8-convrot inspect`
call `loader_refusal` and show the same reason, so a verdict and a load can never disagree.

Also names the quantized formats of ComfyUI and comfy-kitchen that are not INT8 ConvRot (their
`comfy_quant` "format" as ComfyUI's QUANT_ALGOS spells it), with the loader that reads each.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from .errors import FileFormatError, Int8ConvRotError
from .format import (INT8_FORMAT, QUANT_SUFFIX, SCALE_SUFFIX, LayerQuant, metadata_layer_configs, parse_layer_json,
                     parse_metadata)
from .linear import check_layer
from .safetensors_header import Header, read_header

FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


@dataclass(frozen=True)
class NativeFormat:
    name: str      # the comfy_quant "format"
    what: str      # what the codes are, one short phrase
    reader: str    # which loader reads it


# Layouts from comfy-kitchen 0.2.40 (comfy_kitchen/tensor/*.py) and ComfyUI's QUANT_ALGOS (0.8.0: fp8, nvfp4;
# 0.29: mxfp8, int8_tensorwise, convrot_w4a4; 0.31: asym_w4a8_int8; 0.36-0.38 index: awq_w4a16, svdquant_w4a4).
NATIVE_FORMATS = {f.name: f for f in (
    NativeFormat("float8_e4m3fn", "fp8 (e4m3) with tensor scales", "ComfyUI's stock loaders"),
    NativeFormat("float8_e5m2", "fp8 (e5m2) with tensor scales", "ComfyUI's stock loaders"),
    NativeFormat("nvfp4", "NVFP4: fp4 codes with fp8 block scales per 16", "the stock loader of ComfyUI ≥ 0.8"),
    NativeFormat("mxfp8", "MXFP8: fp8 codes with e8m0 block scales per 32", "the stock loader of ComfyUI ≥ 0.29"),
    NativeFormat("convrot_w4a4", "ConvRot W4A4: rotated int4 weights and activations",
                 "the stock loader of ComfyUI ≥ 0.29"),
    NativeFormat("asym_w4a8_int8", "W4A8: ConvRot-rotated int4 codebook codes with fp8 group scales, on the "
                 "INT8 GEMM", "the stock loader of ComfyUI ≥ 0.31"),
    NativeFormat("awq_w4a16", "AWQ W4A16: int4 weights with per-group scales and zero points",
                 "the stock loader of ComfyUI ≥ 0.36"),
    NativeFormat("svdquant_w4a4", "SVDQuant W4A4: int4 weights with a low-rank high-precision branch",
                 "the stock loader of ComfyUI ≥ 0.36"),
)}


def native_format_text(fmt: str) -> str:
    """'<what> (<format>), read by <reader>', or a plain line for a format nobody here knows."""
    f = NATIVE_FORMATS.get(fmt)
    if f is None:
        return f"quantized format {fmt!r}, unknown to this pack"
    return f"{f.what} ({fmt}), read by {f.reader}"


def native_format_error(fmt: str, *, path=None, tensor: str | None = None) -> FileFormatError:
    """The loaders' (and the converter's) refusal of a file in another quantized format."""
    f = NATIVE_FORMATS.get(fmt)
    hint = f"load it with {f.reader}" if f else "load it with the loader of the tool that wrote it"
    return FileFormatError(f"not INT8 ConvRot: {native_format_text(fmt)}", path=path, tensor=tensor, hint=hint)


def not_int8_error(path=None) -> FileFormatError:
    return FileFormatError(
        "not an INT8 ConvRot file: it has no int8_tensorwise layers", path=path,
        hint="set quantize_on_load to 'auto' to quantize this bf16/fp16/fp8 model while loading, or convert it "
             "once with the INT8 ConvRot Converter; fp8/bf16 files also load with ComfyUI's own loaders")


@dataclass(frozen=True)
class FileSummary:
    path: str
    int8_layers: int          # layers in the int8_tensorwise format
    other_quant_layers: int   # layers in another comfy_quant format (fp8)
    float_linears: int        # 2-D floating-point `.weight` tensors
    total_bytes: int


_FLOATS = ("BF16", "F16", "F32", "F8_E4M3", "F8_E5M2")


def _read_json(fd: int, e, path, key: str) -> dict:
    try:
        cfg = json.loads(os.pread(fd, e.nbytes, e.begin).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FileFormatError("comfy_quant is not valid JSON", path=path, tensor=key) from None
    if not isinstance(cfg, dict):
        raise FileFormatError("comfy_quant is not a JSON object", path=path, tensor=key)
    return cfg


# safetensors dtypes as torch reads them (anything else: the codes check reports it as uint8 bytes).
_TORCH_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                 "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _meta_tensor(e) -> torch.Tensor:
    """A data-less tensor with the entry's shape and dtype: what a check of shapes and dtypes needs."""
    return torch.empty(e.shape, dtype=_TORCH_DTYPES.get(e.dtype, torch.uint8), device="meta")


def _read_tensor(fd: int, e) -> torch.Tensor | None:
    """The entry's values (a scale: a few KB); None where torch cannot read its dtype or its bytes."""
    dtype = _TORCH_DTYPES.get(e.dtype)
    raw = os.pread(fd, e.nbytes, e.begin)
    if dtype is None or len(raw) != math.prod(e.shape) * dtype.itemsize:
        return None
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(e.shape) if raw else torch.empty(e.shape, dtype=dtype)


def _check_int8_layer(header: Header, fd: int, layer: str, quant: LayerQuant, path) -> None:
    """validate_int8_layers on header entries: linear.check_layer itself, on the codes' shape and dtype and
    the scale's values (the same messages the loaders raise)."""
    codes = header.tensors.get(f"{layer}.weight")
    scale = header.tensors.get(f"{layer}{SCALE_SUFFIX}")
    if codes is None or scale is None:
        missing = "weight" if codes is None else SCALE_SUFFIX[1:]
        raise FileFormatError(f"INT8 layer without its {missing}", path=path, tensor=f"{layer}{QUANT_SUFFIX}",
                              hint="the file is incomplete; re-convert it")
    values = _read_tensor(fd, scale) if len(codes.shape) == 2 and codes.dtype == "I8" else None
    if values is None:   # no values to check, only the count (codes that are not int8 fail first)
        values = torch.ones(scale.shape)
    check_layer(_meta_tensor(codes), values, quant, layer=layer, path=path)


def loader_check(path, quantize: str | None = None) -> FileSummary:
    """Raise the error the INT8 ConvRot loaders would raise for this file (with quantize_on_load
    `quantize`: None/"off" or a preset), else return what it holds. Reads the header, the comfy_quant
    JSON and the scales only."""
    path = os.fspath(path)
    header = read_header(path)
    tensors = header.tensors
    int8 = other = floats = 0
    described: set[str] = set()
    fd = os.open(path, os.O_RDONLY)
    try:
        layers: dict[str, tuple[str, dict]] = {}
        for key in sorted(k for k in tensors if k.endswith(QUANT_SUFFIX)):
            layers[key[: -len(QUANT_SUFFIX)]] = (key, _read_json(fd, tensors[key], path, key))
        # Another quantized format first: its own loader reads it, whatever else the file holds.
        for layer, (key, cfg) in layers.items():
            fmt = cfg.get("format")
            if fmt != INT8_FORMAT and fmt not in FP8_FORMATS:
                raise native_format_error(str(fmt), path=path, tensor=key)
        # Files that describe their layers in the header (unreadable metadata: parse_metadata raises below).
        for layer, cfg in metadata_layer_configs(header.metadata).items():
            fmt = str(cfg.get("format"))
            if fmt != INT8_FORMAT and fmt in NATIVE_FORMATS and fmt not in FP8_FORMATS:
                raise native_format_error(fmt, path=path, tensor=f"{layer}.weight")
        meta_layers = parse_metadata(header.metadata, path=path) or {}
        for layer, (key, cfg) in layers.items():
            described.add(layer)
            if cfg.get("format") == INT8_FORMAT:
                int8 += 1
                _check_int8_layer(header, fd, layer, parse_layer_json(cfg, path=path, layer=layer), path)
            else:
                other += 1
                if quantize not in (None, "off") and f"{layer}{SCALE_SUFFIX}" not in tensors:
                    raise FileFormatError(f"fp8 layer without its {SCALE_SUFFIX[1:]}", path=path, tensor=key,
                                          hint="the file is incomplete; use the bf16/fp16 original")
        for layer, quant in meta_layers.items():   # header-only descriptions, restored by the loaders
            codes = tensors.get(f"{layer}.weight")
            if layer in described or codes is None or codes.dtype != "I8":
                continue
            described.add(layer)
            int8 += 1
            _check_int8_layer(header, fd, layer, quant, path)
    finally:
        os.close(fd)
    for key, e in tensors.items():
        if key.endswith(".weight") and e.dtype == "I8" and key[: -len(".weight")] not in described:
            raise FileFormatError("int8 weight without a comfy_quant entry (its ConvRot group size is unknown)",
                                  path=path, tensor=key,
                                  hint="convert the original with the INT8 ConvRot Converter or ctq --comfy_quant")
        if key.endswith(".weight") and len(e.shape) == 2 and e.dtype in _FLOATS:
            floats += 1
    if int8 == 0 and quantize in (None, "off"):
        raise not_int8_error(path)
    return FileSummary(path, int8, other, floats, header.file_size)


def loader_refusal(path, display_name: str | None = None) -> str | None:
    """Why the loaders (quantize_on_load off) refuse the file, with `path` shown as `display_name`;
    None when they read it."""
    path = os.fspath(path)
    try:
        loader_check(path)
    except Int8ConvRotError as exc:
        text = str(exc)
        return text.replace(path, display_name) if display_name is not None else text
    return None


__all__ = ["FP8_FORMATS", "FileSummary", "NATIVE_FORMATS", "NativeFormat", "loader_check", "loader_refusal",
           "native_format_error", "native_format_text", "not_int8_error"]
