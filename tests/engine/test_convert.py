"""The streaming converter: layout of the output, codes, inputs it accepts, memory-free streaming paths.

Exact checks (codes, scales, bytes of kept tensors, JSON) wherever the result is defined bit for bit;
the relative weight error is checked against an independent dequantization.
"""
import json

import pytest
import torch

from comfyui_int8_convrot.engine import quantize_layer as ql
from comfyui_int8_convrot.engine.convert import convert_file, quantize_tensors, save_state_dict
from comfyui_int8_convrot.engine.format import METADATA_KEY, LayerQuant
from comfyui_int8_convrot.engine.policy import get_policy
from comfyui_int8_convrot.kernels import dequantize_weight, quantize_weight
from convert_helpers import layer_json, load, qwen3_sd, write, zimage_sd

ZIMAGE_LAYERS = 30


@pytest.fixture
def zfile(tmp_path):
    return write(tmp_path / "z.safetensors", zimage_sd(), metadata={"modelspec.title": "tiny", "foo": "bar"})


def test_zimage_layout_codes_and_metadata(zfile, tmp_path):
    src, _ = load(zfile)
    summary = convert_file(zfile, tmp_path / "out.safetensors")
    out, meta = load(tmp_path / "out.safetensors")
    assert summary.preset == "zimage" and "detected" in summary.preset_reason
    assert summary.count("quantized") == ZIMAGE_LAYERS and summary.count("kept") == 10
    assert summary.tensors_out == len(out) == len(src) + 2 * ZIMAGE_LAYERS
    layers = json.loads(meta[METADATA_KEY])
    assert layers["format_version"] == "1.0" and len(layers["layers"]) == ZIMAGE_LAYERS
    assert meta["foo"] == "bar" and meta["modelspec.title"] == "tiny"
    for name, w in src.items():
        base = name[: -len(".weight")]
        if base in layers["layers"]:
            codes, scale = quantize_weight(w, 64)
            assert torch.equal(out[name], codes) and torch.equal(out[base + ".weight_scale"], scale)
            assert layer_json(out[base + ".comfy_quant"]) == {
                "format": "int8_tensorwise", "orig_dtype": "torch.bfloat16", "convrot": True,
                "convrot_groupsize": 64, "per_row": True}
            assert bytes(out[base + ".comfy_quant"].tolist()) == bytes(LayerQuant().to_tensor().tolist())
            assert layers["layers"][base] == {"format": "int8_tensorwise", "orig_dtype": "torch.bfloat16",
                                              "convrot": True, "convrot_groupsize": 64}
        else:   # kept with its name, dtype and bytes
            assert out[name].dtype == w.dtype and torch.equal(out[name], w)


def test_relative_error_is_measured(zfile, tmp_path):
    summary = convert_file(zfile, tmp_path / "out.safetensors")
    src, _ = load(zfile)
    out, _ = load(tmp_path / "out.safetensors")
    for r in summary.layers:
        if r.action != "quantized":
            continue
        base = r.name[: -len(".weight")]
        w = src[r.name].float()
        deq = dequantize_weight(out[r.name], out[base + ".weight_scale"], 64)
        true = ((deq - w).norm() / w.norm()).item()
        assert r.rel_error == pytest.approx(true, rel=1e-3)
    assert 0 < summary.mean_error < 0.02 and summary.worst_error[0] < 0.03
    assert "relative weight error: mean" in summary.to_text()


def test_comfy_kitchen_reads_our_file(zfile, tmp_path):
    """comfy-kitchen's INT8 layout dequantizes our tensors to exactly our dequantization."""
    from comfy_kitchen.tensor.int8 import TensorWiseINT8Layout
    convert_file(zfile, tmp_path / "out.safetensors")
    out, _ = load(tmp_path / "out.safetensors")
    src, _ = load(zfile)
    name = "layers.1.feed_forward.w2.weight"
    cfg = layer_json(out["layers.1.feed_forward.w2.comfy_quant"])
    scale = out["layers.1.feed_forward.w2.weight_scale"]
    params = TensorWiseINT8Layout.Params(scale=scale, orig_dtype=torch.bfloat16, orig_shape=tuple(out[name].shape),
                                         convrot=cfg["convrot"], convrot_groupsize=cfg["convrot_groupsize"])
    theirs = TensorWiseINT8Layout.dequantize(out[name], params)
    ours = dequantize_weight(out[name], scale, 64, torch.bfloat16)
    assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, ours)
    assert ((theirs.float() - src[name].float()).norm() / src[name].float().norm()) < 0.02


