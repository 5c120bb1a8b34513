"""INT8 ConvRot embedding tables in a real ComfyUI (in-process, CPU): the seed's text-encoder recipe
quantizes Qwen3's `embed_tokens` too, and every way ComfyUI touches an embedding must read it right.

Exactness is checked against the float model the file encodes (codes·scale un-rotated, loaded with
ComfyUI's stock ops): a lookup dequantizes exactly the rows it reads, so the encoder's output is that
model's up to float32 rounding of the rest (< 1e-5). A misread table (codes as raw integers, a wrong
rotation) gives cosine ≈ 0 to bf16, so the bf16 limits below stay far from any defect.
"""
from __future__ import annotations

import pytest
import torch

import comfy_env
from comfy_env import cosine, rel_err  # noqa: F401

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfyui_inference_mode")]

VOCAB = 151936    # Qwen3-4B's: the tokenizer reads the whole vocabulary
SHAPE = dict(hidden=256, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=128, ffn=768)
CONFIG = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 3,
          "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.fixture(scope="module")
def te(comfy, tmp_path_factory):
    """A tiny Qwen3 encoder with its embedding quantized (ctq's layout, written by our converter)."""
    from comfyui_int8_convrot.engine.synthetic import Qwen3Shape, iter_qwen3
    d = tmp_path_factory.mktemp("te_emb")
    sd = dict(iter_qwen3(Qwen3Shape(**SHAPE)))
    q, meta = comfy_env.int8_state_dict(sd, "qwen3", 64, include=("embed_tokens",))
    assert q["model.embed_tokens.weight"].dtype == torch.int8
    return {"bf16": comfy_env.save_state_dict(d / "bf16.safetensors", sd),
            "int8": comfy_env.save_state_dict(d / "int8.safetensors", q, meta),
            "deq": comfy_env.save_state_dict(d / "deq.safetensors", comfy_env.dequantized_state_dict(q)),
            "sd": q, "dir": d}


@pytest.fixture
def opts(monkeypatch):
    import comfy.sd
    monkeypatch.setattr(comfy.sd, "detect_te_model", lambda sd: comfy.sd.TEModel.QWEN3_4B)
    return {"qwen3_4b_model_config": CONFIG, "dtype": torch.float32}


def stock(path, opts):
    import comfy.sd
    return comfy.sd.load_clip([str(path)], clip_type=comfy.sd.CLIPType.LUMINA2, model_options=dict(opts))


def ours(path, opts, mode="w8a16"):
    from comfyui_int8_convrot.nodes.loaders import load_text_encoder
    return load_text_encoder(path, "lumina2", mode, model_options=dict(opts))


def encode(clip, text="a photo of a cat sitting on a mat"):
    return clip.encode_from_tokens(clip.tokenize(text))


def embed_module(clip):
    return clip.cond_stage_model.qwen3_4b.transformer.get_input_embeddings()


def test_quantized_table_loads_and_encodes_exactly(te, opts):
    from comfyui_int8_convrot.nodes.ops import Int8ConvRotEmbedding, count_quantized
    clip = ours(te["int8"], opts)
    emb = embed_module(clip)
    assert isinstance(emb, Int8ConvRotEmbedding) and emb.is_quantized and emb.weight.dtype == torch.int8
    assert emb.weight.nbytes == VOCAB * 256                      # one byte per value
    assert count_quantized(clip.cond_stage_model) == (22, 22)    # 21 Linears + the table
    y = encode(clip)
    assert rel_err(encode(stock(te["deq"], opts)), y) < 1e-5
    r = encode(stock(te["bf16"], opts))
    assert cosine(r, y) > 0.998, cosine(r, y)


