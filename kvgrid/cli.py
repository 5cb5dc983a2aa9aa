"""The `kvgrid` command. Each part registers its own subcommands; this file only dispatches."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from kvgrid import envs
from kvgrid.logs import LEVELS, setup_logging

# module -> it provides `register(subparsers)`, adding one or more subcommands whose
# parsers set `func` (called with the parsed args, returning an exit code).
_PARTS = (
    "kvgrid.engine.cli",  # generate, chat
    "kvgrid.server.cli",  # serve, worker, router
    "kvgrid.store.cli",  # store
    "kvgrid.bench.cli",  # bench, sim
    "kvgrid.chaos.cli",  # chaos
)
# Long-running services log what they do; the other commands print their results and log
# only what goes wrong.
_LOG_DEFAULTS = {"serve": "INFO", "worker": "INFO", "router": "INFO"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvgrid", description="LLM inference that keeps and reuses the KV cache"
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default=None,
        help="log level of this process and the ones it starts (default: $KVGRID_LOG, else "
        "INFO for serve, worker and router, WARNING for the others)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that part is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.log_level:  # the processes this one starts (workers, benchmarks) log alike
        os.environ[envs.KVGRID_LOG.name] = args.log_level
    try:
        setup_logging(args.log_level, _LOG_DEFAULTS.get(args.command, "WARNING"))
    except ValueError as e:
        parser.error(str(e))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
