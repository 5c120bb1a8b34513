"""The few facts a user needs about a model file at a glance, with a verdict: used by the web
badge under the loader nodes (through the pack's HTTP route) and the Inspect node's report.

    file_facts(path, display_name=None) -> {"info": inspect_file(...), "summary": {...}, "report": str}

`summary["level"]`: "bad" exactly when the loaders refuse the file (engine/verdict.py's check, the one
the loaders run; `summary["refusal"]` is their message), else "ok" (INT8 ConvRot, row scales) or "warn"
(tensor-wise scales: soft, waxy images; INT8 without rotation; a damaged header entry the loaders
skip). `summary["lines"]` is the badge text.
"""
from __future__ import annotations

import os

from .format import QUANT_SUFFIX, SCALE_SUFFIX
from .inspect import format_report, inspect_file
from .safetensors_header import read_header
from .safetensors_writer import human_bytes
from .verdict import NATIVE_FORMATS, loader_refusal, native_format_text

LEVELS = ("ok", "warn", "bad")
# Tensors that exist only because of quantization: a bf16 original has none of them.
QUANT_ONLY_SUFFIXES = (SCALE_SUFFIX, QUANT_SUFFIX, ".scale_weight", ".scale_input", ".input_scale")
FLOAT_ST_DTYPES = ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2")
DTYPE_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64", "F8_E4M3": "fp8 e4m3",
               "F8_E5M2": "fp8 e5m2", "I8": "int8"}
PRESET_NAMES = {"zimage": "Z-Image", "qwen3": "Qwen3", "generic": "generic model"}
# Short: each is one line of the badge (the report and the CLI say more).
WAXY_WARNING = "tensor-wise scales: soft, waxy images likely"
UNROTATED_WARNING = "no ConvRot rotation: outliers cost precision"
NOT_INT8_WARNING = "set quantize_on_load, or convert it first"


def bf16_equivalent_bytes(header) -> int:
    """Bytes the same tensors take in bf16: every float or int8-coded tensor at 2 bytes per value,
    quantization-only tensors (scales, comfy_quant) dropped, anything else as stored; plus the header."""
    total = header.data_start
    for name, e in header.tensors.items():
        if name.endswith(QUANT_ONLY_SUFFIXES) or name.split(".")[-1] == "scaled_fp8":
            continue
        if e.dtype in FLOAT_ST_DTYPES or e.dtype == "I8":
            n = 1
            for s in e.shape:
                n *= s
            total += 2 * n
        else:
            total += e.nbytes
    return total


def _main_dtype(info: dict) -> str:
    floats = [d for d in info["dtypes"] if d in FLOAT_ST_DTYPES]   # dtypes are sorted by bytes, largest first
    return DTYPE_NAMES.get(floats[0], floats[0]) if floats else "?"


