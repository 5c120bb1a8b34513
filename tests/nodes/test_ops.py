"""Our ops inside the real ComfyUI (in-process, CPU): a tiny Lumina2-family DiT with Z-Image's key
layout and a tiny Qwen3 text encoder, loaded through ComfyUI's own loading path.

Thresholds (float32 compute on CPU):
- Plumbing is checked *exactly*: an INT8 file loaded with our ops in w8a16 must give the output of
  the float model it encodes (codes·scale un-rotated, loaded with ComfyUI's stock ops) up to float32
  rounding (relative error < 1e-4; measured ~1e-6). Any mistake in scale, rotation, group size,
  bias or layer routing shows up here by orders of magnitude.
- Against the bf16 original the INT8 error itself is measured. Each quantized layer keeps ~45 dB
  SQNR on these weights (rotation spreads the outlier channels); 30 such layers over 6 blocks give
  an output relative error of ~0.021 (w8a16) / ~0.031 (w8a8, activations also 8-bit) and cosine
  ≥ 0.9995. The limits (0.05 / 0.07 and cosine 0.998 / 0.997) leave ~2.3× margin for other seeds
  and BLAS orders, and stay far below a real defect: the same codes read with a wrong group size
  give a relative error > 0.5 (checked below as a negative control).
"""
from __future__ import annotations

import json

import pytest
import torch

import comfy_env
from comfy_env import cosine, rel_err  # noqa: F401

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfyui_inference_mode")]


TOKENS = 8


@pytest.fixture(scope="module")
def zfiles(comfy, tmp_path_factory):
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY, iter_zimage
    d = tmp_path_factory.mktemp("zimage")
    sd = dict(iter_zimage(ZIMAGE_TINY))
    q, meta = comfy_env.int8_state_dict(sd, "zimage", 64)
    return {
        "bf16": comfy_env.save_state_dict(d / "bf16.safetensors", sd),
        "int8": comfy_env.save_state_dict(d / "int8.safetensors", q, meta),
        "deq": comfy_env.save_state_dict(d / "deq.safetensors", comfy_env.dequantized_state_dict(q)),
        "int8_sd": q, "dir": d,
    }


@pytest.fixture(scope="module")
def ctq_file(zfiles):
    return comfy_env.run_ctq(zfiles["bf16"], zfiles["dir"] / "ctq.safetensors", 64)


@pytest.fixture(scope="module")
def zinputs():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(1, 16, 32, 32, generator=gen), torch.tensor([0.6]),
            torch.randn(1, TOKENS, 256, generator=gen))


def forward(patcher, inputs, backend=None):
    import comfy.model_management as mm
    from comfyui_int8_convrot.kernels import use_backend
    mm.load_models_gpu([patcher])
    x, t, ctx = inputs
    with torch.no_grad():
        if backend is None:
            return patcher.model.diffusion_model(x, t, ctx, TOKENS)
        with use_backend(backend):
            return patcher.model.diffusion_model(x, t, ctx, TOKENS)


def stock(path):
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(path))


def w8a8_backend():
    """The CPU int8 GEMM if it works here, else the exact reference GEMM (same math)."""
    try:
        from comfyui_int8_convrot.kernels.cpu_int8_gemm import fast_backend_available
        return None if fast_backend_available() else "reference"
    except ImportError:
        return "reference"


