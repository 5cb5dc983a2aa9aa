"""Every registered GPU benchmark imports on a machine without a GPU and answers --help, both
as ``python -m kvgrid.bench.gpu.NAME`` (its own ``main``) and as ``kvgrid bench gpu NAME``."""

import importlib
import pkgutil

import pytest

import kvgrid.bench.gpu as gpu
from kvgrid.bench.gpu import BENCHES
from kvgrid.cli import main as kvgrid_main

# parts of the package that are not benchmarks themselves
SHARED = {"harness", "store_common", "store_probes", "store_steps", "engine_common", "engine_steps"}


def test_every_module_is_registered_or_shared():
    modules = {m.name for m in pkgutil.iter_modules(gpu.__path__)}
    assert modules - SHARED == set(BENCHES), "register each benchmark module in BENCHES"


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_help_through_both_entry_points(name, capsys):
    mod = importlib.import_module(f"kvgrid.bench.gpu.{name}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    direct = capsys.readouterr().out
    assert f"usage: python -m kvgrid.bench.gpu.{name}" in direct
    with pytest.raises(SystemExit) as e:
        kvgrid_main(["bench", "gpu", name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out == direct


def test_unknown_benchmark_is_named():
    with pytest.raises(KeyError, match="unknown GPU benchmark 'nope'"):
        gpu.load("nope")


def test_the_smoke_run_covers_every_benchmark():
    from kvgrid.bench.gpu.smoke import SMOKES

    # phase modules run inside `engine` and `store`; the trained-weights floor needs a download
    covered = {n for n in BENCHES if n.startswith(("engine_", "store_")) and n != "engine_offline"}
    assert set(BENCHES) - covered - {"smoke", "bf16_floor_trained"} == set(SMOKES)
