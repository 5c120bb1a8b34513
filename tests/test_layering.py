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


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("comfyui_int8_convrot",) + (parts[:-1] if parts[-1] == "__init__" else parts))


def module_imports(path: Path, known: set[str]):
    """The package's own modules this file imports anywhere (module level or inside a function, where the
    lazy imports are): `from . import x` counts as importing module x when x is a module file."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        yield from (t for t in targets if t in known)


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


@pytest.mark.parametrize("floor", ["kernels", "engine", "nodes"])
def test_no_import_cycles(floor):
    """No module of a floor imports (even lazily, inside a function) one that imports it back: a cycle makes
    import order matter and hides which module is the lower one. A package's __init__ counts as a module."""
    files = sorted((ROOT / floor).rglob("*.py"))
    known = {module_name(p) for p in files}
    graph = {module_name(p): set(module_imports(p, known)) - {module_name(p)} for p in files}
    assert any(graph.values()), "the import scan found no import inside the floor: it is broken"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(m.removeprefix("comfyui_int8_convrot.") for m in cycle)
