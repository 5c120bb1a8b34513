"""Suite-wide test set-up: markers that skip with a visible reason, and the in-process ComfyUI."""
import os

import pytest
import torch

# Triton decides at @triton.jit time whether to interpret: on a machine without CUDA every Triton test runs
# the kernels in the interpreter, so it must be set before any test module imports the kernels (else, by
# collection order, some would silently exercise the torch fallback instead). The GPU tier runs alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import comfy_env


def interpreter_shims() -> list[str]:
    """The test-only Triton interpreter shims applied in this session (tests/triton_compat.py), installed
    as soon as the session interprets (here on a machine without CUDA, else when a module sets it)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return []
    try:
        import triton_compat
        return triton_compat.install()
    except ImportError:   # no triton: its tests skip, saying so
        return []


interpreter_shims()


def pytest_report_header(config):
    p = comfy_env.comfyui_path()
    if p is None:
        return f"ComfyUI: none ({comfy_env.skip_reason()})"
    version = (p / "comfyui_version.py").read_text().split('"')[1] if (p / "comfyui_version.py").exists() else "?"
    return f"ComfyUI: {p} (version {version})"


def _shim_lines():
    shims = interpreter_shims()
    return [f"Triton interpreter shim (tests only, {_versions()}): {s}" for s in shims]


def _versions():
    import numpy
    import triton
    return f"Triton {triton.__version__}, numpy {numpy.__version__}"


def pytest_terminal_summary(terminalreporter):
    """One line per skip reason (the ComfyUI tests skip together: one line saying how to run them)."""
    reasons: dict[str, int] = {}
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"SKIPPED {n} test{'s' if n > 1 else ''}: {reason}")
    for line in _shim_lines():
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    no_comfy = comfy_env.comfyui_path() is None
    skip_comfy = pytest.mark.skip(reason=comfy_env.skip_reason()) if no_comfy else None
    # INT8_CONVROT_GPU_DRY=1: bench/gpu_check.sh --dry runs the GPU tier on CPU under the interpreter.
    dry = os.environ.get("INT8_CONVROT_GPU_DRY") == "1"
    skip_gpu = (pytest.mark.skip(reason="no CUDA device on this machine")
                if not torch.cuda.is_available() and not dry else None)
    for item in items:
        if skip_comfy is not None and ("comfyui" in item.keywords or "server" in item.keywords):
            item.add_marker(skip_comfy)
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _triton_fallback_off(request):
    """For tests marked `triton_kernel` (see pytest_runtest_call): the torch fallback off, counters reset."""
    if request.node.get_closest_marker("triton_kernel") is None:
        yield
        return
    from comfyui_int8_convrot.kernels.triton import fallback
    interpreter_shims()
    mp = pytest.MonkeyPatch()
    mp.setenv(fallback.ENV, "0")
    fallback.reset()
    try:
        yield
    finally:
        mp.undo()
        fallback.reset()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Tests marked `triton_kernel` claim to exercise a Triton kernel (interpreter or GPU): they run with the
    fallback off (a kernel that fails raises) and fail unless a kernel launched and nothing fell back.
    `no_kernel_launch(reason)` marks a test (case) there that by design runs none: it fails if one does.
    Only the fallback's own tests (test_triton_fallback.py) inject failures."""
    result = yield
    if item.get_closest_marker("triton_kernel") is not None:
        from comfyui_int8_convrot.kernels.triton import fallback
        launched, failed = fallback.launches(), fallback.failures()
        assert not failed, f"a Triton kernel fell back to torch: {failed}"
        none = item.get_closest_marker("no_kernel_launch")
        if none is None:
            assert launched, "no Triton kernel launched in this test: it passed on a torch path"
        else:
            assert not launched, f"{launched} launched, but this test is marked no_kernel_launch ({none.args[0]})"
    return result


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in this process on the CPU (tests using it carry the `comfyui` marker)."""
    return comfy_env.setup_in_process()


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory):
    """One real ComfyUI server for the web tests (the route over HTTP, the browser): the tiny badge
    files of `comfy_env.badge_files` in its model folders, a symlink that leads out of them
    (`escape.safetensors`), and user settings that skip the first-run templates dialog and the minimap."""
    import json
    base = tmp_path_factory.mktemp("ui_base")
    srv = comfy_env.ComfyServer(base)
    srv.files = comfy_env.badge_files(base / "models")
    outside = tmp_path_factory.mktemp("outside") / "secret.safetensors"
    outside.write_bytes(srv.files["int8"].read_bytes())
    (base / "models" / "diffusion_models" / "escape.safetensors").symlink_to(outside)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                    "Comfy.Graph.CanvasInfo": False}))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def comfyui_inference_mode():
    """ComfyUI executes every node (loading, LoRA, sampling) under torch.inference_mode."""
    with torch.inference_mode():
        yield