def test_qwen3(tmp_path):
    src = write(tmp_path / "q.safetensors", qwen3_sd())
    s = convert_file(src, tmp_path / "q8.safetensors")
    out, _ = load(tmp_path / "q8.safetensors")
    assert s.preset == "qwen3" and s.count("quantized") == 14 and s.count("kept") == 2
    assert out["model.embed_tokens.weight"].dtype == torch.bfloat16 and out["lm_head.weight"].dtype == torch.bfloat16
    assert out["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2])
def test_input_dtypes(tmp_path, dtype):
    sd = zimage_sd(dtype=torch.float32)
    sd = {k: v.to(dtype) if v.dim() == 2 or dtype in (torch.float16, torch.float32) else v for k, v in sd.items()}
    path = write(tmp_path / "in.safetensors", sd)
    convert_file(path, tmp_path / "out.safetensors")
    out, _ = load(tmp_path / "out.safetensors")
    name = "layers.0.attention.qkv.weight"
    codes, scale = quantize_weight(sd[name].float(), 64)
    assert torch.equal(out[name], codes) and torch.equal(out["layers.0.attention.qkv.weight_scale"], scale)
    orig = "torch.float16" if dtype == torch.float16 else "torch.bfloat16"
    assert layer_json(out["layers.0.attention.qkv.comfy_quant"])["orig_dtype"] == orig
    assert out["x_embedder.weight"].dtype == dtype       # kept layers keep their dtype


def test_scaled_fp8(tmp_path):
    """ComfyUI scaled fp8: the scale is applied first, scales and the marker leave the output, a kept
    layer is written dequantized in bf16."""
    sd = zimage_sd(dtype=torch.float32)
    fp8 = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2:
            s = v.abs().max() / 448.0
            fp8[k] = (v / s).to(torch.float8_e4m3fn)
            fp8[k[: -len(".weight")] + ".scale_weight"] = s.reshape(1)
        else:
            fp8[k] = v.to(torch.bfloat16)
    fp8["scaled_fp8"] = torch.empty(2, dtype=torch.float8_e4m3fn)
    path = write(tmp_path / "fp8.safetensors", fp8)
    s = convert_file(path, tmp_path / "out.safetensors")
    out, _ = load(tmp_path / "out.safetensors")
    assert s.input_kind == "scaled fp8" and any("dropped" in w for w in s.warnings)
    assert not any(k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8" for k in out)
    name = "layers.0.feed_forward.w1.weight"
    w = fp8[name].float() * fp8["layers.0.feed_forward.w1.scale_weight"].float()
    codes, scale = quantize_weight(w, 64)
    assert torch.equal(out[name], codes) and torch.equal(out["layers.0.feed_forward.w1.weight_scale"], scale)
    kept = fp8["x_embedder.weight"].float() * fp8["x_embedder.scale_weight"].float()
    assert out["x_embedder.weight"].dtype == torch.bfloat16 and torch.equal(out["x_embedder.weight"], kept.bfloat16())


def test_comfy_quant_fp8_rowwise(tmp_path):
    w = zimage_sd(dtype=torch.float32)["layers.0.attention.out.weight"]
    s = w.abs().amax(1, keepdim=True) / 448.0
    sd = {"layers.0.attention.out.weight": (w / s).to(torch.float8_e4m3fn), "layers.0.attention.out.weight_scale": s,
          "layers.0.attention.out.comfy_quant": torch.tensor(list(b'{"format": "float8_e4m3fn_rowwise"}'),
                                                             dtype=torch.uint8),
          "layers.0.attention_norm1.weight": torch.ones(256)}
    path = write(tmp_path / "cq.safetensors", sd, {METADATA_KEY: json.dumps(
        {"format_version": "1.0", "layers": {"layers.0.attention.out": {"format": "float8_e4m3fn_rowwise"}}})})
    convert_file(path, tmp_path / "out.safetensors", preset="zimage")
    out, meta = load(tmp_path / "out.safetensors")
    codes, scale = quantize_weight(sd["layers.0.attention.out.weight"].float() * s, 64)
    assert torch.equal(out["layers.0.attention.out.weight"], codes)
    assert torch.equal(out["layers.0.attention.out.weight_scale"], scale)
    assert json.loads(meta[METADATA_KEY])["layers"]["layers.0.attention.out"]["format"] == "int8_tensorwise"


def test_full_checkpoint_converts_only_the_diffusion_model(tmp_path):
    sd = {f"model.diffusion_model.{k}": v for k, v in zimage_sd().items()}
    vae = {"first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
           "first_stage_model.decoder.mid.proj.weight": torch.randn(64, 64),
           "text_encoders.qwen3_4b.transformer.model.layers.0.mlp.up_proj.weight": torch.randn(128, 64).bfloat16()}
    path = write(tmp_path / "ckpt.safetensors", sd | vae)
    s = convert_file(path, tmp_path / "out.safetensors")
    out, meta = load(tmp_path / "out.safetensors")
    assert s.preset == "zimage" and s.input_kind == "checkpoint" and s.count("quantized") == ZIMAGE_LAYERS
    for k, v in vae.items():
        assert torch.equal(out[k], v) and out[k].dtype == v.dtype
    assert out["model.diffusion_model.layers.0.attention.qkv.weight"].dtype == torch.int8
    assert "model.diffusion_model.layers.0.attention.qkv" in json.loads(meta[METADATA_KEY])["layers"]


@pytest.mark.parametrize("g", [16, 256])
def test_group_sizes_and_unrotated_layers(tmp_path, g):
    """A layer whose input the group does not divide: quantized unrotated (zimage, ctq's formula) or kept (generic)."""
    sd = zimage_sd()   # dim 256, FFN 704: w2's input (704) divides by 16 but not by 256
    path = write(tmp_path / "in.safetensors", sd)
    s = convert_file(path, tmp_path / "out.safetensors", group_size=g)
    out, _ = load(tmp_path / "out.safetensors")
    w2 = "layers.0.feed_forward.w2"
    cfg = layer_json(out[w2 + ".comfy_quant"])
    if g == 16:
        assert cfg["convrot_groupsize"] == 16 and s.count("unrotated") == 0
        assert torch.equal(out[w2 + ".weight"], quantize_weight(sd[w2 + ".weight"], 16)[0])
    else:
        assert "convrot" not in cfg and cfg["per_row"] is True and s.count("unrotated") == 6
        assert "unrotated: layers.0.feed_forward.w2.weight" in s.to_text()
        from convert_to_quant.comfy.quant_ops import TensorWiseINT8Layout
        ref_q, params = TensorWiseINT8Layout.quantize(sd[w2 + ".weight"].float(), is_weight=True)
        assert torch.equal(out[w2 + ".weight"], ref_q) and torch.equal(out[w2 + ".weight_scale"], params["scale"])
        s2 = convert_file(path, tmp_path / "generic.safetensors", preset="generic", group_size=g)
        out2, _ = load(tmp_path / "generic.safetensors")
        assert out2[w2 + ".weight"].dtype == torch.bfloat16 and s2.count("unrotated") == 0
        assert any(r.name == w2 + ".weight" and "not divisible" in r.reason for r in s2.layers)


def test_tensor_scaling(zfile, tmp_path):
    s = convert_file(zfile, tmp_path / "out.safetensors", scaling="tensor")
    out, _ = load(tmp_path / "out.safetensors")
    name = "layers.0.attention.qkv"
    assert out[name + ".weight_scale"].shape == ()
    assert layer_json(out[name + ".comfy_quant"]) == {"format": "int8_tensorwise", "orig_dtype": "torch.bfloat16",
                                                       "convrot": True, "convrot_groupsize": 64}
    codes, scale = quantize_weight(load(zfile)[0][name + ".weight"], 64, "tensor")
    assert torch.equal(out[name + ".weight"], codes) and torch.equal(out[name + ".weight_scale"], scale)
    assert any("waxy" in w for w in s.warnings)


def test_single_row_layer_gets_a_scalar_scale(tmp_path):
    """convert-to-quant stores a 1-element scale as a scalar; so do we."""
    path = write(tmp_path / "in.safetensors", {"head.proj.weight": torch.randn(1, 128).bfloat16()})
    convert_file(path, tmp_path / "out.safetensors", preset="generic")
    out, _ = load(tmp_path / "out.safetensors")
    assert out["head.proj.weight_scale"].shape == ()


def test_chunks_and_workers_do_not_change_codes(zfile, tmp_path, monkeypatch):
    convert_file(zfile, tmp_path / "a.safetensors", device="cpu")
    monkeypatch.setattr(ql, "CPU_CHUNK_ELEMENTS", 256 * 7)      # 7 rows per chunk, ragged tails
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)     # 3 workers
    convert_file(zfile, tmp_path / "b.safetensors", device="cpu")
    a, b = load(tmp_path / "a.safetensors")[0], load(tmp_path / "b.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_in_memory_paths_equal_the_file(zfile, tmp_path):
    convert_file(zfile, tmp_path / "file.safetensors")
    out, meta = load(tmp_path / "file.safetensors")
    sd = load(zfile)[0]
    streamed = dict(quantize_tensors(sd.items(), "zimage"))
    assert streamed.keys() == out.keys() and all(torch.equal(streamed[k], out[k]) for k in out)
    report = []
    list(quantize_tensors(sd.items(), get_policy("zimage"), report=report))
    assert sum(r.action == "quantized" for r in report) == ZIMAGE_LAYERS
    s = save_state_dict(sd, tmp_path / "saved.safetensors", "zimage", metadata={"foo": "bar"})
    saved, smeta = load(tmp_path / "saved.safetensors")
    assert all(torch.equal(saved[k], out[k]) for k in out) and smeta[METADATA_KEY] == meta[METADATA_KEY]
    assert s.count("quantized") == ZIMAGE_LAYERS and s.input_kind == "model in memory"


def test_progress_reports_bytes(zfile, tmp_path):
    seen = []
    convert_file(zfile, tmp_path / "out.safetensors", progress=lambda d, t, n: seen.append((d, t, n)))
    done = [d for d, _, _ in seen]
    assert done == sorted(done) and seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 0
    assert len(seen) == len(load(zfile)[0]) + 1


def test_output_header_is_what_safetensors_writes(zfile, tmp_path):
    """8-byte length, JSON padded with spaces to a multiple of 8, contiguous offsets in order."""
    import struct
    convert_file(zfile, tmp_path / "out.safetensors")
    raw = (tmp_path / "out.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8:8 + n].rstrip(b" ").endswith(b"}")
    header = json.loads(raw[8:8 + n])
    offsets = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
    assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))
    assert 8 + n + offsets[-1][1] == len(raw)


