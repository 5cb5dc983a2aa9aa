"""The package layout's rules. Imports point one way: no module imports one that (through
others) imports it back, no package of kvgrid does so at package level, models build on
layers alone, and benchmarks, workloads and the simulator (kvgrid.bench) use the system
while nothing in the system imports them. Every file stays short enough to read (Triton
kernel files excepted)."""

import ast
import functools
import itertools
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "kvgrid"
MAX_LINES = 600
LENGTH_CHECKED = (REPO / "kvgrid", REPO / "tests")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_nothing_outside_bench_imports_bench():
    offenders = {
        str(p.relative_to(ROOT.parent)): sorted(
            m for m in imported_modules(p) if m == "kvgrid.bench" or m.startswith("kvgrid.bench.")
        )
        for p in ROOT.rglob("*.py")
        if ROOT / "bench" not in p.parents
    }
    assert not {f: m for f, m in offenders.items() if m}


def test_the_store_never_imports_the_engine():
    """The engine calls the store through ``store/connector.py``; the store imports nothing
    of the engine, so the two packages stay one-way."""
    offenders = {
        str(p.relative_to(ROOT.parent)): sorted(
            m for m in imported_modules(p) if m == "kvgrid.engine" or m.startswith("kvgrid.engine.")
        )
        for p in (ROOT / "store").rglob("*.py")
    }
    assert not {f: m for f, m in offenders.items() if m}


def test_the_check_sees_an_import_of_bench(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from kvgrid.bench.planner import Planner\n")
    assert "kvgrid.bench.planner" in imported_modules(f)


# ---- the import graph -------------------------------------------------------------------------


def module_paths(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root`` by dotted name (a package by its own name)."""
    mods = {}
    for p in root.rglob("*.py"):
        parts = (root.name, *p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that can run: all but the body of ``if TYPE_CHECKING:`` (its else runs).
    Imports inside functions count: they run, and a cycle through them still ties the
    modules together."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports. ``from p import name`` points at
    the submodule ``p.name`` where there is one, else at ``p``; relative imports are resolved.
    (Imports by a computed name, ``importlib.import_module(f"...")``, are not seen.)"""
    mods = module_paths(root)

    def deepest_module(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: package.count(".") + 2 - node.level]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                found = deepest_module(target)
                if found is not None and found != mod:
                    graph[mod].add(found)
    return graph


def pkg(module: str) -> str:
    """``root.<package>`` of a module (a top-level module is its own package)."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between packages: an edge where a module imports another package's."""
    out: dict[str, set[str]] = {pkg(m): set() for m in graph}
    for a, targets in graph.items():
        out[pkg(a)].update(pkg(b) for b in targets if pkg(b) != pkg(a))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan): each holds a cycle."""
    order = itertools.count()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = next(order)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe(graph: dict[str, set[str]], components: list[list[str]], group=lambda m: m) -> str:
    """Each component, then the module imports that close it (``group``: module -> node)."""
    lines = []
    for comp in components:
        members = set(comp)
        lines.append(" <-> ".join(comp))
        lines += [
            f"    {a} -> {b}"
            for a in sorted(graph)
            if group(a) in members
            for b in sorted(graph[a])
            if group(b) in members and group(b) != group(a)
        ]
    return "\n".join(lines)


@functools.cache
def kvgrid_graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_no_module_import_cycles():
    graph = kvgrid_graph()
    # the builder sees the real imports (an empty graph would pass)
    assert "kvgrid.layers.attention.base" in graph["kvgrid.models.llama"]
    found = cycles(graph)
    assert not found, "import cycles between modules:\n" + describe(graph, found)


def test_no_package_import_cycles():
    modules = kvgrid_graph()
    graph = package_graph(modules)
    assert "kvgrid.layers" in graph["kvgrid.models"]
    found = cycles(graph)
    assert not found, "import cycles between packages:\n" + describe(modules, found, pkg)


def test_models_build_on_layers_and_layers_on_nothing_of_kvgrid():
    graph = kvgrid_graph()
    # kvgrid.envs (the declared environment variables) is a leaf: it imports nothing of kvgrid
    assert graph["kvgrid.envs"] == set()
    allowed = {
        "kvgrid.layers": ("kvgrid.layers", "kvgrid.envs"),
        "kvgrid.models": ("kvgrid.models", "kvgrid.layers", "kvgrid.envs"),
    }
    wrong = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if pkg(m) in allowed
        for t in targets
        if pkg(t) not in allowed[pkg(m)]
    )
    assert not wrong


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_the_cycle_check_sees_cycles(tmp_path):
    root = tmp_path / "pkg"
    _write(
        root,
        {
            "__init__.py": "",
            "a/__init__.py": "",
            "a/x.py": "def f():\n    from pkg.b import y\n",  # in a function: still an edge
            "b/__init__.py": "",
            "b/y.py": "from ..a import x\n",  # relative, ``from package import submodule``
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n",
            "d.py": "from pkg import c\n",  # only a TYPE_CHECKING import back: no cycle
            "f.py": "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    import pkg.g\n",
            "g.py": "from . import f\n",  # the else branch of TYPE_CHECKING runs: a cycle
            "h.py": "from pkg.a import nothing_such\nimport os\n",  # falls back to pkg.a
        },
    )
    graph = import_graph(root)
    assert graph["pkg.h"] == {"pkg.a"}
    assert graph["pkg.c"] == set() and graph["pkg.d"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a.x", "pkg.b.y"], ["pkg.f", "pkg.g"]]
    assert cycles(package_graph(graph)) == [["pkg.a", "pkg.b"], ["pkg.f", "pkg.g"]]
    assert "pkg.a.x -> pkg.b.y" in describe(graph, cycles(graph))
    assert "pkg.b.y -> pkg.a.x" in describe(graph, cycles(package_graph(graph)), pkg)


# ---- file length ------------------------------------------------------------------------------


def is_kernel_file(path: Path) -> bool:
    """Triton kernel files (``*_kernel.py``, ``*_kernels.py`` defining ``@triton.jit``
    functions) may run long: a kernel is one function with its tile logic, kept apart from
    the Python that launches it."""
    return bool(re.search(r"_kernels?\.py$", path.name)) and "@triton.jit" in path.read_text()


def long_files(roots: tuple[Path, ...], limit: int = MAX_LINES) -> dict[str, int]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            n = len(p.read_text().splitlines())
            if n > limit and not is_kernel_file(p):
                out[str(p.relative_to(root.parent))] = n
    return out


def test_no_file_over_600_lines_outside_kernels():
    found = long_files(LENGTH_CHECKED)
    assert not found, f"over {MAX_LINES} lines: " + ", ".join(
        f"{f} ({n})" for f, n in found.items()
    )


def test_the_length_check_sees_a_long_file(tmp_path):
    long = "x = 1\n" * (MAX_LINES + 1)
    _write(
        tmp_path / "t",
        {
            "ok.py": "x = 1\n" * MAX_LINES,
            "big.py": long,
            "big_kernels.py": long,  # named like a kernel file but no kernel in it
            "real_kernels.py": "import triton\n@triton.jit\ndef k():\n    pass\n" + long,
        },
    )
    assert set(long_files((tmp_path / "t",))) == {"t/big.py", "t/big_kernels.py"}
