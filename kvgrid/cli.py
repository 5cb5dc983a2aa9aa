"""The `kvgrid` command. Each part registers its own subcommands; this file only dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> it provides `register(subparsers)`, adding one or more subcommands whose
# parsers set `func` (called with the parsed args, returning an exit code).
_PARTS = (
    "kvgrid.engine.cli",  # generate, chat
    "kvgrid.server.cli",  # serve, worker, router
    "kvgrid.store.cli",  # store
    "kvgrid.bench.cli",  # bench, sim
    "kvgrid.chaos.cli",  # chaos
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvgrid", description="LLM inference that keeps and reuses the KV cache"
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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
