"""The package layout's one-way rule: benchmarks, workloads and the simulator (kvgrid.bench)
use the system; nothing in the system imports them (the planner lives in kvgrid.planner)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kvgrid"


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
