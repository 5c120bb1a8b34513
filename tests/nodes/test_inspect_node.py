"""The "INT8 ConvRot Inspect" node inside the real ComfyUI (in-process, CPU), and the numbers it
renders (engine/quality.py) on tiny Z-Image files with outlier channels.

- Without a source the per-layer error is *estimated* from codes and scales (uniform rounding
  model). It must agree with the error measured against the bf16 original within 5 % (relative)
  per layer — measured agreement is ~0.3 % on these weights; a wrong scale, group size or energy
  term would be off by far more — and it must show the tensor-wise file worse than the row-wise one
  (≥ 1.5×; measured ~2.3× mean): that contrast is what the chart is for.
- With the source, the output error on random activations is of the weight error's order and a
  few percent at most (w8a8 also rounds the activations: measured mean ~0.9 % vs 0.6 % weight error).
"""
from __future__ import annotations

import pytest
import torch

import comfy_env

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return comfy_env.badge_files(tmp_path_factory.mktemp("models"))


@pytest.fixture
def node(comfy, files, monkeypatch, tmp_path):
    import folder_paths
    comfy_env.use_model_folders(monkeypatch, files["int8"].parents[1])
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    from comfyui_int8_convrot.nodes import inspect
    return inspect.Int8ConvRotInspect


def run(node, **kw):
    out = node.execute(**kw)
    report, image = out.args
    return report, image, out.ui


def test_registered_with_files_of_both_folders(node):
    from comfyui_int8_convrot.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    assert NODE_CLASS_MAPPINGS["Int8ConvRotInspect"] is node
    assert NODE_DISPLAY_NAME_MAPPINGS["Int8ConvRotInspect"] == "INT8 ConvRot Inspect"
    schema = node.GET_SCHEMA()
    options = schema.inputs[0].options
    assert options[0] == "none" and "diffusion_models/tiny_zimage_int8.safetensors" in options
    assert "text_encoders/tiny_qwen3_int8.safetensors" in options
    assert [o.io_type for o in schema.outputs] == ["STRING", "IMAGE"] and schema.is_output_node


def test_file_without_source_estimates(node):
    report, image, ui = run(node, file="diffusion_models/tiny_zimage_int8.safetensors")
    assert "format: INT8 ConvRot" in report and "group sizes: 64 (30)" in report
    assert "estimated from codes and scales only" in report and "give the bf16 source" in report
    assert "verdict: INT8 ConvRot · group 64 · row scales" in report
    assert image.dtype == torch.float32 and image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and image.shape[2] == 1280
    assert float(image.std()) > 0.05                     # something was drawn
    assert ui["text"] == [report] and len(ui["images"]) == 1
    assert ui["int8_convrot"][0]["level"] == "ok"
    assert ui["int8_convrot"][0]["lines"][0].startswith("est. weight error: mean ")


def test_estimate_matches_measurement_and_shows_tensorwise_worse(node, files):
    from comfyui_int8_convrot.engine.quality import file_quality
    row = file_quality(files["int8"], files["bf16"], tokens=16)
    assert len(row.layers) == 30
    for r in row.layers:
        assert r.estimated == pytest.approx(r.weight_error, rel=0.05), r.name
        assert 0.5 * r.weight_error < r.output_error < 0.05, r.name
    tensor = file_quality(files["tensor"])
    assert tensor.stats("estimated")["mean"] > 1.5 * row.stats("estimated")["mean"]
    assert {r.scaling for r in tensor.layers} == {"tensor"}


def test_file_with_source_measures(node):
    short, short_img, _ = run(node, file="diffusion_models/tiny_zimage_int8.safetensors")
    report, image, ui = run(node, file="diffusion_models/tiny_zimage_int8.safetensors",
                            bf16_source="diffusion_models/tiny_zimage_bf16.safetensors", tokens=16, compute="w8a16")
    assert "measured against diffusion_models/tiny_zimage_bf16.safetensors" in report
    assert "relative output error on 16 random N(0,1) activation rows, w8a16" in report
    assert image.shape[1] > short_img.shape[1]           # a second panel: output error
    assert ui["int8_convrot"][0]["lines"][-1] == "measured vs diffusion_models/tiny_zimage_bf16.safetensors"


