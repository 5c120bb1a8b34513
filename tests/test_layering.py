"""engine/ and kernels/ never import nodes/ or ComfyUI: they run in the CLI, benchmarks and CI alone."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "comfyui_int8_convrot.nodes")


def imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:   # relative: resolve against the file's package inside the repo
                pkg = path.relative_to(ROOT).parent.parts[: len(path.relative_to(ROOT).parent.parts) - node.level + 1]
                mod = ".".join(("comfyui_int8_convrot",) + tuple(pkg) + ((mod,) if mod else ()))
            yield mod


@pytest.mark.parametrize("path", sorted(p for d in ("engine", "kernels") for p in (ROOT / d).rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_comfyui_or_nodes_imports(path):
    bad = [m for m in imports(path) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
