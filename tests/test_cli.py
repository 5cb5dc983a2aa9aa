"""The `kvgrid` command tree: the benchmark commands in one place, logging configured once,
and `kvgrid chat --url` against a running server (conftest.api_server)."""

from __future__ import annotations

import ast
import builtins
import json
import re
from pathlib import Path

import httpx
import pytest

from kvgrid.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1] / "kvgrid"
QUESTION = "What is the capital of France?"
# long enough that its blocks (64 tokens on the server) are cached after the first turn
SYSTEM = (
    "You are a helpful assistant who answers geography questions in one short sentence. "
    "You name the country, its capital and nothing else; you never add a greeting, a "
    "caveat, a list or a follow-up question, and you keep to plain words that a child "
    "would understand. When a question is not about geography, you say that you only "
    "answer questions about countries, capitals, rivers, mountains and seas."
)


def _subcommands(parser) -> dict:
    return next(a for a in parser._actions if a.dest in ("command", "bench_command")).choices


def test_one_command_tree():
    top = _subcommands(build_parser())
    assert {"bench", "sim", "chat", "serve"} <= set(top)
    bench = _subcommands(top["bench"])
    assert set(bench) >= {"replay", "reuse", "router", "experiments", "sim-vs-live", "workload"}
    for name, p in [*bench.items(), ("sim", top["sim"])]:
        assert p.get_default("func") is not None, name


def test_logging_is_configured_in_one_place(monkeypatch, capsys):
    calls = [
        str(p.relative_to(ROOT.parent))
        for p in ROOT.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "basicConfig"
    ]
    assert calls == ["kvgrid/logs.py"]
    monkeypatch.setenv("KVGRID_LOG", "LOUD")
    with pytest.raises(SystemExit) as e:
        main(["bench", "workload", "chat"])
    assert e.value.code == 2
    assert "unknown log level 'LOUD'" in capsys.readouterr().err


def _usage(err: str) -> list[tuple[int, int, int]]:
    return [
        tuple(map(int, m))
        for m in re.findall(r"\[(\d+) tokens; (\d+) of (\d+) prompt tokens from cache\]", err)
    ]


def test_chat_with_a_running_server(api_server, monkeypatch, capsys):
    url, headers = api_server
    want = httpx.post(
        f"{url}/v1/chat/completions",
        headers=headers,
        json={
            "model": httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"],
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTION},
            ],
            "max_tokens": 8,
            "temperature": 0,
        },
        timeout=120,
    ).json()["choices"][0]["message"]["content"]
    key = headers["Authorization"].removeprefix("Bearer ")
    argv = ["chat", "--url", url, "--system", SYSTEM, "--max-tokens", "8"]

    monkeypatch.setenv("KVGRID_API_KEY", key)  # what --api-key defaults to
    assert main([*argv, QUESTION]) == 0
    out = capsys.readouterr()
    assert out.out == want + "\n"
    assert _usage(out.err)[0][0] == 8

    # interactive: the second turn carries the first, and the server's cache serves it
    lines = iter([QUESTION, "And of Italy?"])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out.startswith("assistant> " + want + "\nassistant> ")
    (n1, _, p1), (n2, cached2, p2) = _usage(out.err)
    assert n1 == n2 == 8 and p2 > p1 > 64 and cached2 >= 64

    monkeypatch.delenv("KVGRID_API_KEY")
    assert main([*argv, QUESTION]) == 1
    assert "HTTP 401" in capsys.readouterr().err
    assert main([*argv, "--api-key", key, "--max-num-seqs", "4", QUESTION]) == 2
    assert "--max-num-seqs configure a local engine" in capsys.readouterr().err


def test_chat_help_says_what_runs_where(capsys):
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Without --url, chat loads the model into an engine of its own" in text


def test_sim_runs_and_its_link_flag_reaches_the_simulator(tmp_path, capsys):
    argv = ["sim", "--workload", "docqa:seed=1", "--workers", "4", "--disagg"]
    argv += ["--prefill-workers", "2"]
    ttft = []
    for extra in ([], ["--link-gbps", "1"]):
        out = tmp_path / f"sim{len(extra)}.json"
        assert main([*argv, *extra, "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["completed"] == 80
        ttft.append(res["ttft_p50_s"])
    assert ttft[1] > 2 * ttft[0]  # a 1 Gb/s link makes every remote prefill wait for its KV
    capsys.readouterr()
    assert main([*argv, "--link-gbps", "0"]) == 2
    assert "--link-gbps must be positive" in capsys.readouterr().err