def test_detected_like_the_bf16_original(comfy, zfiles):
    """Z-Image at full width (and the tiny Lumina2) get the same model config as their bf16 original."""
    import comfy.model_detection as md
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_STOCK
    from comfyui_int8_convrot.engine.format import LayerQuant
    # Shapes are all detection reads: lazily allocated tensors, no weights generated.
    s = ZIMAGE_STOCK
    bf16 = {
        "x_pad_token": (1, s.dim), "cap_pad_token": (1, s.dim), "x_embedder.weight": (s.dim, 64),
        "cap_embedder.0.weight": (s.cap_feat_dim,), "cap_embedder.1.weight": (s.dim, s.cap_feat_dim),
        "t_embedder.mlp.0.weight": (1024, 256), "final_layer.linear.weight": (64, s.dim),
    }
    for blk in ("noise_refiner.0", "noise_refiner.1", "context_refiner.0", "context_refiner.1"):
        bf16[f"{blk}.attention.qkv.weight"] = (3 * s.dim, s.dim)
        bf16[f"{blk}.feed_forward.w1.weight"] = (s.ffn, s.dim)
        bf16[f"{blk}.attention.k_norm.weight"] = (s.dim // 30,)   # 0.29 detects Lumina2 by it too
    bf16 = {k: torch.empty(v, dtype=torch.bfloat16) for k, v in bf16.items()}
    int8 = dict(bf16)
    for k in [k for k in bf16 if "refiner" in k and bf16[k].dim() == 2]:
        p = k[: -len(".weight")]
        int8[k] = torch.empty(bf16[k].shape, dtype=torch.int8)
        int8[f"{p}.weight_scale"] = torch.ones(bf16[k].shape[0], 1)
        int8[f"{p}.comfy_quant"] = LayerQuant().to_tensor()
    a, b = md.model_config_from_unet(bf16, ""), md.model_config_from_unet(int8, "")
    assert type(a).__name__ == type(b).__name__ == "ZImage"
    assert a.unet_config == b.unet_config

    from comfyui_int8_convrot.nodes.loaders import load_unet
    ref, ours = stock(zfiles["bf16"]), load_unet(zfiles["int8"])
    assert type(ref.model.model_config) is type(ours.model.model_config)
    assert type(ours.model).__name__ == "Lumina2"
    assert ref.model.model_config.unet_config == ours.model.model_config.unet_config


def test_layers_hold_int8_and_size_counts_bytes(comfy, zfiles):
    from comfyui_int8_convrot.nodes.loaders import load_unet
    from comfyui_int8_convrot.nodes.ops import Int8ConvRotLinear, count_quantized
    import comfy.model_management as mm
    p = load_unet(zfiles["int8"], "w8a16")
    q, n = count_quantized(p.model)
    assert q == sum(1 for k in zfiles["int8_sd"] if k.endswith(".comfy_quant")) == 30
    qkv = p.model.diffusion_model.layers[0].attention.qkv
    assert isinstance(qkv, Int8ConvRotLinear) and qkv.weight.dtype == torch.int8 and qkv.group_size == 64
    assert qkv.weight_scale.dtype == torch.float32 and qkv.weight_scale.shape == (768, 1)
    x_emb = p.model.diffusion_model.x_embedder  # kept in high precision by the Z-Image preset
    assert not x_emb.is_quantized and x_emb.weight.dtype == torch.float32
    # ComfyUI's memory manager sees one byte per quantized weight.
    assert p.model_size() == mm.module_size(p.model)
    int8_bytes = sum(m.weight.nbytes for m in p.model.modules() if getattr(m, "is_quantized", False))
    assert int8_bytes == sum(v.numel() for k, v in zfiles["int8_sd"].items()
                             if v.dtype == torch.int8)
    # The state dict round-trips as an INT8 ConvRot layer.
    sd = p.model.diffusion_model.state_dict()
    assert sd["layers.0.attention.qkv.weight"].dtype == torch.int8
    assert json.loads(bytes(sd["layers.0.attention.qkv.comfy_quant"].tolist()))["convrot_groupsize"] == 64


def test_w8a16_is_exactly_the_encoded_model(comfy, zfiles, zinputs):
    from comfyui_int8_convrot.nodes.loaders import load_unet
    ref = forward(stock(zfiles["deq"]), zinputs)
    y = forward(load_unet(zfiles["int8"], "w8a16"), zinputs)
    assert rel_err(ref, y) < 1e-4


@pytest.mark.parametrize("mode,max_rel,min_cos", [("w8a16", 0.05, 0.998), ("w8a8", 0.07, 0.997)])
def test_int8_vs_bf16(comfy, zfiles, zinputs, mode, max_rel, min_cos):
    from comfyui_int8_convrot.nodes.loaders import load_unet
    ref = forward(stock(zfiles["bf16"]), zinputs)
    y = forward(load_unet(zfiles["int8"], mode), zinputs, w8a8_backend() if mode == "w8a8" else None)
    assert torch.isfinite(y).all()
    assert rel_err(ref, y) < max_rel and cosine(ref, y) > min_cos, (rel_err(ref, y), cosine(ref, y))


def test_wrong_group_size_is_detected_by_the_thresholds(comfy, zfiles, zinputs, tmp_path):
    """Negative control: the same codes declared with g=16 instead of 64 are far outside the limits."""
    from comfyui_int8_convrot.engine.format import LayerQuant
    from comfyui_int8_convrot.nodes.loaders import load_unet
    sd = {k: (LayerQuant(group_size=16).to_tensor() if k.endswith(".comfy_quant") else v)
          for k, v in zfiles["int8_sd"].items()}
    bad = comfy_env.save_state_dict(tmp_path / "bad.safetensors", sd)
    ref = forward(stock(zfiles["bf16"]), zinputs)
    assert rel_err(ref, forward(load_unet(bad, "w8a16"), zinputs)) > 0.5


def test_ctq_file_loads_bit_identical_to_ours(comfy, zfiles, ctq_file, zinputs):
    """convert-to-quant's file: the same layers, codes and scales as ours, hence the same output."""
    from safetensors.torch import load_file
    from comfyui_int8_convrot.nodes.loaders import load_unet
    theirs = load_file(str(ctq_file))
    ours = zfiles["int8_sd"]
    q_theirs = sorted(k for k in theirs if k.endswith(".comfy_quant"))
    assert q_theirs == sorted(k for k in ours if k.endswith(".comfy_quant"))
    for k in q_theirs:
        p = k[: -len(".comfy_quant")]
        assert torch.equal(theirs[f"{p}.weight"], ours[f"{p}.weight"]), p
        assert torch.equal(theirs[f"{p}.weight_scale"], ours[f"{p}.weight_scale"]), p
    a = forward(load_unet(ctq_file, "w8a16"), zinputs)
    b = forward(load_unet(zfiles["int8"], "w8a16"), zinputs)
    assert torch.equal(a, b)


def test_quantize_on_load_equals_the_converted_file(comfy, zfiles, zinputs):
    from comfyui_int8_convrot.nodes.loaders import load_unet
    p = load_unet(zfiles["bf16"], "w8a16", quantize="auto", group_size=64)
    sd = p.model.diffusion_model.state_dict()
    for k, v in zfiles["int8_sd"].items():
        if v.dtype == torch.int8:
            assert torch.equal(sd[k], v), k
    assert torch.equal(forward(p, zinputs), forward(load_unet(zfiles["int8"], "w8a16"), zinputs))


def test_clear_errors(comfy, zfiles, tmp_path):
    from comfyui_int8_convrot.engine.errors import FileFormatError, Int8ConvRotError
    from comfyui_int8_convrot.engine.format import LayerQuant
    from comfyui_int8_convrot.nodes.loaders import load_unet
    with pytest.raises(FileFormatError, match="not an INT8 ConvRot file.*quantize_on_load"):
        load_unet(zfiles["bf16"])
    data = zfiles["int8"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="truncated"):
        load_unet(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"<html>not a model</html>" * 10)
    with pytest.raises(FileFormatError, match="not a safetensors file"):
        load_unet(tmp_path / "junk.safetensors")
    # A group size the kernels reject: 32 is a power of 2 but not of 4.
    sd = dict(zfiles["int8_sd"])
    k = "layers.0.attention.qkv.comfy_quant"
    cfg = json.loads(bytes(sd[k].tolist()))
    cfg["convrot_groupsize"] = 32
    sd[k] = torch.tensor(list(json.dumps(cfg).encode()), dtype=torch.uint8)
    comfy_env.save_state_dict(tmp_path / "g32.safetensors", sd)
    with pytest.raises(FileFormatError, match="layers.0.attention.qkv.*group size 32 is not a power of 4"):
        load_unet(tmp_path / "g32.safetensors")
    # 256 does not divide FFN 704: w2 cannot be rotated with it.
    sd = dict(zfiles["int8_sd"])
    sd["layers.0.feed_forward.w2.comfy_quant"] = LayerQuant(group_size=256).to_tensor()
    comfy_env.save_state_dict(tmp_path / "g256.safetensors", sd)
    with pytest.raises(FileFormatError, match="does not divide the input dimension 704"):
        load_unet(tmp_path / "g256.safetensors")
    with pytest.raises(ValueError, match="compute mode"):
        load_unet(zfiles["int8"], "fast")
    with pytest.raises(Int8ConvRotError, match="group size"):
        load_unet(zfiles["bf16"], quantize="auto", group_size=32)


# -- the Qwen3 text encoder ----------------------------------------------------------------------

QWEN3_TINY_CONFIG = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 3,
                     "num_attention_heads": 2, "num_key_value_heads": 1}  # head_dim stays 128 (fixed in 0.8.0)


