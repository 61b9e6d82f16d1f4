"""The package reads top-down, in layers: each subpackage imports only from the packages below
it, never from one above, so no two packages import each other; and no module imports itself
back through others (no import cycles, within a package too). Lazy imports inside functions count:
a lazy import only hides a cycle, it does not remove it.

The layers, bottom to top, are LAYERS below; the README's list of packages and each package's
__init__ docstring say the same.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from moe_prefetch.runtime.profiles import SHIPPED_DIR

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moe_prefetch"
LAYERS = (
    "errors",  # the typed errors (moe_prefetch/errors.py)
    "experts",  # what an expert is and how it is stored
    "runtime",  # the per-layer machinery
    "predict",  # predictors, adapters, their scoring
    "model",  # attach, load, checkpoints
    "evidence",  # simulator, bench, routing replay, plan, calibration
    "report",  # run.json, text, HTML
    "face",  # moe_prefetch/__init__.py: the public names (`moe_prefetch.load`, ...)
    "serve",  # the model behind an HTTP endpoint, through the public names
    "cli",  # the command line (and __main__, which runs it)
)
# What moe_prefetch/ itself holds besides the packages of LAYERS: the demo models are data.
DATA_FOLDERS = ("demo", "demo_fine")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    """The layer of a module of the package (None: a folder LAYERS does not name)."""
    parts = module.split(".")
    if parts == ["moe_prefetch"]:
        return "face"
    if parts[1] == "__main__":
        return "cli"
    return parts[1] if parts[1] in LAYERS and parts[1] != "face" else None


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str, str]]:
    """(line, statement, imported module) for every import of the package in `source`, at any
    depth, relative or absolute. `from P import x` is the module P.x when there is one, else P
    (a name defined in P)."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "moe_prefetch":
                    found.append((node.lineno, ast.unparse(node), alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "moe_prefetch":
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                found.append((node.lineno, ast.unparse(node), target))
    return [(line, text, target) for line, text, target in found if target != module]


def violations(edges: list[tuple[str, int, str, str]]) -> list[str]:
    """Every (module, line, statement, imported module) that imports a layer above its own, or
    from a folder LAYERS does not name; each message names the file, the line and the import."""
    out = []
    for module, line, text, target in edges:
        here, there = layer_of(module), layer_of(target)
        where = f"{module.replace('.', '/')}.py:{line}: `{text}`"
        if here is None or there is None:
            unknown = module if here is None else target
            out.append(f"{where}: {unknown} is in no layer; add its package to LAYERS in tests/test_layers.py")
        elif LAYERS.index(there) > LAYERS.index(here):
            out.append(f"{where}: {here}/ imports {there}/, a layer above it (order: {' < '.join(LAYERS)})")
    return out


def package_edges(edges) -> set[tuple[str, str]]:
    return {
        (layer_of(m), layer_of(t)) for m, _, _, t in edges if layer_of(m) and layer_of(t) and layer_of(m) != layer_of(t)
    }


def all_edges() -> list[tuple[str, int, str, str]]:
    known = set(modules())
    return [
        (name, line, text, target)
        for name, path in modules().items()
        for line, text, target in imports_of(path.read_text(), name, path.name == "__init__.py", known)
    ]


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among `graph`'s modules (depth-first search), or None."""
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


# -- the checkers can fail ----------------------------------------------------------------
KNOWN = {
    "moe_prefetch",
    "moe_prefetch.errors",
    "moe_prefetch.runtime",
    "moe_prefetch.runtime.store",
    "moe_prefetch.runtime.cache",
    "moe_prefetch.model",
    "moe_prefetch.model.loading",
    "moe_prefetch.experts.layout",
}


@pytest.mark.parametrize(
    "source",
    [
        "from ..model.loading import load\n",  # relative, top level
        "def f():\n    from ..model import loading\n",  # relative, inside a function, a module by name
        "def f():\n    import moe_prefetch.model.loading\n",  # absolute import, inside a function
        "from moe_prefetch.model.loading import load\n",  # absolute from
        "from moe_prefetch import load\n",  # the public face, from below it
        "class A:\n    def f(self):\n        from .. import load\n",  # the face, relative, in a method
    ],
)
def test_a_lower_layer_importing_a_higher_one_fails(source):
    found = imports_of(source, "moe_prefetch.runtime.store", False, KNOWN)
    bad = violations([("moe_prefetch.runtime.store", line, text, target) for line, text, target in found])
    assert len(bad) == 1 and "moe_prefetch/runtime/store.py" in bad[0] and "runtime/ imports" in bad[0], bad


def test_downward_and_sideways_imports_pass():
    source = "from .cache import Key\nfrom ..experts.layout import X\nfrom ..errors import E\nfrom .. import errors\n"
    found = imports_of(source, "moe_prefetch.runtime.store", False, KNOWN)
    assert {t for _, _, t in found} == {
        "moe_prefetch.runtime.cache",
        "moe_prefetch.experts.layout",
        "moe_prefetch.errors",
    }
    assert violations([("moe_prefetch.runtime.store", *f) for f in found]) == []


def test_a_folder_in_no_layer_fails():
    assert (
        "in no layer"
        in violations([("moe_prefetch.utils.misc", 1, "from ..errors import E", "moe_prefetch.errors")])[0]
    )


def test_the_cycle_checker_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


# -- the package ------------------------------------------------------------------------
def test_the_walk_sees_known_edges():
    edges = {(m, t) for m, _, _, t in all_edges()}
    assert ("moe_prefetch.model.integration", "moe_prefetch.runtime.runtime") in edges
    assert ("moe_prefetch.runtime.runtime", "moe_prefetch.runtime.scheduler") in edges
    assert ("moe_prefetch.model.offline", "moe_prefetch.model.loading") in edges
    assert ("moe_prefetch.report.profiling", "moe_prefetch.evidence.sim") in edges  # lazy, inside a function
    assert ("moe_prefetch.cli.commands", "moe_prefetch.runtime.profiles") in edges  # `from P import module as x`


def test_every_module_imports_only_its_own_layer_or_below():
    edges = all_edges()
    assert len(edges) > 100
    bad = violations(edges)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_two_packages_import_each_other():
    pairs = package_edges(all_edges())
    mutual = sorted({tuple(sorted(p)) for p in pairs if p[::-1] in pairs})
    assert not mutual, f"packages that import each other: {mutual}"


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for module, _, _, target in all_edges():
        graph.setdefault(module, set()).add(target)
    found = cycle(graph)
    assert found is None, "import cycle: " + " -> ".join(found)


def test_every_module_is_in_a_layer():
    missing = sorted(m for m in modules() if layer_of(m) is None)
    assert not missing, f"modules in no layer (add the package to LAYERS): {missing}"


def test_the_package_root_holds_only_the_packages():
    """moe_prefetch/ holds its subpackages, __init__, __main__, errors and the demo data folders."""
    packages = {layer for layer in LAYERS if layer not in ("errors", "face")}
    allowed = {"__init__.py", "__main__.py", "errors.py", *packages, *DATA_FOLDERS}
    # hidden files (an editor's temporary copy) are not the package's: the wheel never ships them
    present = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__" and not p.name.startswith(".")}
    assert present <= allowed, f"unexpected in moe_prefetch/: {sorted(present - allowed)}"
    assert {p for p in packages if (PACKAGE / p / "__init__.py").is_file()} == packages


@pytest.mark.parametrize("package", [p for p in LAYERS if p not in ("errors", "face")])
def test_each_package_says_what_it_holds_and_may_import(package):
    """A short docstring and nothing else: importing a package costs nothing (the CLI's --help
    stays free of torch), and its layer is written where a reader opens it."""
    init = PACKAGE / package / "__init__.py"
    tree = ast.parse(init.read_text())
    doc = ast.get_docstring(tree)
    assert doc and "Layer:" in doc, f"{init}: docstring should say what it holds and (Layer: ...) what it may import"
    assert len(tree.body) == 1, f"{init}: only a docstring, no code or imports"
    assert len(init.read_text().splitlines()) <= 12


def test_pyproject_ships_every_package_and_the_profiles():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    data = {
        ".".join(p.relative_to(ROOT).parts)
        for p in PACKAGE.rglob("*")
        if p.is_dir() and p.name != "__pycache__" and not (p / "__init__.py").exists()
    }
    assert set(setuptools["packages"]) == packages | data
    shipped = {
        path
        for package, patterns in setuptools["package-data"].items()
        for pattern in patterns
        for path in (ROOT / package.replace(".", "/")).glob(pattern)
    }
    assert {p for p in SHIPPED_DIR.rglob("*") if p.is_file()} <= shipped
