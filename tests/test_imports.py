"""The package reads top-down: no import cycles among the CLI and report modules, and the
commands a new user runs first (`--help`, `profiles`) do not load torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moe_prefetch"
# Scoped to the modules that had cycles here; integration/loading/predictors are handled apart.
SCOPE = ("moe_prefetch.cli.", "moe_prefetch.profiling", "moe_prefetch.report_html", "moe_prefetch.report_text")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every moe_prefetch module `path` imports, at any depth (a lazy import in a function is
    still a cycle in the design), resolved to module names; `from . import x` counts as x."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def cycles_among(edges: dict[str, set[str]], scope) -> list[list[str]]:
    """Cycles that pass only through modules in `scope` (depth-first search)."""
    inside = {m for m in edges if m.startswith(scope) and m != "moe_prefetch.cli"}
    found, done = [], set()

    def visit(node, path):
        for nxt in sorted(edges[node] & inside):
            if nxt in path:
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for start in sorted(inside):
        if start not in done:
            visit(start, [start])
    return found


def test_the_checker_finds_a_cycle():
    assert cycles_among(
        {"moe_prefetch.cli.a": {"moe_prefetch.cli.b"}, "moe_prefetch.cli.b": {"moe_prefetch.cli.a"}}, SCOPE
    )


def test_cli_and_report_modules_have_no_import_cycle():
    edges = graph()
    assert "moe_prefetch.cli.app" in edges["moe_prefetch.cli.commands"]
    assert cycles_among(edges, SCOPE) == []


@pytest.mark.parametrize(
    "args", [["--help"], ["profiles"], ["run", "--help"], ["bench", "--help"], ["report", "--help"]]
)
def test_help_and_profiles_do_not_import_torch(args):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from moe_prefetch.cli.main import app\n"
        f"result = CliRunner().invoke(app, {args!r})\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
