"""The library's import graph: every import points down the layer order below (lazy imports
inside functions count too), nothing imports itself back through others, and the package root
stays small."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "dfq"

# Bottom to top: a module may import its own layer and the layers below it, never one above.
LAYERS = [
    {"dfq.errors", "dfq.utils"},
    {"dfq.config"},
    {"dfq.graph", "dfq.models"},
    {"dfq.statistics"},
    {"dfq.records"},
    {"dfq.quant"},
    {"dfq.transforms", "dfq.data"},
    {"dfq.runtimes"},
    {"dfq.reporting"},
    {"dfq.pipeline"},
    {"dfq.tasks"},
    {"dfq.app"},
    {"dfq.cli", "dfq.__main__"},
    {"dfq"},  # the public face
]
MAX_ROOT_MODULES = 8


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """dfq module -> the dfq modules it imports (a `from package import name` that names a
    submodule is an import of that submodule)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                deps |= subs or {node.module}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest listed prefix of `module`."""
    best, depth = None, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    assert best is not None, f"{module} is in no layer of tests/test_layering.py"
    return best


def test_every_module_has_a_layer():
    for m in import_graph():
        layer_of(m)


def test_no_import_points_up():
    climbs = sorted(
        f"{m} -> {d}"
        for m, deps in import_graph().items()
        for d in deps
        if layer_of(d) > layer_of(m)
    )
    assert climbs == [], "\n".join(climbs)


def test_nothing_outside_the_cli_imports_it():
    offenders = {
        m: sorted(d)
        for m, deps in import_graph().items()
        if not m.startswith("dfq.cli")
        and (d := {x for x in deps if x == "dfq.cli" or x.startswith("dfq.cli.")})
    }
    assert offenders == {} or set(offenders) == {"dfq.__main__"}, offenders


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_the_package_root_is_small():
    root = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_the_graph_is_read_as_intended():
    """Guards the tests above against reading nothing."""
    g = import_graph()
    assert {"dfq.pipeline", "dfq.runtimes.ort.profile", "dfq.cli.commands"} <= set(g)
    assert "dfq.runtimes" in g["dfq.pipeline"] and "dfq.cli.options" in g["dfq.cli.commands"]
    assert layer_of("dfq.cli.commands") > layer_of("dfq.pipeline") > layer_of("dfq.quant.weights")


def test_each_runtime_is_one_package_found_by_the_registry():
    """A runtime is a package dfq/runtimes/<pkg>/ exposing RUNTIME (profile, exporter, runner,
    the pyproject extra that installs it); the registry finds it, and nothing outside its own
    package (tests aside) names its modules: adding one touches nothing else."""
    from dfq import runtimes
    from dfq.runtimes.base import Runtime

    folder = ROOT / "runtimes"
    packages = sorted(p.name for p in folder.iterdir() if (p / "__init__.py").exists())
    assert {"ort", "ncnn"} <= set(packages)
    pyproject = (ROOT.parent / "pyproject.toml").read_text()
    found = []
    for pkg in packages:
        runtime = getattr(importlib.import_module(f"dfq.runtimes.{pkg}"), "RUNTIME", None)
        if runtime is None:
            continue
        assert isinstance(runtime, Runtime), pkg
        found.append(runtime.name)
        assert runtime.name in runtimes.names() and runtime.name in runtimes.backends()
        assert runtime.format in runtimes.formats()
        assert runtimes.profile(runtime.name) is runtime is runtimes.by_format(runtime.format)
        assert re.search(rf"^{runtime.extra} = \[", pyproject, re.M), runtime.extra
        for module in ("profile", "export", "runner"):
            assert (folder / pkg / f"{module}.py").exists(), f"{pkg}/{module}.py"
    assert sorted(found) == sorted(runtimes.backends())
    assert runtimes.names() == ["generic", *runtimes.backends()]

    mention = re.compile(rf"dfq[./]runtimes[./]({'|'.join(packages)})\b")
    sources = [*ROOT.rglob("*.py"), *(ROOT.parent / "benchmarks").rglob("*.py")]
    named = sorted(
        str(p.relative_to(ROOT.parent))
        for p in sources
        if folder not in p.parents and mention.search(p.read_text())
    )
    assert named == [], named
    imports = sorted(
        f"{m} -> {d}"
        for m, deps in import_graph().items()
        for d in deps
        if not m.startswith("dfq.runtimes.")
        and any(
            d == f"dfq.runtimes.{pkg}" or d.startswith(f"dfq.runtimes.{pkg}.") for pkg in packages
        )
    )
    assert imports == [], imports
