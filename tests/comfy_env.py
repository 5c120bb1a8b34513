"""Shared helpers for the tests that run against a real ComfyUI tree (COMFYUI_PATH).

- `comfyui_path()` / `SKIP_REASON`: where ComfyUI is, or why the `comfyui` tests are skipped.
- `setup_in_process()`: put the tree on sys.path and force CPU *before* comfy.model_management is
  imported (it reads `args.cpu` at import time); idempotent.
- `ComfyServer`: `main.py --cpu` on a free port with `--base-directory` in a temporary folder, the
  pack and the test-only nodes symlinked into its custom_nodes; HTTP helpers; stopped by its PID.
- Checkpoint helpers: tiny Z-Image (Lumina2-family) files in bf16, ours and convert-to-quant's.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"


def comfyui_path() -> Path | None:
    """$COMFYUI_PATH, else the ComfyUI this pack is installed in (ComfyUI/custom_nodes/<pack> → ../..)."""
    p = os.environ.get("COMFYUI_PATH")
    if p:
        p = Path(p)
    elif REPO.parent.name == "custom_nodes":
        p = REPO.parent.parent
    else:
        return None
    return p if (p / "main.py").is_file() and (p / "comfy").is_dir() else None


def skip_reason() -> str:
    p = os.environ.get("COMFYUI_PATH")
    if p:
        return f"COMFYUI_PATH={p} is not a ComfyUI tree (no main.py / comfy/)"
    return ("no ComfyUI found: set COMFYUI_PATH to a ComfyUI tree (or install the pack in ComfyUI/custom_nodes) "
            "to run the real-ComfyUI tests; ../shared/comfyui/README.md says how to get 0.8.0 and 0.29.0")


def has_native_int8(path: Path | None = None) -> bool:
    """Whether the ComfyUI tree reads INT8 ConvRot files itself (0.27+), without importing it."""
    p = path or comfyui_path()
    q = p / "comfy" / "quant_ops.py" if p else None
    return bool(q and q.is_file() and "int8_tensorwise" in q.read_text())


_SET_UP = False


def setup_in_process() -> Path:
    """Import ComfyUI in this process on the CPU. Call before anything imports comfy.*"""
    global _SET_UP
    path = comfyui_path()
    if path is None:
        raise RuntimeError(skip_reason())
    if not _SET_UP:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        if "comfy.model_management" in sys.modules:
            import comfy.model_management as mm
            if mm.get_torch_device().type != "cpu":
                raise RuntimeError("comfy.model_management was imported before the tests forced --cpu")
        else:
            import comfy.cli_args
            comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401
        sys.path.insert(0, str(TEST_NODES.parent))
        from comfy_test_nodes.tiny_config import install
        install()
        _SET_UP = True
    return path


# -- comparisons ---------------------------------------------------------------------------------

def rel_err(ref, y) -> float:
    """‖ref − y‖ / ‖ref‖ in float64."""
    return ((ref.double() - y.double()).norm() / ref.double().norm()).item()


def cosine(ref, y) -> float:
    return torch.nn.functional.cosine_similarity(ref.double().flatten(), y.double().flatten(), dim=0).item()


# -- checkpoints -------------------------------------------------------------------------------

def save_state_dict(path, sd: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return Path(path)


def int8_state_dict(sd: dict, preset: str = "zimage", group_size: int = 64,
                    scaling: str = "row", include=()) -> tuple[dict, dict]:
    """Our INT8 ConvRot version of a float state dict, and the header metadata a file carries."""
    from comfyui_int8_convrot.engine.format import QUANT_SUFFIX, build_metadata, parse_layer_tensor
    from comfyui_int8_convrot.engine.loading import quantize_state_dict
    out, _ = quantize_state_dict(dict(sd), preset, group_size, scaling, include=include)
    layers = {k[: -len(QUANT_SUFFIX)]: parse_layer_tensor(v) for k, v in out.items() if k.endswith(QUANT_SUFFIX)}
    return out, build_metadata(layers)


def dequantized_state_dict(sd: dict, dtype=torch.float32) -> dict:
    """The float model an INT8 file represents exactly (codes·scale un-rotated; every float tensor in
    `dtype`, so a loader that takes its dtype from the file keeps the values exact), for exactness checks."""
    from comfyui_int8_convrot.engine.format import QUANT_SUFFIX, SCALE_SUFFIX, parse_layer_tensor
    from comfyui_int8_convrot.kernels import dequantize_weight
    out = {}
    for k, v in sd.items():
        if k.endswith((QUANT_SUFFIX, SCALE_SUFFIX)):
            continue
        layer = k[: -len(".weight")]
        if k.endswith(".weight") and f"{layer}{QUANT_SUFFIX}" in sd:
            lq = parse_layer_tensor(sd[f"{layer}{QUANT_SUFFIX}"])
            v = dequantize_weight(v, sd[f"{layer}{SCALE_SUFFIX}"], lq.group_size, dtype)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def badge_files(models: Path) -> dict[str, Path]:
    """Tiny Z-Image files for the web badge and the Inspect node, under `models`/diffusion_models and
    `models`/text_encoders: bf16, INT8 ConvRot (row scales, group 64), INT8 ConvRot with tensor-wise
    scales, and an INT8 ConvRot Qwen3 text encoder. Keys: bf16, int8, tensor, te."""
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY, iter_qwen3, iter_zimage
    dm, te = Path(models) / "diffusion_models", Path(models) / "text_encoders"
    dm.mkdir(parents=True, exist_ok=True)
    te.mkdir(parents=True, exist_ok=True)
    sd = dict(iter_zimage(ZIMAGE_TINY, seed=7))
    q, meta = int8_state_dict(sd, "zimage", 64)
    t, tmeta = int8_state_dict(sd, "zimage", 64, "tensor")
    qte, te_meta = int8_state_dict(dict(iter_qwen3()), "qwen3", 64)
    return {"bf16": save_state_dict(dm / "tiny_zimage_bf16.safetensors", sd),
            "int8": save_state_dict(dm / "tiny_zimage_int8.safetensors", q, meta),
            "tensor": save_state_dict(dm / "tiny_zimage_int8_tensorwise.safetensors", t, tmeta),
            "te": save_state_dict(te / "tiny_qwen3_int8.safetensors", qte, te_meta)}


def use_model_folders(monkeypatch, models: Path, names=("diffusion_models", "text_encoders", "checkpoints")) -> None:
    """Point ComfyUI's (in-process) model folders at `models`/<name> for one test (monkeypatch undoes it)."""
    import folder_paths
    for name in names:
        d = Path(models) / name
        d.mkdir(parents=True, exist_ok=True)
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name,
                            ([str(d)], set(folder_paths.supported_pt_extensions)))
        # Recorded by monkeypatch (the old entry comes back, or none), then dropped for the test.
        monkeypatch.setitem(folder_paths.filename_list_cache, name, None)
        del folder_paths.filename_list_cache[name]


