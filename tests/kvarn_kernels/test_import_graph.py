"""The kernel core's modules import each other without cycles, and only the self-check imports the oracle.

Read from the source (every import statement, module-level or inside a function), so nothing is run."""

import ast
from pathlib import Path

import kvarn_kernels

PACKAGE = Path(kvarn_kernels.__file__).parent


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:
                    deps.update(alias.name for alias in node.names)
                elif node.module and node.module.startswith("kvarn_kernels."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("kvarn_kernels."))
        graph[name] = {d for d in deps if (PACKAGE / f"{d}.py").exists() and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = _imports()
    assert {"attention", "dense_history", "format", "reference"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_only_the_self_check_imports_the_oracle():
    importers = {name for name, deps in _imports().items() if "reference" in deps}
    assert importers == {"ops"}, importers
