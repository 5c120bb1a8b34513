"""Per-layer quality numbers, the file badge facts and the chart, without ComfyUI.

The codes-only estimate is checked against the measured error of the same layer (within 5 %
relative; measured ~0.3 % on N(0, 1/in) weights with outlier columns): it is what users see when
they have no bf16 source, so it must not flatter. Tensor-wise scales must come out clearly worse
than row scales on the same weight (measured ~2×; asserted ≥ 1.3×).
"""
from __future__ import annotations

import pytest
import torch

from comfyui_int8_convrot.engine import facts, quality
from comfyui_int8_convrot.engine.plot import _axis, _pct, plot_quality
from comfyui_int8_convrot.engine.synthetic import linear_weight
from comfyui_int8_convrot.kernels import quantize_weight


def layer(scaling="row", group=64, shape=(192, 256), seed=0):
    w = linear_weight(*shape, torch.Generator().manual_seed(seed))
    codes, scale = quantize_weight(w, group, scaling)
    return w, quality.QuantLayer("layers.0.attention.qkv", codes, scale, group)


@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_estimate_matches_measured_weight_error(scaling):
    w, q = layer(scaling)
    est = quality.estimated_rel_error(q.codes, q.scale)
    w_err, out_err = quality.measured_errors(q, w, tokens=8, mode="w8a8")
    assert est == pytest.approx(w_err, rel=0.05)
    assert 0 < w_err and 0.5 * w_err < out_err < 0.05   # different norms: no strict order


def test_tensorwise_is_worse_than_row():
    _, row = layer("row")
    _, ten = layer("tensor")
    assert quality.estimated_rel_error(ten.codes, ten.scale) > 1.3 * quality.estimated_rel_error(row.codes, row.scale)


def test_w8a16_output_error_is_the_weight_error_seen_through_x():
    w, q = layer()
    w_err, out_err = quality.measured_errors(q, w, tokens=32, mode="w8a16")
    assert out_err == pytest.approx(w_err, rel=0.3)   # no activation rounding: same order as the weight error


def test_shape_mismatch_is_refused():
    w, q = layer()
    with pytest.raises(ValueError, match="source shape"):
        quality.measured_errors(q, w[:, :128])


def test_report_text_and_stats():
    rows = [quality.LayerQuality(f"layers.{i}.feed_forward.w2", (8, 64), 64, "row", 0.01 * (i + 1)) for i in range(4)]
    rep = quality.QualityReport(rows)
    assert rep.metrics == ["estimated"]
    s = rep.stats("estimated")
    assert s["mean"] == pytest.approx(0.025) and s["median"] == pytest.approx(0.025)
    assert s["worst_layer"] == "layers.3.feed_forward.w2"
    text = rep.to_text()
    assert "estimated from codes and scales only" in text and "4.00%  layers.3.feed_forward.w2" in text
    assert rep.headline()[-1].startswith("estimated from codes only")


@pytest.mark.parametrize("name, kind", [("layers.0.attention.qkv", "attention"),
                                        ("model.layers.3.self_attn.o_proj", "attention"),
                                        ("layers.1.feed_forward.w3", "feed-forward"),
                                        ("model.layers.0.mlp.down_proj", "feed-forward"),
                                        ("t_embedder.mlp.0", "feed-forward"),
                                        ("x_embedder", "other"), ("final_layer.adaLN_modulation.1", "other")])
def test_layer_kind(name, kind):
    assert quality.layer_kind(name) == kind


@pytest.mark.parametrize("v, top, step, label", [(0.0093, 0.01, 0.0025, "0.25%"), (0.019, 0.02, 0.005, "0.5%"),
                                                  (0.3, 0.3, 0.1, "10%")])
def test_axis_ticks_are_round(v, top, step, label):
    t, s = _axis(v)
    assert (t, s) == (pytest.approx(top), pytest.approx(step)) and _pct(step, step) == label


def test_plot_sizes(tmp_path):
    rows = [quality.LayerQuality(f"layers.{i // 7}.attention.qkv", (8, 64), 64, "row", 0.005, 0.006, 0.009)
            for i in range(210)]
    img = plot_quality(quality.QualityReport(rows, source="bf16.safetensors", tokens=16, mode="w8a8"), "x")
    assert img.size == (1280, 64 + 2 * 300 + 8)
    empty = plot_quality(quality.QualityReport(), "nothing")
    assert empty.size == (1280, 372)


def test_badge_facts_of_files(tmp_path):
    from comfyui_int8_convrot.engine.convert import convert_file
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY, iter_zimage, save
    src = tmp_path / "z.safetensors"
    save(src, iter_zimage(ZIMAGE_TINY))
    row, ten = tmp_path / "row.safetensors", tmp_path / "ten.safetensors"
    convert_file(src, row, device="cpu")
    convert_file(src, ten, scaling="tensor", device="cpu")
    f = facts.file_facts(row, "diffusion_models/row.safetensors")
    s = f["summary"]
    assert s["level"] == "ok" and s["lines"][0] == "INT8 ConvRot · group 64 · row scales"
    assert s["lines"][1] == "30 quantized · 10 kept high precision · Z-Image" and s["warnings"] == []
    assert f["info"]["path"] == "diffusion_models/row.safetensors"
    assert s["bf16_bytes"] == pytest.approx(src.stat().st_size, rel=0.01)
    t = facts.file_facts(ten)["summary"]
    assert t["level"] == "warn" and t["warnings"] == [facts.WAXY_WARNING]
    b = facts.file_facts(src)["summary"]
    assert b["level"] == "bad" and b["quantizable"] and b["lines"][0] == "not INT8 ConvRot: plain bf16"
    assert facts.badge_text(t).endswith("⚠ " + facts.WAXY_WARNING)
    est = quality.file_quality(row)
    assert len(est.layers) == 30 and est.source is None and est.metrics == ["estimated"]
