"""Small checkpoints and readers for the converter tests (plain functions; the files are tiny)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_int8_convrot.engine import synthetic


def write(path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return Path(path)


def zimage_sd(dtype=torch.bfloat16, **extra) -> dict:
    sd = dict(synthetic.iter_zimage(synthetic.ZIMAGE_TINY, dtype=dtype))
    sd.update(extra)
    return sd


def qwen3_sd(dtype=torch.bfloat16, lm_head=True) -> dict:
    return dict(synthetic.iter_qwen3(synthetic.QWEN3_TINY, dtype=dtype, lm_head=lm_head))


def load(path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def layer_json(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()).decode("utf-8"))


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(folder) -> list[str]:
    """Temp files a failed conversion would leave behind."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".partial"))
