"""Qwen3-4B's real file structure (full vocabulary 151936 × 2560 and width, 3 layers through ComfyUI's
`qwen3_4b_model_config`), converted by the real convert-to-quant with the seed's text-encoder recipe
(every 2-D weight quantized, `embed_tokens` included) and by our converter, then encoded through our
CLIP loader — and, where ComfyUI reads INT8 ConvRot itself (0.27+), through its stock loader too.
Conditioning cosine to the bf16 encoder ≥ 0.99 on every path (a misread embedding gives ≈ 0.01)."""
from __future__ import annotations

import pytest

import comfy_env
from comfy_env import cosine

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, pytest.mark.usefixtures("comfyui_inference_mode")]

OPTS = {"qwen3_4b_model_config": {"num_hidden_layers": 3}}
PROMPT = "a photo of a red fox sitting in the snow, golden hour, 35mm"


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    from comfyui_int8_convrot.engine.convert import convert_file
    from comfyui_int8_convrot.engine.policy import EMBEDDINGS_INCLUDE
    from comfyui_int8_convrot.engine.synthetic import QWEN3_4B, iter_qwen3, save
    from dataclasses import replace
    d = tmp_path_factory.mktemp("qwen3_4b")
    src = d / "qwen_3_4b_bf16.safetensors"
    save(src, iter_qwen3(replace(QWEN3_4B, n_layers=3), seed=3))
    out = {"bf16": src,
           "ctq": comfy_env.run_ctq(src, d / "ctq_te.safetensors", 64, preset_flag=None, extra=comfy_env.CTQ_TE_FLAGS),
           "ours": d / "ours_qwen3.safetensors", "ours_emb": d / "ours_qwen3_emb.safetensors"}
    convert_file(src, out["ours"], preset="qwen3")
    convert_file(src, out["ours_emb"], preset="qwen3", include=(EMBEDDINGS_INCLUDE,))
    return out


def encode(clip):
    return clip.encode_from_tokens(clip.tokenize(PROMPT))


@pytest.fixture(scope="module")
def reference(files):
    import comfy.sd
    clip = comfy.sd.load_clip([str(files["bf16"])], clip_type=comfy.sd.CLIPType.LUMINA2, model_options=dict(OPTS))
    return encode(clip)


def test_ctq_file_quantizes_the_embedding(files):
    from safetensors import safe_open
    with safe_open(str(files["ctq"]), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "I8"
        assert list(f.get_slice("model.embed_tokens.weight").get_shape()) == [151936, 2560]


@pytest.mark.parametrize("which", ["ctq", "ours", "ours_emb"])
def test_our_loader(files, reference, which):
    from comfyui_int8_convrot.nodes.loaders import load_text_encoder
    clip = load_text_encoder(files[which], "lumina2", "auto", model_options=dict(OPTS), layers="pack")
    c = cosine(reference, encode(clip))
    print(f"\nQwen3-4B width, 3 layers: our loader on {which}: conditioning cosine {c:.5f}")
    assert c >= 0.99


@pytest.mark.parametrize("which", ["ctq", "ours"])
def test_stock_loader_where_native(files, reference, which):
    import comfy.sd
    if not comfy_env.has_native_int8():
        pytest.skip("this ComfyUI has no native INT8 ConvRot (0.27+)")
    clip = comfy.sd.load_clip([str(files[which])], clip_type=comfy.sd.CLIPType.LUMINA2, model_options=dict(OPTS))
    c = cosine(reference, encode(clip))
    print(f"\nQwen3-4B width, 3 layers: stock CLIPLoader on {which}: conditioning cosine {c:.5f}")
    assert c >= 0.99
