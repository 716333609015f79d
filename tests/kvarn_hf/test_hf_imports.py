"""kvarn_hf's modules import each other without cycles, each has a docstring, and the public names stay in place."""

from __future__ import annotations

import ast
from pathlib import Path

import kvarn_hf

PACKAGE = Path(kvarn_hf.__file__).parent


def internal_imports(path: Path) -> set[str]:
    """The kvarn_hf modules that `path` imports, at any depth of its code (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found.add(node.module or "")
            elif node.module and node.module.startswith("kvarn_hf."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("kvarn_hf.")}
    return found - {""}


def test_no_import_cycles():
    graph = {p.stem: internal_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert graph["graphs"] and "cache" not in graph["graphs"]  # the former cache <-> graphs cycle
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join([*path, module])}"
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            visit(dep, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_every_module_states_its_job():
    for path in PACKAGE.glob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, path.name


def test_public_names():
    for name in ("KVarNCache", "KVarNLayer", "PendingKV", "KVarNMask", "kvarn_attention", "kvarn_mask", "register"):
        assert name in kvarn_hf.__all__ and getattr(kvarn_hf, name) is not None