# The seed's text-encoder recipe: no preset, so every 2-D weight (embed_tokens too) is quantized.
CTQ_TE_FLAGS = ("--low-memory",)


def run_ctq(src: Path, dst: Path, group_size: int = 64, preset_flag: str | None = "--zimage",
            extra=()) -> Path:
    """convert-to-quant's CLI, as users run it for Z-Image INT8 ConvRot files (preset_flag None and
    extra=CTQ_TE_FLAGS: the seed's text-encoder recipe)."""
    ctq = shutil.which("ctq", path=os.path.dirname(sys.executable)) or shutil.which("ctq")
    if ctq is None:
        raise RuntimeError("convert-to-quant (ctq) is not installed")
    cmd = [ctq, "--int8", "--scaling_mode", "row", "--simple", "--convrot", "--convrot-group-size", str(group_size),
           *([preset_flag] if preset_flag else []), *extra, "--comfy_quant", "--save-quant-metadata",
           "--device", "cpu", "-i", str(src), "-o", str(dst)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not dst.exists():
        raise RuntimeError(f"ctq failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return dst


# -- a real server -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """`python main.py --cpu` with its own base directory; the pack as custom_nodes/ComfyUI-INT8-ConvRot."""

    def __init__(self, base: Path, comfy: Path | None = None, port: int | None = None,
                 launcher: list[str] | None = None, env: dict | None = None):
        self.launcher = launcher or [sys.executable]   # what runs main.py (tests/declared_env.py wraps it)
        self.env = env if env is not None else dict(os.environ)
        self.comfy = comfy or comfyui_path()
        self.base = Path(base)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        for d in ("custom_nodes", "models/diffusion_models", "models/text_encoders", "models/loras", "output",
                  "input", "user"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        links = {"ComfyUI-INT8-ConvRot": REPO, "int8_convrot_test_nodes": TEST_NODES}
        for name, target in links.items():
            link = self.base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300.0) -> "ComfyServer":
        cmd = [*self.launcher, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--dont-print-server", "--disable-api-nodes",
               "--base-directory", str(self.base)]
        env = dict(self.env, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"POST {path} -> {exc.code}: {exc.read().decode(errors='replace')[:4000]}") from None

    def run(self, workflow: dict, timeout: float = 180) -> dict:
        """Queue a workflow (API format), wait for it, return its history entry; raise with the log on error."""
        pid = self.post("/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist:
                entry = hist[pid]
                status = entry.get("status", {})
                if status.get("status_str") != "success":
                    raise RuntimeError(f"workflow failed: {json.dumps(status.get('messages'))[:4000]}\n"
                                       f"{self.log_tail()}")
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the workflow:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"workflow {pid} did not finish within {timeout:.0f} s:\n{self.log_tail()}")
