"""The badge route, the loader nodes and the Inspect node in a real ComfyUI (in-process, CPU) agree
on every bad-file kind (tests/verdict_files.py): red on the route and in the Inspect node exactly
when the UNET and CLIP loader nodes refuse the file, with the loaders' own reason; and a node's error
reads as ComfyUI shows it (execution.full_type_name, str): the exception's class name alone and the
file as the loader list shows it, never an absolute path."""
from __future__ import annotations

import json

import pytest

import comfy_env
from verdict_files import GOOD, NATIVE, UNREADABLE, build

pytestmark = pytest.mark.comfyui

BAD = ("bf16", "no_scales", "one_scale_removed", "nan_scale", "format_version_2", "nan_weights_bf16",
       "scaled_fp8_missing_scale", "comfy_fp8_no_scale", "int8_without_comfy_quant") + NATIVE + UNREADABLE


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    files = build(base / "diffusion_models")
    build(base / "text_encoders")
    return base, files


@pytest.fixture
def env(comfy, models, monkeypatch, tmp_path, comfyui_inference_mode):
    import folder_paths
    comfy_env.use_model_folders(monkeypatch, models[0])
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    from comfyui_int8_convrot.nodes import inspect, loaders, routes
    routes._CACHE.clear()
    return routes, loaders, inspect


def shown(exc) -> tuple[str, str]:
    """(exception_type, exception_message) as ComfyUI's execution.py reports a node's error."""
    import execution
    return execution.full_type_name(type(exc)), str(exc)


def node_error(call):
    from comfyui_int8_convrot.engine.errors import Int8ConvRotError
    try:
        call()
    except Int8ConvRotError as exc:
        return exc
    return None


@pytest.mark.parametrize("kind", GOOD + BAD)
def test_route_loaders_and_inspect_agree(env, models, kind):
    routes, loaders, inspect = env
    base, files = models
    name = f"{kind}.safetensors"
    unet = node_error(lambda: loaders.Int8ConvRotUNETLoader.execute(name, "w8a16", layers="pack"))
    refused = unet is not None
    assert refused == (kind in BAD), (kind, unet)

    status, payload = routes.inspect_model_file("diffusion_models", name)
    red = status != 200 or payload["summary"]["level"] == "bad"
    assert red == refused, (kind, status, payload)
    assert str(base) not in json.dumps(payload)

    ran = {}
    inspect_error = node_error(lambda: ran.setdefault("out", inspect.Int8ConvRotInspect.execute(
        file=f"diffusion_models/{name}")))
    if kind in UNREADABLE:   # the route says 422 (the badge's red), the node errors with the same message
        assert status == 422 and inspect_error is not None
        assert shown(inspect_error)[1] == f"diffusion_models/{payload['error']}"   # as its file list shows it
    else:
        assert inspect_error is None, inspect_error
        badge = ran["out"].ui["int8_convrot"][0]
        assert (badge["level"] == "bad") == refused and badge["level"] == payload["summary"]["level"]
    if not refused:
        return
    # The loaders' reason, word for word, on the badge and in the Inspect node; the class name alone.
    exc_type, message = shown(unet)
    assert exc_type == "FileFormatError" and "." not in exc_type and "/" not in exc_type
    assert message.startswith(f"{name}: ") and str(base) not in message
    if kind not in UNREADABLE:
        badge = ran["out"].ui["int8_convrot"][0]
        refusal = payload["summary"]["refusal"]
        assert refusal.replace(f"diffusion_models/{name}", name) == message
        assert refusal in badge["lines"] or badge["lines"][1] == payload["summary"]["warnings"][0]
    clip = node_error(lambda: loaders.Int8ConvRotCLIPLoader.execute(name, "lumina2", "w8a16", layers="pack"))
    assert clip is not None and shown(clip) == (exc_type, message)   # both loaders: one check


def test_node_error_class_names_survive_except_clauses(env):
    from comfyui_int8_convrot.engine.errors import FileFormatError, Int8ConvRotError
    _, loaders, _ = env
    exc = node_error(lambda: loaders.Int8ConvRotUNETLoader.execute("bf16.safetensors", "w8a16", layers="pack"))
    assert isinstance(exc, FileFormatError) and isinstance(exc, Int8ConvRotError) and isinstance(exc, ValueError)
    assert type(exc).__name__ == "FileFormatError" and exc.path == "bf16.safetensors"
    assert "quantize_on_load" in str(exc)
