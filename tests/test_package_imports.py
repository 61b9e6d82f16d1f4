"""The package reads top-down: no import cycles among moe_prefetch's modules, lazy imports
inside functions included (a lazy import only hides a cycle, it does not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moe_prefetch"


def _imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports, as dotted names relative to the package."""
    here = path.relative_to(PACKAGE).with_suffix("").parts
    package = here[:-1] if path.name != "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                parts = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("moe_prefetch"):
                parts = node.module.split(".")[1:]
            else:
                continue
            names = [a.name for a in node.names]
            for name in names:
                candidate = [*parts, name]
                if (PACKAGE.joinpath(*candidate).with_suffix(".py")).exists():
                    found.add(".".join(candidate))
                elif parts:
                    found.add(".".join(parts))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("moe_prefetch."):
                    found.add(alias.name.split(".", 1)[1])
    return {m for m in found if m and m != "__init__"}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if name.endswith("__init__") or name == "__main__":
            continue
        graph[name] = _imports(path) - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_known_edges():
    graph = _graph()
    assert "runtime" in graph["integration"] and "scheduler" in graph["runtime"]
    assert "loading" in graph["training"]


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
