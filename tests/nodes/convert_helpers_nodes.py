"""Reading safetensors files in the node tests."""
from safetensors import safe_open


def load(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