@pytest.fixture(scope="module")
def tefiles(comfy, tmp_path_factory):
    from comfyui_int8_convrot.engine.synthetic import Qwen3Shape, iter_qwen3
    d = tmp_path_factory.mktemp("qwen3")
    shape = Qwen3Shape(hidden=256, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=128, ffn=768)
    sd = dict(iter_qwen3(shape))
    q, meta = comfy_env.int8_state_dict(sd, "qwen3", 64)
    return {"bf16": comfy_env.save_state_dict(d / "te_bf16.safetensors", sd),
            "int8": comfy_env.save_state_dict(d / "te_int8.safetensors", q, meta),
            "deq": comfy_env.save_state_dict(d / "te_deq.safetensors", comfy_env.dequantized_state_dict(q))}


def test_full_width_qwen3_detected_like_the_bf16_original(comfy):
    """Qwen3-4B (width 2560) in INT8 ConvRot is recognised by ComfyUI as the Z-Image text encoder,
    as its bf16 original is (detection reads the kept norms and the key names)."""
    import comfy.sd
    from comfyui_int8_convrot.engine.format import LayerQuant
    p = "model.layers.0"
    shapes = {"model.embed_tokens.weight": (151936, 2560), "model.norm.weight": (2560,),
              f"{p}.input_layernorm.weight": (2560,), f"{p}.post_attention_layernorm.weight": (2560,),
              f"{p}.self_attn.q_norm.weight": (128,), f"{p}.self_attn.k_norm.weight": (128,),
              f"{p}.self_attn.q_proj.weight": (4096, 2560), f"{p}.self_attn.k_proj.weight": (1024, 2560),
              f"{p}.mlp.down_proj.weight": (2560, 9728)}
    bf16 = {k: torch.empty(v, dtype=torch.bfloat16) for k, v in shapes.items()}
    int8 = dict(bf16)
    for k in [k for k in bf16 if k.endswith("_proj.weight")]:
        int8[k] = torch.empty(bf16[k].shape, dtype=torch.int8)
        int8[k.replace(".weight", ".weight_scale")] = torch.ones(bf16[k].shape[0], 1)
        int8[k.replace(".weight", ".comfy_quant")] = LayerQuant().to_tensor()
    assert comfy.sd.detect_te_model(bf16) == comfy.sd.detect_te_model(int8) == comfy.sd.TEModel.QWEN3_4B
    assert comfy.sd.llama_detect([int8])["dtype_llama"] == torch.bfloat16


