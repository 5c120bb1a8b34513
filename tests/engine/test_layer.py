"""engine/linear.py without ComfyUI: reading a layer from a state dict, the CPU prepack cache, and
the exactness of low-rank LoRA terms."""
import pytest
import torch
import torch.nn.functional as F

from comfyui_int8_convrot import kernels
from comfyui_int8_convrot.engine import linear as L
from comfyui_int8_convrot.engine.errors import FileFormatError
from comfyui_int8_convrot.engine.format import LayerQuant
from comfyui_int8_convrot.engine.synthetic import linear_weight


def layer_sd(out_f=96, in_f=128, g=64, prefix="blk.proj."):
    w = linear_weight(out_f, in_f, torch.Generator().manual_seed(0))
    codes, scale = kernels.quantize_weight(w, g)
    return w, {f"{prefix}weight": codes, f"{prefix}weight_scale": scale, f"{prefix}comfy_quant":
               LayerQuant(group_size=g).to_tensor(), f"{prefix}bias": torch.zeros(out_f), "other.weight": w}


def test_pop_int8_layer_takes_only_its_keys():
    _, sd = layer_sd()
    layer = L.pop_int8_layer(sd, "blk.proj.", out_features=96, in_features=128)
    assert layer.group_size == 64 and layer.codes.dtype == torch.int8 and layer.scale.shape == (96, 1)
    assert set(sd) == {"blk.proj.bias", "other.weight"}          # bias stays for the module
    assert L.pop_int8_layer(sd, "other.") is None                 # a float layer is left alone


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("blk.proj.weight_scale"), "without weight_scale"),
    (lambda sd: sd.__setitem__("blk.proj.weight_scale", torch.ones(5, 1)), "5 values"),
    (lambda sd: sd.__setitem__("blk.proj.comfy_quant", LayerQuant(group_size=256).to_tensor()),
     "256 does not divide the input dimension 128"),
    (lambda sd: sd.pop("blk.proj.comfy_quant"), "without a comfy_quant"),
    (lambda sd: sd.__setitem__("blk.proj.weight_scale", torch.full((96, 1), float("nan"))), "NaN"),
    (lambda sd: sd.__setitem__("blk.proj.weight", torch.zeros(96, 128, dtype=torch.float16)), "int8"),
])
def test_pop_int8_layer_errors(edit, match):
    _, sd = layer_sd()
    edit(sd)
    with pytest.raises(FileFormatError, match=match):
        L.pop_int8_layer(sd, "blk.proj.", path="m.safetensors")


def test_shape_mismatch_names_the_layer():
    _, sd = layer_sd()
    with pytest.raises(FileFormatError, match="blk.proj.weight.*does not match"):
        L.pop_int8_layer(sd, "blk.proj.", out_features=64, in_features=128)


def test_prepack_cache_rebuilds_when_codes_change(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "prepack", lambda c, s: calls.append(1) or ("packed", len(calls)))
    _, sd = layer_sd()
    codes, scale = sd["blk.proj.weight"].clone(), sd["blk.proj.weight_scale"].clone()
    cache = L.PrepackCache()
    assert cache.get(codes, scale) == ("packed", 1)
    assert cache.get(codes, scale) == ("packed", 1)               # reused
    codes[0, 0] = 1                                               # in-place edit bumps the version
    assert cache.get(codes, scale) == ("packed", 2)
    p = torch.nn.Parameter(codes, requires_grad=False)
    assert cache.get(p, scale) == ("packed", 2)                   # same storage and version: reused
    p.data = codes.clone()                                        # what Module.to() does
    assert cache.get(p, scale) == ("packed", 3)
    cache.clear()
    assert cache.get(p, scale) == ("packed", 4)


def test_lowrank_terms_equal_the_dense_update():
    gen = torch.Generator().manual_seed(1)
    w, sd = layer_sd()
    codes, scale = sd["blk.proj.weight"], sd["blk.proj.weight_scale"]
    x = torch.randn(3, 7, 128, generator=gen)
    terms = (L.LowRankTerm(torch.randn(4, 128, generator=gen), torch.randn(96, 4, generator=gen), 0.3),
             L.LowRankTerm(torch.randn(2, 128, generator=gen), torch.randn(32, 2, generator=gen), -1.5, (32, 32)))
    y = L.int8_forward(x, codes, scale, None, 64, "w8a16", None, terms)
    dense = kernels.dequantize_weight(codes, scale, 64) + sum(t.delta(96) for t in terms)
    ref = F.linear(x, dense)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-5


def test_int8_linear_module_close_to_float():
    w, _ = layer_sd()
    lin = L.Int8Linear.from_float(w, torch.zeros(96), 64, "w8a16")
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    ref = F.linear(x, w)
    assert ((lin(x) - ref).norm() / ref.norm()).item() < 0.02     # 8-bit rotated weights: ~0.6 % here
    assert torch.allclose(lin.dequantize(), kernels.dequantize_weight(lin.weight, lin.weight_scale, 64))
    with pytest.raises(ValueError, match="compute mode"):
        L.Int8Linear(lin.weight, lin.weight_scale, mode="fast")


def test_prepack_cache_takes_inference_mode_tensors(monkeypatch):
    """ComfyUI loads models under torch.inference_mode: such tensors have no version counter."""
    monkeypatch.setattr(kernels, "prepack", lambda c, s: "packed")
    _, sd = layer_sd()
    with torch.inference_mode():
        codes, scale = sd["blk.proj.weight"].clone(), sd["blk.proj.weight_scale"].float() * 1
    assert codes.is_inference() and L.PrepackCache().get(codes, scale) == "packed"
