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
    from comfyui_int8_convrot.kernels import cpu_prepack
    monkeypatch.setattr(cpu_prepack, "pack_int8_weight", lambda c, s: calls.append(1) or ("packed", len(calls)))
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


def lowrank_case(gen, dtype=torch.float32):
    """Two full-output LoRAs and three row-offset ones (two on the same rows, as two to_q LoRAs on a
    fused qkv), in `dtype` like a LoRA file."""
    def term(rank, rows=None, scale=1.0):
        n = 96 if rows is None else rows[1]
        return L.LowRankTerm(torch.randn(rank, 128, generator=gen).to(dtype), torch.randn(n, rank, generator=gen).to(dtype),
                             scale, rows)
    return (term(4, None, 0.3), term(2, (32, 32), -1.5), term(3, None, 0.7), term(2, (0, 32), 2.0),
            term(1, (32, 32), 0.25))


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_lowrank_terms_equal_the_dense_update(mode):
    gen = torch.Generator().manual_seed(1)
    w, sd = layer_sd()
    codes, scale = sd["blk.proj.weight"], sd["blk.proj.weight_scale"]
    x = torch.randn(3, 7, 128, generator=gen)
    terms = lowrank_case(gen)
    y = L.int8_forward(x, codes, scale, None, 64, mode, None, terms)
    y0 = L.int8_forward(x, codes, scale, None, 64, mode, None)
    ref = F.linear(x.double(), sum(t.delta(96, torch.float64) for t in terms))
    assert ((y - y0 - ref).norm() / ref.norm()).item() < 1e-5


def test_stacked_lowrank_groups_terms_by_rows():
    terms = lowrank_case(torch.Generator().manual_seed(2))
    s = L.stack_lowrank(terms, "cpu", torch.float32)
    assert s.down.shape == (12, 128)
    assert [(rows, c0, c1, tuple(up.shape)) for rows, c0, c1, up in s.ups] == [
        (None, 0, 7, (96, 7)), ((0, 32), 7, 9, (32, 2)), ((32, 32), 9, 12, (32, 3))]
    dense = torch.zeros(96, 128, dtype=torch.float64)
    for rows, c0, c1, up in s.ups:
        r = slice(None) if rows is None else slice(rows[0], rows[0] + rows[1])
        dense[r] += up.double() @ s.down[c0:c1].double()
    assert torch.allclose(dense, sum(t.delta(96, torch.float64) for t in terms), rtol=1e-6, atol=1e-5)


def test_lowrank_set_is_a_tuple_with_a_cached_stack():
    terms = lowrank_case(torch.Generator().manual_seed(3), torch.bfloat16)
    lr = L.LowRankSet(terms)
    assert lr == terms and len(lr) == 5 and lr[1].rows == (32, 32) and L.LowRankSet() == ()
    a = lr.stacked("cpu", torch.float32)
    assert lr.stacked(torch.device("cpu"), torch.float32) is a and a.down.dtype == torch.float32
    assert L.join_lowrank(lr, ()) is lr and L.join_lowrank((), lr) is lr
    assert L.join_lowrank(lr, lr[:1]) == terms + terms[:1]
    transient = L.LowRankSet(terms, keep=False)                   # lowvram: stacked per call, not kept
    assert transient.stacked("cpu", torch.float32) is not transient.stacked("cpu", torch.float32)
    assert torch.equal(transient.stacked("cpu", torch.float32).down, a.down)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_apply_lowrank_in_place_in_every_activation_dtype(dtype, tol):
    """y is updated in place (no full-size temporary); on CPU the small GEMMs run in float32
    whatever the activation dtype, so the only extra rounding is the one into y."""
    gen = torch.Generator().manual_seed(4)
    terms = L.LowRankSet(lowrank_case(gen, torch.bfloat16))
    x = torch.randn(2, 9, 128, generator=gen).to(dtype)
    y = torch.randn(2, 9, 96, generator=gen).to(dtype)
    ref = y.double() + F.linear(x.double(), sum(t.delta(96, torch.float64) for t in terms))
    ptr = y.data_ptr()
    out = L.apply_lowrank(y, x, terms)
    assert out.data_ptr() == ptr and out.dtype == dtype
    assert L.lowrank_compute_dtype(x) == torch.float32
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol
    assert L.apply_lowrank(y, x, ()) is y
    assert L.lowrank_compute_dtype(x.double()) == torch.float64


def test_apply_lowrank_row_panels_equal_one_gemm(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    terms = L.LowRankSet(lowrank_case(gen))
    x, y = torch.randn(37, 128, generator=gen), torch.randn(37, 96, generator=gen)
    whole = L.apply_lowrank(y.clone(), x, terms)
    monkeypatch.setattr(L, "LOWRANK_DOWN_ROWS", 8)                 # 5 panels, ragged tail
    panels = L.apply_lowrank(y.clone(), x, terms)
    assert ((panels - whole).norm() / whole.norm()).item() < 1e-6   # float32 summation order only


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
    from comfyui_int8_convrot.kernels import cpu_prepack
    monkeypatch.setattr(cpu_prepack, "pack_int8_weight", lambda c, s: "packed")
    _, sd = layer_sd()
    with torch.inference_mode():
        codes, scale = sd["blk.proj.weight"].clone(), sd["blk.proj.weight_scale"].float() * 1
    assert codes.is_inference() and L.PrepackCache().get(codes, scale) == "packed"


def test_a_copied_layer_gets_its_own_pack():
    """copy.deepcopy / pickle of a layer: a new cache and handle, so the two never repack each other."""
    import copy
    import pickle
    layer = L.Int8Linear.from_float(torch.randn(96, 128, generator=torch.Generator().manual_seed(5)), None, 64, "w8a8")
    x = torch.randn(4, 128)
    layer(x)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin._cache.handle != layer._cache.handle and not twin._cache.is_packed
        torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