@pytest.fixture
def tiny_qwen3_detected(monkeypatch):
    """0.8.0 detects Qwen3-4B by its width (2560); the reduced-width test file is declared as one and its
    config supplied through `qwen3_4b_model_config`, ComfyUI's own override. float32 weights for every
    model compared (ComfyUI's CPU default, fp16, would round the float references' weights)."""
    import comfy.sd
    monkeypatch.setattr(comfy.sd, "detect_te_model", lambda sd: comfy.sd.TEModel.QWEN3_4B)
    return {"qwen3_4b_model_config": QWEN3_TINY_CONFIG, "dtype": torch.float32}


def encode(clip, text="a photo of a cat sitting on a mat"):
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(text))


def test_qwen3_text_encoder(comfy, tefiles, tiny_qwen3_detected):
    import comfy.sd
    from comfyui_int8_convrot.nodes.loaders import load_text_encoder
    from comfyui_int8_convrot.nodes.ops import Int8ModelPatcher, count_quantized
    opts = tiny_qwen3_detected
    ref = comfy.sd.load_clip([str(tefiles["bf16"])], clip_type=comfy.sd.CLIPType.LUMINA2, model_options=dict(opts))
    deq = comfy.sd.load_clip([str(tefiles["deq"])], clip_type=comfy.sd.CLIPType.LUMINA2, model_options=dict(opts))
    clip = load_text_encoder(tefiles["int8"], "lumina2", "w8a16", model_options=dict(opts))
    assert isinstance(clip.patcher, Int8ModelPatcher)
    assert type(clip.cond_stage_model).__name__.startswith("ZImageTEModel")
    assert count_quantized(clip.cond_stage_model) == (21, 22)   # 3 layers × (q, k, v, o, gate, up, down); the table kept
    y = encode(clip)
    assert rel_err(encode(deq), y) < 1e-4                # plumbing: exactly the encoded model
    r = encode(ref)
    assert rel_err(r, y) < 0.06 and cosine(r, y) > 0.998  # measured 0.027 / 0.9997
    c8 = load_text_encoder(tefiles["int8"], "lumina2", "w8a8", model_options=dict(opts))
    from comfyui_int8_convrot.kernels import use_backend
    backend = w8a8_backend()
    if backend:
        with use_backend(backend):
            y8 = encode(c8)
    else:
        y8 = encode(c8)
    assert rel_err(r, y8) < 0.08 and cosine(r, y8) > 0.997


