"""Every flag of every `kvgrid` command keeps its name, default and meaning: the parser is
compared with tests/data/cli_flags.json, a dump of the flags as they were written by hand
(regenerate nothing there; a new flag is an addition the test lists)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvgrid.cli import build_parser

EXPECTED = json.loads((Path(__file__).parent / "data" / "cli_flags.json").read_text())


def flag_table(parser: argparse.ArgumentParser) -> dict[str, dict[str, dict]]:
    """command -> first option string (or positional dest) -> what the action does."""
    out: dict[str, dict[str, dict]] = {}

    def walk(p: argparse.ArgumentParser, path: list[str]) -> None:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, [*path, name])
            elif not isinstance(a, argparse._HelpAction):
                d = a.default
                if not isinstance(d, (str, int, float, bool, type(None), list)):
                    d = repr(d)
                out.setdefault(" ".join(path), {})[
                    a.option_strings[0] if a.option_strings else a.dest
                ] = {
                    "flags": list(a.option_strings),
                    "default": d,
                    "choices": list(a.choices) if a.choices else None,
                    "type": getattr(a.type, "__name__", None) if a.type else None,
                    "nargs": a.nargs,
                    "action": type(a).__name__,
                }

    walk(parser, [])
    return out


def test_every_flag_keeps_its_name_default_and_kind():
    now = flag_table(build_parser())
    assert set(now) == set(EXPECTED)
    for command, flags in EXPECTED.items():
        by_string = {s: spec for spec in now[command].values() for s in spec["flags"]}
        by_string.update({k: v for k, v in now[command].items() if not v["flags"]})
        for name, old in flags.items():
            assert name in by_string, f"`kvgrid {command}` lost {name}"
            assert by_string[name] == old, f"`kvgrid {command} {name}` changed"


def test_flag_defaults_are_the_configs_defaults():
    from kvgrid.planner.planner import PlannerConfig
    from kvgrid.router.disagg import DisaggConfig
    from kvgrid.router.policies import DEFAULT_POLICY

    p = build_parser()
    for argv in (["serve"], ["router"], ["sim", "--workload", "w"]):
        args = p.parse_args(argv)
        assert args.ttft_target == PlannerConfig().ttft_target_s
        assert args.itl_target == PlannerConfig().itl_target_s == DisaggConfig().itl_target_s
        assert args.policy == DEFAULT_POLICY
    assert p.parse_args(["bench", "router"]).policy == DEFAULT_POLICY
