"""No silent garbage: int8 data (or a layer with a weight_scale/comfy_quant beside it) that lands in a
module or parameter our ops do not dequantize is refused with the file, the tensor and the fix —
never read as raw integers. Every module type ComfyUI's Z-Image/Lumina2 and Qwen3 builds use."""
from __future__ import annotations

import re

import pytest
import torch

import comfy_env

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfyui_inference_mode")]


def _model(ops):
    """One of each: our Linear and Embedding, ComfyUI's norms and Conv, a bare Parameter."""
    m = torch.nn.Module()
    m.lin = ops.Linear(64, 32, bias=False, dtype=torch.float32)
    m.emb = ops.Embedding(16, 64, dtype=torch.float32)
    m.norm = ops.RMSNorm(64, elementwise_affine=True, dtype=torch.float32) if hasattr(ops, "RMSNorm") else None
    m.ln = ops.LayerNorm(64, dtype=torch.float32)
    m.conv = ops.Conv2d(4, 8, 3, dtype=torch.float32)
    m.pad_token = torch.nn.Parameter(torch.zeros(1, 64))
    return m


def _state_dict(m):
    from comfyui_int8_convrot.kernels import quantize_weight
    from comfyui_int8_convrot.engine.format import LayerQuant
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=gen) for k, v in m.state_dict().items() if v is not None}
    sd["lin.weight"] = torch.randn(32, 64, generator=gen)
    sd["emb.weight"] = torch.randn(16, 64, generator=gen)
    for layer in ("lin", "emb"):
        sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"] = quantize_weight(sd[f"{layer}.weight"], 64)
        sd[f"{layer}.comfy_quant"] = LayerQuant().to_tensor()
    return sd


def _load(m, sd, path="model.safetensors"):
    from comfyui_int8_convrot.engine.loading import check_int8_consumed, int8_tensor_keys
    from comfyui_int8_convrot.nodes.ops import load_context
    expected = int8_tensor_keys(sd)
    with load_context(path) as ctx:
        m.load_state_dict(dict(sd), strict=False)
    check_int8_consumed(expected, ctx.consumed, path)


def test_int8_linear_and_embedding_load(comfy):
    from comfyui_int8_convrot.nodes.ops import make_ops
    m = _model(make_ops("w8a16"))
    _load(m, _state_dict(m))
    assert m.lin.is_quantized and m.emb.is_quantized


@pytest.mark.parametrize("key", ["norm.weight", "ln.weight", "conv.weight", "pad_token"])
@pytest.mark.parametrize("how", ["int8", "scale_beside"])
def test_int8_data_in_a_module_that_cannot_dequantize_it(comfy, key, how):
    from comfyui_int8_convrot.engine.errors import FileFormatError
    from comfyui_int8_convrot.engine.format import LayerQuant
    from comfyui_int8_convrot.nodes.ops import make_ops
    m = _model(make_ops("w8a16"))
    if key.startswith("norm") and m.norm is None:
        pytest.skip("this ComfyUI has no ops.RMSNorm")
    sd = _state_dict(m)
    if how == "int8":
        sd[key] = torch.randint(-127, 128, sd[key].shape, dtype=torch.int8)
    else:   # a float tensor that a converter marked as INT8 ConvRot: its scale would be dropped
        layer = key.rsplit(".", 1)[0]
        sd[f"{layer}.weight_scale"] = torch.ones(1)
        sd[f"{layer}.comfy_quant"] = LayerQuant().to_tensor()
        if not key.endswith(".weight"):
            key = f"{layer}.weight"
    with pytest.raises(FileFormatError) as err:
        _load(m, sd, "bad.safetensors")
    text = str(err.value)
    assert "bad.safetensors" in text and f"'{key}'" in text and "cannot dequantize" in text and "re-convert" in text


def test_unet_loader_refuses_an_int8_pad_token_and_norm(comfy, tmp_path):
    """Through the UNET loader on a Z-Image file: bare Parameter and RMSNorm weights stored as int8."""
    from comfyui_int8_convrot.engine.errors import FileFormatError
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY, iter_zimage
    from comfyui_int8_convrot.nodes.loaders import load_unet
    q, meta = comfy_env.int8_state_dict(dict(iter_zimage(ZIMAGE_TINY)), "zimage", 64)
    for key in ("x_pad_token", "layers.0.attention_norm1.weight"):
        bad = dict(q)
        bad[key] = torch.randint(-127, 128, bad[key].shape, dtype=torch.int8)
        path = comfy_env.save_state_dict(tmp_path / f"bad_{key}.safetensors", bad, meta)
        # (an int8 `.weight` without comfy_quant is refused before the build, the rest after it)
        with pytest.raises(FileFormatError, match=re.escape(f"bad_{key}.safetensors: tensor '{key}'")
                           + ".*(cannot dequantize|without a comfy_quant)"):
            load_unet(path, "w8a16")