def test_qwen3_lora_through_stock_lora_loader(comfy, tefiles, tiny_qwen3_detected, tmp_path):
    """Stock LoraLoader (CLIP strength only) on our text encoder: exact vs the float model + LoRA,
    and the unpatched encoder gives its original output again."""
    import comfy.sd
    import folder_paths
    import nodes
    from comfyui_int8_convrot.nodes.loaders import load_text_encoder
    from comfyui_int8_convrot.nodes.ops import Int8ModelPatcher
    gen = torch.Generator().manual_seed(4)
    pre = "text_encoders.qwen3_4b.transformer.model.layers"
    lora = {}
    for name, (o, i) in {"0.self_attn.q_proj": (256, 256), "1.mlp.down_proj": (256, 768),
                         "2.self_attn.v_proj": (128, 256)}.items():
        lora[f"{pre}.{name}.lora_up.weight"] = 0.1 * torch.randn(o, 4, generator=gen)
        lora[f"{pre}.{name}.lora_down.weight"] = 0.1 * torch.randn(4, i, generator=gen)
    (tmp_path / "loras").mkdir()
    comfy_env.save_state_dict(tmp_path / "loras" / "te_lora.safetensors", lora)
    folder_paths.add_model_folder_path("loras", str(tmp_path / "loras"))
    opts = tiny_qwen3_detected
    deq = comfy.sd.load_clip([str(tefiles["deq"])], clip_type=comfy.sd.CLIPType.LUMINA2, model_options=dict(opts))
    clip = load_text_encoder(tefiles["int8"], "lumina2", "w8a16", model_options=dict(opts))
    y0 = encode(clip)
    ref = encode(nodes.LoraLoader().load_lora(None, deq, "te_lora.safetensors", 0.0, 1.0)[1])
    patched = nodes.LoraLoader().load_lora(None, clip, "te_lora.safetensors", 0.0, 1.0)[1]
    assert isinstance(patched.patcher, Int8ModelPatcher)
    y1 = encode(patched)
    assert rel_err(y0, y1) > 0.01 and rel_err(ref, y1) < 1e-5, (rel_err(y0, y1), rel_err(ref, y1))
    assert torch.equal(encode(clip), y0)
