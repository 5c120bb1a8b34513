"""Layer policies: which tensors become INT8 ConvRot layers, and why the others stay."""
import pytest
import torch

from comfyui_int8_convrot.engine import synthetic
from comfyui_int8_convrot.engine.errors import Int8ConvRotError
from comfyui_int8_convrot.engine.policy import detect_preset, get_policy

ZIMAGE_KEYS = {k: tuple(v.shape) for k, v in synthetic.iter_zimage(synthetic.ZIMAGE_TINY)}
QWEN3_KEYS = {k: tuple(v.shape) for k, v in synthetic.iter_qwen3(synthetic.QWEN3_TINY, lm_head=True)}


def quantized(policy, keys, dtype=torch.bfloat16):
    return {k for k, s in keys.items() if policy.decide(k, s, dtype) is not None}


def test_zimage_is_ctq_zimage():
    """The same layers as convert-to-quant's --zimage filter, computed with ctq's own code."""
    from convert_to_quant.constants import build_exclusion_patterns
    skip, _, _ = build_exclusion_patterns({"zimage": True}, ZIMAGE_KEYS)
    ctq = {k for k, s in ZIMAGE_KEYS.items() if k.endswith(".weight") and len(s) == 2
           and not any(p in k for p in skip)}
    ours = quantized(get_policy("zimage"), ZIMAGE_KEYS)
    assert ours == ctq
    assert len(ours) == 5 * (2 + 2 + 2)  # qkv, out, w1, w2, w3 in 2 layers + 2 noise + 2 context refiners
    for kept in ("x_embedder.weight", "final_layer.linear.weight", "cap_embedder.1.weight",
                 "layers.0.adaLN_modulation.0.weight", "t_embedder.mlp.0.weight"):
        d = get_policy("zimage").explain(kept, ZIMAGE_KEYS[kept], torch.bfloat16)
        assert d.quant is None and d.candidate and "Z-Image" in d.reason


def test_qwen3_keeps_embeddings_head_and_norms():
    p = get_policy("qwen3")
    q = quantized(p, QWEN3_KEYS)
    assert "model.embed_tokens.weight" not in q and "lm_head.weight" not in q
    assert not any("norm" in k for k in q)
    projections = {k for k in QWEN3_KEYS if k.endswith(("_proj.weight",))}
    assert q == projections and len(q) == 7 * synthetic.QWEN3_TINY.n_layers
    assert "embedding" in p.explain("model.embed_tokens.weight", (1024, 256), "BF16").reason


def test_generic():
    p = get_policy("generic", group_size=64)
    assert p.decide("blocks.0.mlp.fc1.weight", (512, 256), torch.float16) is not None
    assert p.decide("embeddings.word_embeddings.weight", (1000, 256), torch.float16) is None
    assert p.decide("encoder.shared.weight", (1000, 256), torch.float16) is None
    assert p.decide("blocks.0.norm1.weight", (256, 256), torch.float16) is None
    assert p.decide("blocks.0.mlp.fc1.bias", (512,), torch.float16) is None
    assert p.decide("conv.weight", (8, 4, 3, 3), torch.float16) is None
    assert p.decide("blocks.0.int.weight", (8, 64), torch.int8) is None
    d = p.explain("blocks.0.odd.weight", (64, 100), torch.float16)       # generic keeps what cannot rotate
    assert d.quant is None and d.candidate and "not divisible" in d.reason


def test_unrotated_layers_in_zimage_and_qwen3():
    """ctq quantizes a layer the group size does not divide without rotation: so do these presets."""
    for name in ("zimage", "qwen3"):
        d = get_policy(name).explain("layers.0.extra.weight", (32, 96), torch.bfloat16)
        assert d.quant is not None and d.quant.group_size is None and d.action == "unrotated"
        assert '"convrot"' not in bytes(d.quant.to_tensor().tolist()).decode()


def test_include_exclude():
    p = get_policy("zimage", include=[r"x_embedder"], exclude=[r"layers\.1\."])
    assert p.decide("x_embedder.weight", (256, 64), torch.bfloat16) is not None
    assert p.decide("layers.1.attention.qkv.weight", (768, 256), torch.bfloat16) is None
    assert "--exclude" in p.explain("layers.1.attention.qkv.weight", (768, 256), torch.bfloat16).reason
    both = get_policy("zimage", include=["layers"], exclude=["layers"])     # exclude wins
    assert both.decide("layers.0.attention.qkv.weight", (768, 256), torch.bfloat16) is None
    with pytest.raises(Int8ConvRotError, match="invalid --include regex"):
        get_policy("zimage", include=["("])


def test_options():
    assert get_policy("zimage", scaling="tensor").decide("layers.0.attention.qkv.weight", (768, 256),
                                                         torch.bfloat16).per_row is False
    for dtype, orig in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                        (torch.float32, torch.bfloat16), (torch.float8_e4m3fn, torch.bfloat16), ("F8_E5M2", torch.bfloat16)):
        assert get_policy("zimage").decide("layers.0.attention.qkv.weight", (768, 256), dtype).orig_dtype == orig
    with pytest.raises(Int8ConvRotError, match="power of 2 but not of 4"):
        get_policy("zimage", group_size=32)
    with pytest.raises(Int8ConvRotError, match="powers of 4"):
        get_policy("zimage", group_size=100)
    with pytest.raises(Int8ConvRotError, match="unknown scaling"):
        get_policy("zimage", scaling="block")
    with pytest.raises(Int8ConvRotError, match="unknown preset 'flux'"):
        get_policy("flux")


def test_detect_preset():
    assert detect_preset(ZIMAGE_KEYS)[0] == "zimage"
    assert detect_preset(QWEN3_KEYS)[0] == "qwen3"
    assert detect_preset(["blocks.0.fc.weight", "head.weight"])[0] == "generic"
    assert "cap_embedder" in detect_preset(ZIMAGE_KEYS)[1]
