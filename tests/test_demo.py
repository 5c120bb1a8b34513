"""The README's main job (`scripts/demo.sh` → `python -m comfyui_int8_convrot.demo`) on both paths."""
from __future__ import annotations

import pytest



def test_engine_only_demo_reports_every_mode(capsys):
    from comfyui_int8_convrot.engine.model_demo import run_engine_demo
    rep = run_engine_demo(tokens=16, device="cpu")
    assert rep["path"] == "engine" and [r["model"] for r in rep["results"]] == ["INT8 ConvRot w8a16",
                                                                                 "INT8 ConvRot w8a8"]
    assert all(r["worst_rel_error"] < 0.03 for r in rep["results"])
    assert rep["int8_bytes"] < 0.55 * rep["bf16_bytes"]
    assert "INT8 ConvRot w8a8" in capsys.readouterr().out


def test_demo_without_comfyui_says_what_it_ran(monkeypatch, capsys):
    from comfyui_int8_convrot import demo
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(demo, "find_comfyui", lambda explicit=None: None)
    assert demo.main(["--image-size", "64", "--device", "cpu"]) == 0
    assert "running the engine alone" in capsys.readouterr().out


@pytest.mark.comfyui
@pytest.mark.slow
def test_comfyui_demo_rows(comfy, tmp_path):
    """Inside ComfyUI: bf16 through the stock loader, our loader in both modes, and the stock loader on the
    INT8 file where this ComfyUI reads it natively — each row measured against the bf16 forward."""
    from comfyui_int8_convrot.comfyui_demo import run_comfyui_demo
    from comfyui_int8_convrot.nodes import ck_registration
    from comfyui_int8_convrot.nodes.native import has_native_int8
    rep = run_comfyui_demo(comfy, tmp_path, image_size=64, cap_tokens=8, device="cpu", out=lambda s: None)
    names = [r["model"] for r in rep["results"]]
    native = ["INT8 file, stock loader"] if has_native_int8() else []
    if native and ck_registration.state()["registered"]:
        native.append("stock loader + pack kernels")
    expect = ["bf16 file, stock"] + native + ["INT8 ConvRot loader w8a16", "INT8 ConvRot loader w8a8"]
    assert rep["detected"] == "ZImage" and names == expect
    assert all(r["cosine"] > 0.99 for r in rep["results"][1:])
