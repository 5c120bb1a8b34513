"""The per-layer `comfy_quant` JSON read as ComfyUI 0.29 reads it, and every power-of-4 group size
comfy-kitchen builds (4096 too)."""
from __future__ import annotations

import json

import pytest
import torch

from comfyui_int8_convrot.engine.errors import FileFormatError
from comfyui_int8_convrot.engine.format import convrot_group_size, parse_layer_json, parse_layer_tensor
from comfyui_int8_convrot.kernels import dequantize_weight, int8_linear, quantize_weight, use_backend

INT8 = {"format": "int8_tensorwise"}


@pytest.mark.parametrize("cfg, group", [
    ({**INT8, "convrot": True, "convrot_groupsize": 64}, 64),                    # ctq and ours
    ({**INT8, "params": {"convrot": True, "convrot_groupsize": 64}}, 64),        # nested, as some tools write
    ({**INT8, "convrot": True}, 256),                                            # ComfyUI's default size
    ({**INT8, "params": {"convrot": True}}, 256),
    ({**INT8, "convrot": True, "params": {"convrot_groupsize": 16}}, 16),        # mixed
    ({**INT8, "convrot": True, "convrot_groupsize": 64, "params": {"convrot_groupsize": 16}}, 64),  # top wins
    ({**INT8, "convrot": False, "params": {"convrot": True}}, None),             # top-level False wins
    ({**INT8, "params": "not a dict"}, None),
    (INT8, None),
    ({**INT8, "convrot": True, "convrot_groupsize": 4096}, 4096),
])
def test_group_size_as_comfyui_reads_it(cfg, group):
    assert convrot_group_size(cfg) == group
    assert parse_layer_json(cfg).group_size == group


def test_a_file_saved_by_comfyui_029():
    """0.29's own save writes format + convrot + convrot_groupsize only (no orig_dtype, no per_row)."""
    raw = json.dumps({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}).encode()
    lq = parse_layer_tensor(torch.tensor(list(raw), dtype=torch.uint8))
    assert lq.group_size == 64 and lq.orig_dtype is None


@pytest.mark.parametrize("g", [2, 8, 32, 128, 48, 0.5, True, "64"])
def test_bad_group_sizes_are_refused_with_the_tensor(g):
    with pytest.raises(FileFormatError, match=r"f\.safetensors: tensor 'l\.comfy_quant': ConvRot group size .* "
                                              r"is not a power of 4"):
        parse_layer_json({**INT8, "convrot": True, "convrot_groupsize": g}, path="f.safetensors", layer="l")


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_group_4096_runs(mode):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 8192, generator=gen)
    codes, scale = quantize_weight(w, 4096)
    deq = dequantize_weight(codes, scale, 4096)
    assert ((deq - w).norm() / w.norm()) < 0.02
    x = torch.randn(20, 8192, generator=gen)
    with use_backend("reference"):
        y = int8_linear(x, codes, scale, None, 4096, mode)
    ref = x.double() @ deq.double().t()
    assert ((y.double() - ref).norm() / ref.norm()) < 0.02
