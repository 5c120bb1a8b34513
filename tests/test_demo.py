"""The README's main job (`scripts/demo.sh` -> `python -m comfyui_int8_convrot.demo`): the engine half on a
narrow layout (`--small`; the real-width run is what the README command does), its PNG, its floors, and the
ComfyUI rows in a real ComfyUI."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_small_demo_reports_every_mode_and_writes_a_png(tmp_path, monkeypatch, capsys):
    from PIL import Image
    from comfyui_int8_convrot import demo
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    png = tmp_path / "report.png"
    assert demo.main(["--small", "--device", "cpu", "--no-comfyui", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert f"report: {png.resolve()}" in out
    for row in ("bf16 file (float32 compute)", "INT8 ConvRot W8A16", "INT8 ConvRot W8A8"):
        assert row in out
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width == 1280 and img.height > 600
        assert len(img.convert("RGB").getcolors(1 << 16) or range(1 << 16)) > 8   # drawn, not blank
    assert not list(tmp_path.glob(".*.tmp"))


def test_engine_run_compares_each_quantized_linear(tmp_path):
    from comfyui_int8_convrot.demo.engine_run import MODES, SMALL_SHAPE, run_engine
    rep = run_engine(tmp_path, shape=SMALL_SHAPE, image_size=64, caption_tokens=8, device="cpu", out=lambda s: None)
    # Every Linear of the block, in forward order; the embedders and final layer stay bf16 (preset zimage).
    assert [r.name for r in rep.layers] == [f"layers.0.{n}" for n in ("attention.qkv", "attention.out",
                                                                     "feed_forward.w1", "feed_forward.w3",
                                                                     "feed_forward.w2")]
    assert rep.tokens == 16 + 8
    for r in rep.layers:
        assert set(r.rel_error) == set(MODES) and all(0 < e < 0.03 for e in r.rel_error.values())
    assert rep.int8_weight_bytes < 0.3 * rep.ref_weight_bytes   # INT8 + row scales vs float32 on CPU
    assert rep.int8_bytes < rep.source_bytes


def test_engine_half_imports_nothing_from_nodes_or_comfyui():
    forbidden = ("comfy", "comfy_api", "folder_paths", "nodes", "server")
    for name in ("__init__.py", "engine_run.py", "report_png.py"):
        tree = ast.parse((ROOT / "demo" / name).read_text())
        mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        bad = [m for m in mods if m.split(".")[0] in forbidden]
        assert not bad, f"demo/{name} imports {bad}"
    # the package's only way up is the lazily imported ComfyUI half
    init = (ROOT / "demo" / "__init__.py").read_text()
    assert "from .comfyui_run import" in init and "\nfrom .comfyui_run" not in init


@pytest.mark.comfyui
@pytest.mark.slow
def test_comfyui_demo_rows(comfy, tmp_path):
    """Inside ComfyUI: bf16 through the stock loader, our loader in both modes, and the stock loader on the
    INT8 file where this ComfyUI reads it natively — each row measured against the bf16 forward."""
    from comfyui_int8_convrot.demo.comfyui_run import run_comfyui_demo
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
