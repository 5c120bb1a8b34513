"""Model files for the verdict tests: every bad-file kind of tests/engine/test_bad_inputs.py (plus the
damaged INT8 ConvRot files of issue 18: weight_scale removed, all or one; NaN in a scale; an unknown
format_version), good files, and hand-built files in the native formats of newer ComfyUI and
comfy-kitchen, in their real layouts (key names, dtypes, scale tensors, comfy_quant JSON per layer and
the `_quantization_metadata` header entry, as ComfyUI's ops.py reads them and comfy-kitchen 0.2.40's
layout classes define them).

`build(folder)` writes them all into `folder` and returns {kind: path}. Files that are not even a
readable safetensors file are listed in UNREADABLE (the route answers 422 for them).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from comfy_env import int8_state_dict, save_state_dict

UNREADABLE = ("truncated", "empty", "text", "bad_header")
GOOD = ("int8", "int8_tensorwise", "int8_metadata_only")
NATIVE = ("asym_w4a8_int8", "convrot_w4a4", "awq_w4a16", "nvfp4", "mxfp8", "svdquant_w4a4")


def _quant(cfg: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(cfg).encode("utf-8")), dtype=torch.uint8)


def _zimage():
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY, iter_zimage
    return dict(iter_zimage(ZIMAGE_TINY, seed=7))


def native_layer(fmt: str, n: int = 256, k: int = 256) -> dict[str, torch.Tensor]:
    """The tensors of one Linear `fmt` layer (without its name prefix), as ComfyUI's loader pops them."""
    g = torch.Generator().manual_seed(1)
    packed = torch.randint(-128, 128, (n, k // 2), dtype=torch.int8, generator=g)   # two int4 codes per byte
    if fmt == "asym_w4a8_int8":   # comfy_kitchen/tensor/w4a8_int8.py: s_rel [N, K/16] fp8, s_channel [N], codebook
        return {"weight": packed, "weight_s_rel": torch.rand(n, k // 16, generator=g).to(torch.float8_e4m3fn),
                "weight_s_channel": torch.rand(n, generator=g), "weight_codebook": torch.linspace(-1, 1, 16),
                "comfy_quant": _quant({"format": fmt, "group_size": 16, "convrot_groupsize": 256,
                                       "orig_dtype": "torch.bfloat16"})}
    if fmt == "convrot_w4a4":     # comfy_kitchen/tensor/convrot_w4a4.py: int4 codes, scales per 64 inputs
        return {"weight": packed, "weight_scale": torch.rand(n, k // 64, generator=g).to(torch.bfloat16),
                "comfy_quant": _quant({"format": fmt, "convrot_groupsize": 256, "linear_dtype": "int4"})}
    if fmt == "awq_w4a16":        # comfy_kitchen/tensor/awq_w4a16.py: wscales / wzeros (K/G, N)
        return {"weight": packed, "weight_scale": torch.rand(k // 64, n, generator=g).to(torch.bfloat16),
                "weight_zeros": torch.rand(k // 64, n, generator=g).to(torch.bfloat16),
                "comfy_quant": _quant({"format": fmt, "group_size": 64})}
    if fmt == "svdquant_w4a4":
        return {"weight": packed, "weight_scale": torch.rand(k // 64, n, generator=g).to(torch.bfloat16),
                "weight_proj_down": torch.randn(k, 32, generator=g).to(torch.bfloat16),
                "weight_proj_up": torch.randn(n, 32, generator=g).to(torch.bfloat16),
                "weight_smooth_factor": torch.rand(k, generator=g).to(torch.bfloat16),
                "comfy_quant": _quant({"format": fmt})}
    if fmt == "nvfp4":            # packed fp4 in uint8, fp8 block scales per 16, fp32 tensor scale
        return {"weight": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
                "weight_scale": torch.rand(n, k // 16, generator=g).to(torch.float8_e4m3fn),
                "weight_scale_2": torch.tensor(0.01), "comfy_quant": _quant({"format": fmt})}
    if fmt == "mxfp8":            # fp8 codes, e8m0 block scales per 32 (stored as uint8)
        return {"weight": torch.randn(n, k, generator=g).to(torch.float8_e4m3fn),
                "weight_scale": torch.randint(120, 130, (n, k // 32), dtype=torch.uint8, generator=g),
                "comfy_quant": _quant({"format": fmt})}
    raise ValueError(fmt)


def native_file(path: Path, fmt: str) -> Path:
    """A tiny Z-Image with its attention and FFN Linear layers in `fmt` and the rest bf16, with the
    header's _quantization_metadata listing them, as ComfyUI's quantizing save writes it."""
    sd, layers = _zimage(), {}
    for name in [k[: -len(".weight")] for k in sd if k.endswith((".qkv.weight", ".w1.weight"))]:
        n, k = sd.pop(f"{name}.weight").shape
        for suffix, t in native_layer(fmt, n, k).items():
            sd[f"{name}.{suffix}"] = t
        layers[name] = json.loads(bytes(sd[f"{name}.comfy_quant"].tolist()))
    return save_state_dict(path, sd, {"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                                           "layers": layers})})


def build(folder: Path) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = _zimage()
    q, meta = int8_state_dict(sd, "zimage", 64)
    t, tmeta = int8_state_dict(sd, "zimage", 64, "tensor")
    out = {"int8": save_state_dict(folder / "int8.safetensors", q, meta),
           "int8_tensorwise": save_state_dict(folder / "int8_tensorwise.safetensors", t, tmeta),
           "int8_metadata_only": save_state_dict(folder / "int8_metadata_only.safetensors",
                                                 {k: v for k, v in q.items() if not k.endswith(".comfy_quant")}, meta),
           "bf16": save_state_dict(folder / "bf16.safetensors", sd)}
    scales = sorted(k for k in q if k.endswith(".weight_scale"))
    out["no_scales"] = save_state_dict(folder / "no_scales.safetensors",
                                       {k: v for k, v in q.items() if not k.endswith(".weight_scale")}, meta)
    out["one_scale_removed"] = save_state_dict(folder / "one_scale_removed.safetensors",
                                               {k: v for k, v in q.items() if k != scales[3]}, meta)
    nan = dict(q)
    nan[scales[0]] = nan[scales[0]].clone()
    nan[scales[0]].view(-1)[2] = float("nan")
    out["nan_scale"] = save_state_dict(folder / "nan_scale.safetensors", nan, meta)
    out["format_version_2"] = save_state_dict(folder / "format_version_2.safetensors", q, {
        "_quantization_metadata": json.dumps({"format_version": "2.0", "layers": {}})})
    raw = out["int8"].read_bytes()
    (folder / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "text.safetensors").write_bytes(b"hello, world: not a model")
    (folder / "bad_header.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2]   ")
    out |= {k: folder / f"{k}.safetensors" for k in UNREADABLE}
    nan_w = dict(sd)
    nan_w["layers.1.feed_forward.w1.weight"] = nan_w["layers.1.feed_forward.w1.weight"].clone()
    nan_w["layers.1.feed_forward.w1.weight"][5, 17] = float("nan")
    out["nan_weights_bf16"] = save_state_dict(folder / "nan_weights_bf16.safetensors", nan_w)
    out["scaled_fp8_missing_scale"] = save_state_dict(folder / "scaled_fp8_missing_scale.safetensors", {
        "layers.0.attention.qkv.weight": torch.randn(768, 256).to(torch.float8_e4m3fn),
        "layers.0.attention.out.weight": torch.randn(256, 256).to(torch.float8_e4m3fn),
        "layers.0.attention.out.scale_weight": torch.tensor([0.01]),
        "scaled_fp8": torch.empty(2, dtype=torch.float8_e4m3fn)})
    out["comfy_fp8_no_scale"] = save_state_dict(folder / "comfy_fp8_no_scale.safetensors", {
        "blk.fc.weight": torch.randn(64, 64).to(torch.float8_e4m3fn),
        "blk.fc.comfy_quant": _quant({"format": "float8_e4m3fn"})})
    out["int8_without_comfy_quant"] = save_state_dict(folder / "int8_without_comfy_quant.safetensors",
                                                      {"blk.fc.weight": torch.zeros(4, 64, dtype=torch.int8)})
    for fmt in NATIVE:
        out[fmt] = native_file(folder / f"{fmt}.safetensors", fmt)
    return out


__all__ = ["GOOD", "NATIVE", "UNREADABLE", "build", "native_file", "native_layer"]
