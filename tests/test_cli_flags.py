"""Every flag of every `kvgrid` command keeps its name, default and meaning: the parser is
compared with tests/data/cli_flags.json, a dump of the flags as they were written by hand
before they were generated from the config dataclasses (kvgrid.flags). Never regenerate
it: a new flag is an addition this test lists."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Literal

import pytest

from kvgrid.cli import build_parser
from kvgrid.flags import add_dataclass_args, dataclass_from_args, flag

EXPECTED = json.loads((Path(__file__).parent / "data" / "cli_flags.json").read_text())
ENGINE_COMMANDS = ("chat", "generate", "serve", "worker")
# flags EngineConfig's fields add (a `--no-x` switch gained its `--x`; fields that had none)
ADDED = {
    "--cuda-graphs",
    "--gemv",
    "--prefix-caching",
    "--prefill-first-burst",
    "--no-prefill-first-burst",
    "--mixed-step-slowdown",
    "--prompt-drain-s",
    "--max-logprobs",
    "--max-parked-seqs",
    "--kv-fetch-procs",  # a StoreConfig field: the store's fetch processes
    "--kv-write-procs",  # a StoreConfig field: the store's write processes
}
# commands added since the dump (the one command tree: the simulator's experiments and its
# check against a live run under `kvgrid bench`, and `kvgrid --log-level`) and flags added to
# existing commands (`kvgrid chat` talking to a running server; the engine's drain window
# and the store's fetch processes and writer threads in `kvgrid bench reuse`)
NEW_COMMANDS = {
    "",
    "bench experiments",
    "bench sim-vs-live calibrate",
    "bench sim-vs-live run",
    "bench sim-vs-live _measure",
}
ADDED_TO = {
    "chat": {"--url", "--api-key"},
    "bench reuse": {"--prompt-drain-s", "--fetch-procs", "--write-procs", "--io-workers"},
}
# defaults changed on purpose: the simulator never read `kvgrid sim --link-gbps` 400; unset,
# the calibration's transfer model applies, as it did. Guided decoding builds masks on half
# the CPUs (at most 8) unless told: one thread was the bottleneck of a batch of 64.
NEW_DEFAULTS = {
    ("sim", "--link-gbps"): None,
    **{(c, "--guided-mask-threads"): None for c in ENGINE_COMMANDS},
}


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


def _same_switch(old: dict, new: dict) -> bool:
    """A store_true switch became a `--x/--no-x` pair with the same meaning: `--no-x` (off
    by default) now defaults to on; `--x` (off by default) still defaults to off."""
    if old["action"] != "_StoreTrueAction" or new["action"] != "BooleanOptionalAction":
        return False
    flag = old["flags"][0]
    if flag.startswith("--no-"):
        return new["default"] is True and new["flags"] == ["--" + flag[5:], flag]
    return new["default"] is False and new["flags"] == [flag, "--no-" + flag[2:]]


def test_every_flag_keeps_its_name_default_and_kind():
    now = flag_table(build_parser())
    gpu = {c for c in now if c.startswith("bench gpu ")}  # each passes its arguments on
    assert set(now) - gpu == set(EXPECTED) | NEW_COMMANDS
    for command, flags in EXPECTED.items():
        by_string = {s: spec for spec in now[command].values() for s in spec["flags"]}
        by_string.update({k: v for k, v in now[command].items() if not v["flags"]})
        for name, old in flags.items():
            assert name in by_string, f"`kvgrid {command}` lost {name}"
            new = by_string[name]
            if (command, name) in NEW_DEFAULTS:
                old = {**old, "default": NEW_DEFAULTS[command, name]}
            assert new == old or _same_switch(old, new), f"`kvgrid {command} {name}` changed"
        was = {s for spec in flags.values() for s in spec["flags"]} | set(flags)
        added = set(by_string) - was
        want = (ADDED if command in ENGINE_COMMANDS else set()) | (
            {"--no-log-decisions"} if command in ("serve", "router") else set()
        )
        want |= ADDED_TO.get(command, set())
        assert added == want, command


def test_engine_flags_build_the_engine_config_they_did(monkeypatch, tmp_path):
    from kvgrid.engine.args import engine_config_from_args
    from kvgrid.engine.config import EngineConfig
    from kvgrid.store.config import GiB, StoreConfig

    monkeypatch.setenv("KVGRID_HOME", str(tmp_path))
    monkeypatch.delenv("KVGRID_STORE_DIR", raising=False)
    monkeypatch.delenv("KVGRID_KV_STORE_REDIS", raising=False)
    p = build_parser()
    cfg = engine_config_from_args(p.parse_args(["generate", "x"]))
    assert cfg == EngineConfig(kv_store=StoreConfig(g3_dir=tmp_path / "store" / "g3" / "local"))
    argv = ["--no-prefix-caching", "--no-cuda-graphs", "--no-gemv", "--async-scheduling", "on",
            "--kv-store-disk-gb", "0", "--kv-store-host-gb", "0.5", "--model", "m",
            "--num-kv-blocks", "7", "--guided-mask-threads", "3", "--dtype", "float16",
            "--kv-store-codec", "int8", "--kv-store-shared-dir", "/mnt/kv"]  # fmt: skip
    cfg = engine_config_from_args(p.parse_args(["generate", "x", *argv]), "w1")
    assert cfg == EngineConfig(
        model="m",
        dtype="float16",
        num_kv_blocks=7,
        enable_prefix_caching=False,
        cuda_graphs=False,
        async_scheduling=True,
        gemv=False,
        guided_mask_threads=3,
        kv_store=StoreConfig(
            g2_bytes=GiB // 2, g3_dir=None, g3_bytes=0, g4_dir="/mnt/kv", codec="int8"
        ),
    )
    assert (
        engine_config_from_args(p.parse_args(["generate", "x", "--no-kv-store"])).kv_store is None
    )


def test_serve_hands_its_engine_flags_to_workers_unchanged(monkeypatch, tmp_path):
    from kvgrid.engine.args import engine_config_from_args
    from kvgrid.server.serve import worker_argv

    monkeypatch.setenv("KVGRID_HOME", str(tmp_path))
    p = build_parser()
    for extra in ([], ["--no-gemv", "--async-scheduling", "off", "--mixed-step-slowdown", "2"]):
        args = p.parse_args(["serve", "--max-num-seqs", "9", *extra])
        argv = worker_argv(args, "w0", 8100, 1)
        wargs = p.parse_args(["worker", *argv[argv.index("worker") + 1 :]])
        assert engine_config_from_args(wargs, "w0") == engine_config_from_args(args, "w0")


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


def test_flags_from_a_dataclass_types_defaults_help_and_round_trip():
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        max_items: int = 4
        """most items (100% of them)"""
        ratio: float | None = None
        mode: Literal["a", "b"] = "a"
        fast: bool = True
        overlap: bool | None = None
        size: int = dataclasses.field(default=3 << 30, metadata=flag("size-gb", scale=1 << 30))
        hidden: dict = dataclasses.field(default_factory=dict, metadata=flag(cli=False))

    p = argparse.ArgumentParser()
    add_dataclass_args(p, Cfg)
    actions = {a.dest: a for a in p._actions}
    assert actions["max_items"].help == "most items (100%% of them)"  # argparse's escaping
    assert actions["mode"].choices == ["a", "b"] and actions["overlap"].choices[0] == "auto"
    assert "hidden" not in actions and actions["size_gb"].default == 3.0
    assert dataclass_from_args(Cfg, p.parse_args([])) == Cfg()
    args = p.parse_args(
        [
            "--max-items",
            "7",
            "--ratio",
            "0.5",
            "--mode",
            "b",
            "--no-fast",
            "--overlap",
            "off",
            "--size-gb",
            "0.5",
        ]
    )
    assert dataclass_from_args(Cfg, args, hidden={"k": 1}) == Cfg(
        7, 0.5, "b", False, False, 1 << 29, {"k": 1}
    )
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])

    @dataclasses.dataclass
    class Bad:
        table: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match=r"Bad\.table"):  # no flag for it, and it is not skipped
        add_dataclass_args(argparse.ArgumentParser(), Bad)


def test_server_flags_build_the_frontend_and_disagg_configs():
    from kvgrid.flags import dataclass_kwargs
    from kvgrid.router.disagg import DISAGG_FLAG_FIELDS, DisaggConfig
    from kvgrid.server.config import FrontendConfig

    argv = ["--max-migrations", "0", "--stall-timeout", "2", "--worker-wait", "1",
            "--queue-timeout", "9", "--log-decisions", "--disagg", "never",
            "--transfer-stall-s", "1", "--transfer-deadline-factor", "4"]  # fmt: skip
    args = build_parser().parse_args(["router", *argv])
    assert FrontendConfig(**dataclass_kwargs(FrontendConfig, args)) == FrontendConfig(
        log_decisions=True, max_migrations=0, stall_s=2.0, worker_wait_s=1.0, queue_timeout_s=9.0
    )
    disagg = dataclass_from_args(DisaggConfig, args, DISAGG_FLAG_FIELDS)
    assert disagg == DisaggConfig(mode="never", stall_s=1.0, deadline_factor=4.0)
    args = build_parser().parse_args(["serve"])
    assert FrontendConfig(**dataclass_kwargs(FrontendConfig, args)) == FrontendConfig()
    assert dataclass_from_args(DisaggConfig, args, DISAGG_FLAG_FIELDS) == DisaggConfig()