def summarize(info: dict, bf16_bytes: int, refusal: str | None = None) -> dict:
    """The badge: a verdict, three short lines and the warnings, from `inspect_file`'s dict and the
    loaders' refusal (`verdict.loader_refusal`; None: they read the file)."""
    layers = info["layers"]
    convrot = layers.get("int8_convrot", 0)
    unrotated = layers.get("int8_unrotated", 0)
    int8 = convrot + unrotated
    other_quant = sum(n for k, n in layers.items() if k not in ("int8_convrot", "int8_unrotated",
                                                                  "high_precision_linear"))
    kept = layers.get("high_precision_linear", 0)
    groups = sorted(((int(g), n) for g, n in info["group_sizes"].items()), key=lambda gn: -gn[1])
    scaling = info["scaling"]
    fmt = info["format"]
    warnings: list[str] = []
    native: list[str] = []
    preset = PRESET_NAMES.get(info["preset"], info["preset"])

    if fmt == "int8_convrot":
        level = "ok"
        title = "INT8 ConvRot"
        parts = [title]
        if groups:
            parts.append("group " + " + ".join(str(g) for g, _ in groups))
        if scaling.get("tensor"):
            parts.append("tensor-wise scales" if not scaling.get("row") else
                         f"row scales, {scaling['tensor']} tensor-wise")
            warnings.append(WAXY_WARNING)
            level = "warn"
        else:
            parts.append("row scales")
        line1 = " · ".join(parts)
        counts = f"{int8} quantized" + (f" ({unrotated} unrotated)" if unrotated else "")
    elif fmt == "int8_unrotated":
        level, title = "warn", "INT8 (no ConvRot)"
        line1 = f"{title} · {'tensor-wise' if scaling.get('tensor') else 'row'} scales"
        warnings.append(UNROTATED_WARNING)
        counts = f"{int8} quantized"
    else:
        level = "bad"
        native = [k for k in layers if k in NATIVE_FORMATS and not k.startswith("float8")]
        if native:
            title = NATIVE_FORMATS[native[0]].name
        elif fmt == "plain":
            title = f"plain {_main_dtype(info)}"
        elif fmt == "scaled_fp8" or "float8" in fmt:
            title = "fp8" if fmt != "scaled_fp8" else "scaled fp8"
        else:
            title = fmt
        line1 = f"not INT8 ConvRot: {title}"
        counts = (f"{other_quant} quantized" if other_quant else "no INT8 layers") + f" · {kept} Linear weights"
        if native:   # its own loader reads it: say which, never "convert it"
            warnings += [native_format_text(k) for k in native]
        else:
            warnings.append(NOT_INT8_WARNING)
    if other_quant and fmt in ("int8_convrot", "int8_unrotated"):
        counts += f", {other_quant} in another format"
    if level != "bad":
        counts += f" · {kept} kept high precision"
    line2 = counts + (f" · {preset}" if info["preset"] and info["preset"] != "generic" else "")
    size = info["size_bytes"]
    ratio = size / bf16_bytes if bf16_bytes else None
    line3 = human_bytes(size) + (f" · {ratio:.0%} of bf16 ({human_bytes(bf16_bytes)})" if ratio is not None else "")
    problems = list(info["problems"])
    if problems and level == "ok":
        level = "warn"
    warnings += problems
    if refusal is not None and level != "bad":   # an INT8 file the loaders refuse (damaged): red, their reason
        level, line1 = "bad", f"refused by the loaders: {title}"
        warnings.insert(0, refusal)
    elif refusal is None and level == "bad":     # they read it: never red
        level = "warn"
    return {
        "level": level, "refusal": refusal, "native_format": native[0] if level == "bad" and native else None,
        "title": title, "lines": [line1, line2, line3], "warnings": warnings,
        "format": fmt, "quantized": int8, "unrotated": unrotated, "other_quantized": other_quant, "kept": kept,
        "group_sizes": [g for g, _ in groups], "scaling": sorted(scaling), "preset": info["preset"],
        "size_bytes": size, "bf16_bytes": bf16_bytes, "size_ratio": ratio,
        # A float file the loaders can quantize on load (fp8 included: it is dequantized first).
        "quantizable": fmt in ("plain", "scaled_fp8") or (fmt.startswith("float8") and not int8),
    }


def badge_text(summary: dict) -> str:
    return "\n".join(summary["lines"] + [f"⚠ {w}" for w in summary["warnings"]])


def file_facts(path, display_name: str | None = None) -> dict:
    """`inspect_file` (with `path` shown as `display_name`), the badge summary and the CLI's report text."""
    path = os.fspath(path)
    info = inspect_file(path)
    shown = display_name if display_name is not None else os.path.basename(path)
    summary = summarize(info, bf16_equivalent_bytes(read_header(path)), loader_refusal(path, shown))
    if display_name is not None:
        info["path"] = display_name
    return {"info": info, "summary": summary, "report": format_report(info)}


__all__ = ["LEVELS", "badge_text", "bf16_equivalent_bytes", "file_facts", "summarize"]