def test_inspect(zfile, tmp_path):
    from comfyui_int8_convrot.engine.inspect import format_report, inspect_file
    convert_file(zfile, tmp_path / "out.safetensors")
    info = inspect_file(tmp_path / "out.safetensors")
    assert info["format"] == "int8_convrot" and info["layers"]["int8_convrot"] == ZIMAGE_LAYERS
    assert info["group_sizes"] == {"64": ZIMAGE_LAYERS} and info["scaling"] == {"row": ZIMAGE_LAYERS}
    assert info["layers"]["high_precision_linear"] == 10 and info["preset"] == "zimage"
    assert info["quantization_metadata"] == {"format_version": "1.0", "layers": ZIMAGE_LAYERS}
    assert info["written_by"].startswith("ComfyUI-INT8-ConvRot") and not info["problems"]
    plain = inspect_file(zfile)
    assert plain["format"] == "plain" and plain["dtypes"]["BF16"]["tensors"] == len(load(zfile)[0])
    assert "INT8 ConvRot" in format_report(info)


@pytest.mark.gpu
def test_cuda_matches_cpu(zfile, tmp_path):
    convert_file(zfile, tmp_path / "cpu.safetensors", device="cpu")
    s = convert_file(zfile, tmp_path / "gpu.safetensors", device="cuda")
    a, b = load(tmp_path / "cpu.safetensors")[0], load(tmp_path / "gpu.safetensors")[0]
    assert s.device.startswith("cuda")
    for k in a:
        if a[k].dtype == torch.int8:   # float32 GEMMs differ in the last bit between devices: rare ±1 codes
            assert (a[k].int() - b[k].int()).abs().max() <= 1 and (a[k] != b[k]).float().mean() < 1e-3
        elif k.endswith("weight_scale"):
            assert torch.allclose(a[k], b[k], rtol=1e-5)
        else:
            assert torch.equal(a[k], b[k])
