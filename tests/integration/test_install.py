"""The pack loads in a ComfyUI whose environment holds only ComfyUI's requirements plus what the pack
declares in the file ComfyUI-Manager reads (requirements.txt): a real server, nodes checked through
/object_info. How the environment is narrowed to that (and why it is equivalent to a fresh venv built
from the two files) is in tests/declared_env.py."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import comfy_env

pytestmark = [pytest.mark.comfyui, pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# ComfyUI 0.8.0's server imports `requests` without declaring it (its later requirements do): part of any
# working 0.8.0 environment, so allowed here as scripts/setup.sh installs it, not something the pack needs.
COMFY_UNDECLARED = ("requests",)
PACK_NODES = {"Int8ConvRotUNETLoader", "Int8ConvRotCLIPLoader", "Int8ConvRotConverter", "Int8ConvRotSaveModel",
              "Int8ConvRotInspect"}


def test_manager_requirements_do_not_touch_torch():
    from packaging.requirements import Requirement
    import declared_env
    names = {Requirement(line).name.lower() for line in declared_env._requirement_lines(REPO / "requirements.txt")}
    assert names and not names & {"torch", "torchvision", "torchaudio", "triton", "triton-windows"}


def test_declared_env_blocks_what_is_undeclared(tmp_path):
    """The narrowing itself: an undeclared package fails to import, a declared one imports."""
    import subprocess
    import declared_env
    comfy = comfy_env.comfyui_path()
    blocked = declared_env.blocked_modules([comfy / "requirements.txt", REPO / "requirements.txt"],
                                           extra_blocked=("comfyui_int8_convrot",), extra_requirements=COMFY_UNDECLARED)
    (tmp_path / "blocked.json").write_text(json.dumps(blocked))
    (tmp_path / "probe.py").write_text(
        "import numpy, safetensors, torch\n"
        "try:\n    import pytest\nexcept ModuleNotFoundError as e:\n    print('blocked:', e.name)\n")
    out = subprocess.run([sys.executable, declared_env.__file__, str(tmp_path / "blocked.json"),
                          str(tmp_path / "probe.py")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "blocked: pytest" in out.stdout


def test_pack_loads_with_only_declared_requirements(tmp_path):
    import declared_env
    comfy = comfy_env.comfyui_path()
    blocked = declared_env.blocked_modules([comfy / "requirements.txt", REPO / "requirements.txt"],
                                           extra_blocked=("comfyui_int8_convrot",), extra_requirements=COMFY_UNDECLARED)
    # The narrowing is real in this venv: the test tools and the pack's own install are out of reach.
    assert {"pytest", "convert_to_quant", "comfyui_int8_convrot"} <= set(blocked)
    (tmp_path / "blocked.json").write_text(json.dumps(blocked))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # nothing beside the venv
    srv = comfy_env.ComfyServer(tmp_path / "base", launcher=[
        sys.executable, str(Path(declared_env.__file__)), str(tmp_path / "blocked.json")], env=env)
    (srv.base / "custom_nodes" / "int8_convrot_test_nodes").unlink()   # a user has only the pack
    srv.start()
    try:
        info = srv.get("/object_info", timeout=120)
        log = srv.log_tail(200_000)
    finally:
        srv.stop()
    assert "undeclared top-level modules blocked" in log
    assert "IMPORT FAILED" not in log, log[-4000:]
    assert PACK_NODES <= set(info), sorted(PACK_NODES - set(info))
