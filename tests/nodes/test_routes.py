"""The pack's read-only HTTP route GET /int8_convrot/inspect (nodes/routes.py): the pure function
in-process against ComfyUI's folder_paths, then the same answers over HTTP from a real server.

Allowed: files that ComfyUI lists in diffusion_models (alias unet), text_encoders (alias clip) and
checkpoints. Refused with a JSON message: other folders (400), '..' and absolute names (400), names
that are not there (404), symlinks that lead out of the model folders (403), unreadable files (422).
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request

import pytest

import comfy_env

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return comfy_env.badge_files(tmp_path_factory.mktemp("models"))


@pytest.fixture
def routes(comfy, files, monkeypatch):
    comfy_env.use_model_folders(monkeypatch, files["int8"].parents[1])
    from comfyui_int8_convrot.nodes import routes
    routes._CACHE.clear()
    return routes


def test_int8_convrot_file_facts(routes):
    status, p = routes.inspect_model_file("diffusion_models", "tiny_zimage_int8.safetensors")
    assert status == 200, p
    s = p["summary"]
    assert s["level"] == "ok" and s["format"] == "int8_convrot"
    assert (s["quantized"], s["kept"], s["group_sizes"], s["scaling"]) == (30, 10, [64], ["row"])
    assert s["lines"][0] == "INT8 ConvRot · group 64 · row scales"
    assert s["lines"][1] == "30 quantized · 10 kept high precision · Z-Image"
    assert "of bf16" in s["lines"][2] and 0.55 < s["size_ratio"] < 0.7 and s["warnings"] == []
    # The facts `int8-convrot inspect --json` prints, with the absolute path replaced by folder/name.
    assert p["info"]["path"] == "diffusion_models/tiny_zimage_int8.safetensors"
    assert p["info"]["layers"]["int8_convrot"] == 30 and p["info"]["group_sizes"] == {"64": 30}
    assert "INT8 ConvRot" in p["report"] and str(comfy_env.REPO) not in json.dumps(p)
    assert os.fspath(routes.folder_paths.get_folder_paths("diffusion_models")[0]) not in json.dumps(p)


def test_tensorwise_is_a_warning_and_bf16_is_not_int8(routes):
    _, t = routes.inspect_model_file("diffusion_models", "tiny_zimage_int8_tensorwise.safetensors")
    assert t["summary"]["level"] == "warn" and t["summary"]["scaling"] == ["tensor"]
    assert t["summary"]["lines"][0] == "INT8 ConvRot · group 64 · tensor-wise scales"
    assert any("waxy" in w for w in t["summary"]["warnings"])
    _, b = routes.inspect_model_file("diffusion_models", "tiny_zimage_bf16.safetensors")
    assert b["summary"]["level"] == "bad" and b["summary"]["quantizable"]
    assert b["summary"]["lines"][0] == "not INT8 ConvRot: plain bf16"
    assert b["summary"]["size_ratio"] == pytest.approx(1.0)


def test_legacy_folder_names_and_text_encoders(routes):
    status, p = routes.inspect_model_file("unet", "tiny_zimage_int8.safetensors")
    assert status == 200 and p["summary"]["quantized"] == 30
    status, p = routes.inspect_model_file("clip", "tiny_qwen3_int8.safetensors")
    assert status == 200 and p["summary"]["level"] == "ok" and p["summary"]["preset"] == "qwen3"
    status, p = routes.inspect_model_file("text_encoders", "tiny_qwen3_int8.safetensors")
    assert status == 200 and p["summary"]["lines"][1].endswith("· Qwen3")


@pytest.mark.parametrize("folder, name, status, words", [
    ("loras", "tiny_zimage_int8.safetensors", 400, "not one of"),
    ("custom_nodes", "__init__.py", 400, "not one of"),
    ("", "tiny_zimage_int8.safetensors", 400, "not one of"),
    ("diffusion_models", "", 400, "no file name"),
    ("diffusion_models", "../text_encoders/tiny_qwen3_int8.safetensors", 400, "'..'"),
    ("diffusion_models", "sub/../../x.safetensors", 400, "'..'"),
    ("diffusion_models", "..\\x.safetensors", 400, "'..'"),
    ("diffusion_models", "/etc/passwd", 400, "absolute"),
    ("diffusion_models", "nope.safetensors", 404, "not in models/diffusion_models"),
    ("text_encoders", "tiny_zimage_int8.safetensors", 404, "not in models/text_encoders"),
])
def test_rejected_requests(routes, folder, name, status, words):
    got, p = routes.inspect_model_file(folder, name)
    assert got == status and words in p["error"] and set(p) == {"error"}


def test_absolute_path_of_a_real_model_is_refused(routes, files):
    status, p = routes.inspect_model_file("diffusion_models", str(files["int8"]))
    assert status == 400 and "absolute" in p["error"]


def test_symlink_out_of_the_model_folders_is_refused(routes, files, tmp_path):
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(files["int8"].read_bytes())
    link = files["int8"].parent / "escape.safetensors"
    link.symlink_to(outside)
    try:
        status, p = routes.inspect_model_file("diffusion_models", "escape.safetensors")
        assert status == 403 and "outside" in p["error"] and str(tmp_path) not in p["error"]
    finally:
        link.unlink()


def test_unreadable_file_is_422_without_paths(routes, files):
    bad = files["int8"].parent / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    try:
        status, p = routes.inspect_model_file("diffusion_models", "broken.safetensors")
        assert status == 422 and p["error"].startswith("broken.safetensors") and "not a safetensors" in p["error"]
        assert str(bad.parent) not in p["error"]
    finally:
        bad.unlink()


def test_answer_follows_the_file_on_disk(routes, files):
    path = files["int8"].parent / "changing.safetensors"
    path.write_bytes(files["int8"].read_bytes())
    try:
        assert routes.inspect_model_file("diffusion_models", "changing.safetensors")[1]["summary"]["level"] == "ok"
        path.write_bytes(files["bf16"].read_bytes())   # same name, new content: the cache must not answer
        os.utime(path, ns=(1, 1))
        assert routes.inspect_model_file("diffusion_models", "changing.safetensors")[1]["summary"]["level"] == "bad"
    finally:
        path.unlink()


def test_no_server_no_route(routes):
    """Imported in-process (no PromptServer running) the pack registers nothing and does not fail."""
    import sys
    server = sys.modules.get("server")
    assert getattr(getattr(server, "PromptServer", None), "instance", None) is None
    assert routes.register_routes() is False


# -- over HTTP, on a real server -------------------------------------------------------------------

def http_get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.server
def test_route_over_http(ui_server):
    def get(folder, name, prefix="/api"):
        q = urllib.parse.urlencode({"folder": folder, "name": name})
        return http_get(f"{ui_server.url}{prefix}/int8_convrot/inspect?{q}")

    status, p = get("diffusion_models", "tiny_zimage_int8.safetensors")
    assert status == 200 and p["summary"]["lines"][0] == "INT8 ConvRot · group 64 · row scales"
    assert p["summary"]["quantized"] == 30 and p["summary"]["kept"] == 10
    assert p["info"]["path"] == "diffusion_models/tiny_zimage_int8.safetensors"
    assert get("diffusion_models", "tiny_zimage_int8.safetensors", prefix="")[0] == 200   # old-style path too
    assert get("diffusion_models", "tiny_zimage_int8_tensorwise.safetensors")[1]["summary"]["level"] == "warn"
    assert get("text_encoders", "tiny_qwen3_int8.safetensors")[1]["summary"]["level"] == "ok"
    for folder, name, code in [("diffusion_models", "../../user/default/comfy.settings.json", 400),
                               ("diffusion_models", str(ui_server.base / "server.log"), 400),
                               ("diffusion_models", "%2e%2e/x.safetensors", 404),
                               ("custom_nodes", "ComfyUI-INT8-ConvRot/__init__.py", 400),
                               ("diffusion_models", "missing.safetensors", 404),
                               ("diffusion_models", "escape.safetensors", 403)]:
        status, p = get(folder, name)
        assert status == code and "error" in p, (folder, name, status, p)
        assert str(ui_server.base) not in p["error"]
    # read-only: the route answers GET only
    req = urllib.request.Request(f"{ui_server.url}/api/int8_convrot/inspect?folder=diffusion_models&name=x",
                                 method="POST", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=30)
    assert exc.value.code == 405