def test_lookup_is_the_dequantized_table(te, opts):
    """Every forward argument ComfyUI passes (out_dtype, any index shape) on the module itself."""
    from comfyui_int8_convrot.kernels import dequantize_weight
    emb = embed_module(ours(te["int8"], opts))
    table = dequantize_weight(emb.weight, emb.weight_scale, 64)
    ids = torch.tensor([[0, 5, VOCAB - 1, 5], [7, 7, 8, 9]])
    assert torch.equal(emb(ids, out_dtype=torch.float32), table[ids])
    assert emb(ids, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(emb(ids[0]), table[ids[0]].to(emb.dense_dtype))
    # lowvram-style weight function on the table: the dense path, with the function applied.
    emb.weight_function.append(lambda w: w * 2)
    try:
        assert torch.equal(emb(ids, out_dtype=torch.float32), table[ids] * 2)
    finally:
        emb.weight_function.clear()


def test_textual_inversion_rows_join_the_lookup(te, opts):
    """sd1_clip's process_tokens concatenates embedding vectors (textual inversion) with looked-up rows."""
    clip, ref = ours(te["int8"], opts), stock(te["deq"], opts)
    vec = 0.02 * torch.randn(2, 256, generator=torch.Generator().manual_seed(3))

    def with_vector(c):
        tokens = c.tokenize("a photo of a cat")
        key = next(iter(tokens))
        tokens[key][0].insert(3, (vec, 1.0))
        return c.encode_from_tokens(tokens)

    y = with_vector(clip)
    assert rel_err(with_vector(ref), y) < 1e-5
    assert y.shape[1] == encode(clip, "a photo of a cat").shape[1] + 2     # the two rows are really used


def test_lora_on_the_table_key(te, opts):
    """A patch on embed_tokens.weight takes the dense path (dequantize in float32, patch, store in the
    model's dtype: bf16 here, as ComfyUI stores a patched bf16 weight), then unpatch gives the codes
    back bit for bit."""
    import comfy.lora
    import comfy.model_management
    from comfyui_int8_convrot.kernels import dequantize_weight
    clip, ref = ours(te["int8"], opts), stock(te["deq"], opts)
    emb = embed_module(clip)
    codes, table = emb.weight, dequantize_weight(emb.weight, emb.weight_scale, 64)
    y0 = encode(clip)
    gen = torch.Generator().manual_seed(5)
    up, down = 0.5 * torch.randn(VOCAB, 4, generator=gen), 0.5 * torch.randn(4, 256, generator=gen)
    name = "qwen3_4b.transformer.model.embed_tokens"
    lora = {f"text_encoders.{name}.lora_up.weight": up, f"text_encoders.{name}.lora_down.weight": down}

    def patched(c):
        c = c.clone()
        loaded = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_clip(c.cond_stage_model, {}))
        assert list(loaded) == [f"{name}.weight"], "the LoRA did not map onto the embedding key"
        c.add_patches(loaded, 1.0)
        return c

    pc = patched(clip)
    y1 = encode(pc)
    dense = embed_module(pc).weight
    assert dense.dtype == emb.dense_dtype == torch.bfloat16
    assert rel_err((table + up @ down).to(torch.bfloat16), dense) < 1e-3
    # The float32 reference keeps its patched table in float32: only bf16 storage separates them.
    assert rel_err(y0, y1) > 0.5 and rel_err(encode(patched(ref)), y1) < 0.02
    comfy.model_management.unload_all_models()
    pc.patcher.unpatch_model()
    assert embed_module(clip).weight.dtype == torch.int8 and torch.equal(embed_module(clip).weight, codes)
    assert torch.equal(encode(clip), y0)


def test_offloaded_table_gathers_on_its_device(te, opts):
    """An offloaded table stays where it is: only the looked-up rows are read and moved."""
    emb = embed_module(ours(te["int8"], opts))
    reads = []
    codes = emb.weight
    orig = torch.Tensor.index_select

    def spy(t, dim, index):
        if t is codes:
            reads.append(index.numel())
        return orig(t, dim, index)

    ids = torch.tensor([[1, 2, 3]])
    import unittest.mock
    with unittest.mock.patch.object(torch.Tensor, "index_select", spy):
        emb(ids, out_dtype=torch.float32)
    assert reads == [3]
