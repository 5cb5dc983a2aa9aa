"""`kvgrid bench ...` (workloads, replay, the store's reuse, the router, the simulator's
experiments and its check against a live run) and `kvgrid sim` (the fleet simulator).

Every command is a module with ``add_args(parser)`` and ``run(args) -> int``; a group of
commands is one module too, whose ``add_args`` adds the group's own subcommands (each with
its ``func``). Adding a command, or a group, is one line in ``BENCH_COMMANDS``. The GPU
benchmarks (``kvgrid bench gpu NAME``) add their own group, each benchmark parsing its own
arguments.
"""

from __future__ import annotations

import argparse
import importlib

from kvgrid.bench.gpu import add_cli as add_gpu_cli

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


def _add(sub: argparse._SubParsersAction, name: str, module_name: str, help: str) -> None:
    module = importlib.import_module(module_name)
    p = sub.add_parser(name, help=help, description=help)
    module.add_args(p)
    p.set_defaults(func=module.run)


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: workloads, replay, store, router, simulator")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    bench.set_defaults(func=lambda a: (bench.print_help(), 2)[1])
    for name, (module_name, help) in BENCH_COMMANDS.items():
        _add(bsub, name, module_name, help)
    add_gpu_cli(bsub)
    _add(sub, "sim", *SIM_COMMAND)