def test_tensorwise_file_is_flagged(node):
    report, _, ui = run(node, file="diffusion_models/tiny_zimage_int8_tensorwise.safetensors")
    assert "waxy" in report and "tensor scales" in report and ui["int8_convrot"][0]["level"] == "warn"


def test_text_encoder_file(node):
    report, _, _ = run(node, file="text_encoders/tiny_qwen3_int8.safetensors")
    assert "preset qwen3" in report and "quality of" in report


def test_plain_file_has_nothing_to_plot(node):
    report, image, ui = run(node, file="diffusion_models/tiny_zimage_bf16.safetensors")
    assert "not INT8 ConvRot: plain bf16" in report and "no INT8 layers to measure" in report
    # Red, as on the route's badge: the loaders refuse it (quantize_on_load off), and say so.
    assert image.shape[1:] == (372, 1280, 3) and ui["int8_convrot"][0]["level"] == "bad"
    assert ui["int8_convrot"][0]["lines"] == ["not INT8 ConvRot: plain bf16", "set quantize_on_load, or convert it first"]


def test_model_from_our_loader(node, files):
    from comfyui_int8_convrot.engine.quality import file_quality
    from comfyui_int8_convrot.nodes.loaders import load_unet
    patcher = load_unet(files["int8"], "w8a16")
    report, _, _ = run(node, file="none", model=patcher, bf16_source="diffusion_models/tiny_zimage_bf16.safetensors",
                       tokens=8)
    assert "MODEL (" in report and "30 INT8 layers as loaded" in report and "measured against" in report
    direct = file_quality(files["int8"], files["bf16"], tokens=8)
    assert f"mean {direct.stats('weight_error')['mean']:.2%}" in report   # same codes, same numbers


def test_bad_choices_say_what_to_do(node, files):
    from comfyui_int8_convrot.engine.errors import Int8ConvRotError
    from comfyui_int8_convrot.engine.synthetic import iter_qwen3
    comfy_env.save_state_dict(files["te"].parent / "qwen_bf16.safetensors", dict(iter_qwen3()))
    with pytest.raises(Int8ConvRotError, match="connect a MODEL"):
        node.execute(file="none")
    with pytest.raises(Int8ConvRotError, match="cannot be the bf16 source.*already INT8"):
        node.execute(file="diffusion_models/tiny_zimage_int8.safetensors",
                     bf16_source="diffusion_models/tiny_zimage_int8_tensorwise.safetensors")
    with pytest.raises(Int8ConvRotError, match="none of the 30 quantized layers is in the source"):
        node.execute(file="diffusion_models/tiny_zimage_int8.safetensors",
                     bf16_source="text_encoders/qwen_bf16.safetensors")


def test_fingerprint_follows_the_file(node, files):
    import os
    a = node.fingerprint_inputs(file="diffusion_models/tiny_zimage_int8.safetensors", bf16_source="none")
    os.utime(files["int8"], ns=(10**18, 10**18))
    b = node.fingerprint_inputs(file="diffusion_models/tiny_zimage_int8.safetensors", bf16_source="none")
    assert a != b


def test_file_name_from_the_converter_replaces_file(node, files):
    """A bare name (the Converter's file_name output) is found in its folder and inspected instead of `file`."""
    report, _, _ = run(node, file="none", file_name="tiny_qwen3_int8.safetensors")
    assert report.startswith(run(node, file="text_encoders/tiny_qwen3_int8.safetensors")[0].splitlines()[0])
    from comfyui_int8_convrot.engine.errors import Int8ConvRotError
    with pytest.raises(Int8ConvRotError, match="missing.safetensors' is in none of diffusion_models, text_encoders"):
        node.execute(file="none", file_name="missing.safetensors")
