"""`kvgrid bench ...` (workloads, replay, the store's reuse, the router, the simulator's
experiments and its check against a live run) and `kvgrid sim` (the fleet simulator).

Every command is a module with ``add_args(parser)`` and ``run(args) -> int``; a group of
commands is one module too, whose ``add_args`` adds the group's own subcommands (each with
its ``func``). Adding a command, or a group, is one line in ``BENCH_COMMANDS``. The GPU
benchmarks (``kvgrid bench gpu NAME``) add their own group, each benchmark parsing its own
arguments. Input a command cannot use (a ValueError, a missing file) ends it with one line
naming the problem and exit status 2 (the traceback at --log-level DEBUG).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from kvgrid.bench.gpu import add_cli as add_gpu_cli

log = logging.getLogger(__name__)

# name -> (module, help)
BENCH_COMMANDS: dict[str, tuple[str, str]] = {
    "workload": (
        "kvgrid.bench.workloads",
        "statistics and theoretical hit rate of a workload",
    ),
    "replay": (
        "kvgrid.bench.replay",
        "replay a workload against an OpenAI-compatible server",
    ),
    "reuse": (
        "kvgrid.bench.reuse_report",
        "what the context store gives on this hardware: a saturating multi-turn agent workload "
        "under no store, G2, G3, G4 and an unlimited-G1 ceiling",
    ),
    "router": (
        "kvgrid.bench.router_bench",
        "the router alone: decision latency, index update rate",
    ),
    "experiments": (
        "kvgrid.bench.experiments",
        "the fleet simulator's experiments: policy, balance, planner, scale",
    ),
    "sim-vs-live": (
        "kvgrid.bench.sim_vs_live",
        "calibrate on this machine, replay live, simulate the same and compare",
    ),
}
SIM_COMMAND = ("kvgrid.bench.sim.cli", "discrete-event fleet simulator (the real router)")


def _clean_errors(run: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    def call(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, FileNotFoundError) as e:
            log.debug("kvgrid %s failed", args.command, exc_info=True)
            print(f"error: {e}", file=sys.stderr)
            return 2

    return call


def _add(sub: argparse._SubParsersAction, name: str, module_name: str, help: str) -> None:
    module = importlib.import_module(module_name)
    p = sub.add_parser(name, help=help, description=help)
    module.add_args(p)
    p.set_defaults(func=_clean_errors(module.run))


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: workloads, replay, store, router, simulator")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    bench.set_defaults(func=lambda a: (bench.print_help(), 2)[1])
    for name, (module_name, help) in BENCH_COMMANDS.items():
        _add(bsub, name, module_name, help)
    add_gpu_cli(bsub)
    _add(sub, "sim", *SIM_COMMAND)
