"""Run ComfyUI as if its environment held only what the installers put there (issue 18 item 5).

ComfyUI-Manager and the registry install a pack by `pip install -r <pack>/requirements.txt` into the
environment that already has ComfyUI's own `requirements.txt`. Building that environment for real means
downloading torch (GBs) per test run, so this module re-uses an existing ComfyUI venv and makes it
equivalent instead: every installed distribution outside the dependency closure of those two files
(the pack's own editable install, pytest, convert-to-quant, ...) is made unimportable by a meta-path
finder placed ahead of all others. What remains importable is exactly what a fresh venv built from the
two files would hold (same closure; versions aside), so a missing declaration fails the same way.

Used as `python tests/declared_env.py <blocked.json> main.py <args...>` (cwd: the ComfyUI tree).
"""
from __future__ import annotations

import importlib.metadata as md
import json
import re
import sys
from pathlib import Path


def _name(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def _requirement_lines(path: Path) -> list[str]:
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


def closure(requirement_files, extra_requirements=()) -> set[str]:
    """Normalised names of the installed distributions those files (and lines) pull in, transitively
    (markers evaluated for this interpreter, extras followed)."""
    from packaging.requirements import Requirement
    lines = [line for f in requirement_files for line in _requirement_lines(f)] + list(extra_requirements)
    todo = [(Requirement(line), "") for line in lines]
    seen: set[tuple[str, str]] = set()
    names: set[str] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = _name(req.name)
        for ex in [""] + sorted(req.extras):
            if (name, ex) in seen:
                continue
            seen.add((name, ex))
            try:
                dist = md.distribution(req.name)
            except md.PackageNotFoundError:
                continue   # declared but not installed here: nothing to allow
            names.add(name)
            todo.extend((Requirement(r), ex) for r in (dist.requires or []))
    return names


def _top_level(dist) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return {t.strip() for t in text.split() if t.strip()}
    tops = set()
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith((".dist-info", ".egg-info")):
            continue
        head = parts[0]
        if len(parts) == 1:
            if head.endswith(".py"):
                tops.add(head[:-3])
            elif head.endswith((".so", ".pyd")):
                tops.add(head.split(".")[0])
        else:
            tops.add(head)
    return tops


def blocked_modules(requirement_files, extra_blocked=(), extra_requirements=()) -> list[str]:
    """Top-level module names that only undeclared distributions provide."""
    allowed = closure(requirement_files, extra_requirements)
    allowed_mods: set[str] = set()
    other: set[str] = set(extra_blocked)
    for dist in md.distributions():
        name = _name(dist.metadata["Name"] or "")
        (allowed_mods if name in allowed else other).update(_top_level(dist))
    return sorted(m for m in other - allowed_mods if m.isidentifier())


class _Block:
    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".", 1)[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (declared-env: not in ComfyUI's or the pack's "
                                      "requirements)", name=name)
        return None


def main(argv) -> None:
    import runpy
    names = json.loads(Path(argv[1]).read_text())
    for n in list(sys.modules):
        if n.split(".", 1)[0] in names:
            del sys.modules[n]
    sys.meta_path.insert(0, _Block(names))
    print(f"declared-env: {len(names)} undeclared top-level modules blocked", flush=True)
    sys.argv = argv[2:]
    sys.path[0] = str(Path.cwd())   # the ComfyUI tree, as `python main.py` has it (not this tests/ folder)
    runpy.run_path(argv[2], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)
