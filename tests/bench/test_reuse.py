"""`kvgrid bench reuse`: the closed-loop agent workload and a short run of every
configuration on the CPU (JSON, plot, hit rates against the theoretical one, bit-exact KV)."""

from __future__ import annotations

import json

import pytest

from kvgrid.bench.reuse import AgentWorkload


def test_theoretical_hit_rate_counts_each_rounds_reusable_full_blocks():
    wl = AgentWorkload(conversations=2, rounds=3, context_tokens=40, user_tokens=10,
                       answer_tokens=6, system_tokens=16)  # fmt: skip
    # prompts 56, 72, 88 per conversation; round r reuses the full 16-token blocks of the
    # last prompt plus its answer but the last token (61 -> 48, 77 -> 64); the second
    # conversation also finds the shared system prompt (16) in its first round
    hit = 2 * (48 + 64) + 16
    assert wl.theoretical_hit_rate(16) == hit / (2 * (56 + 72 + 88))
    assert wl.max_tokens == 16 + 40 + 2 * 10 + 3 * 6
    vocab = 1000
    assert wl.first_prompt(0, vocab)[:16] == wl.first_prompt(1, vocab)[:16]  # shared system
    assert wl.first_prompt(0, vocab)[16:] != wl.first_prompt(1, vocab)[16:]
    assert wl.user_turn(0, 1, vocab) == wl.user_turn(0, 1, vocab)  # seeded, repeatable


def test_bench_reuse_runs_every_configuration(tmp_path, tiny_model_dir, capsys):
    from kvgrid.cli import main

    out = tmp_path / "reuse.json"
    rc = main([
        "bench", "reuse", "--model", str(tiny_model_dir("llama")), "--device", "cpu",
        "--conversations", "3", "--rounds", "2", "--context-tokens", "48",
        "--user-tokens", "16", "--answer-tokens", "4", "--max-num-seqs", "1",
        "--block-size", "16", "--guarantee-tokens", "48", "--no-progress",
        "--disk-dir", str(tmp_path / "d3"), "--shared-dir", str(tmp_path / "d4"),
        "--configs", "none,g2,g3,g4+wt+noprocs,ceiling", "--out", str(out), "--prompt-drain-s", "0",
        "--fetch-procs", "1", "--write-procs", "1",
    ])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ceiling" in printed and "theoretical hit rate" in printed
    res = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    r = res["results"]
    assert list(r) == ["none", "g2", "g3", "g4+wt+noprocs", "ceiling"]
    theory = res["workload"]["theoretical_hit_rate"]
    assert 0.4 < theory < 0.7
    # G1 capped to one running conversation: without a store the histories are lost; with
    # G2 (room for all of them) or an unbounded G1 every reusable block is reused
    assert r["none"]["hit_rate"] < theory - 0.1
    assert abs(r["ceiling"]["hit_rate"] - theory) < 1e-9
    assert r["g2"]["hit_rate"] > r["ceiling"]["hit_rate"] - 0.02
    for name in ("g2", "g3", "g4+wt+noprocs"):
        kv = r[name]["kv_check"]
        assert kv["loaded"] > 0 and kv["bit_exact"] == kv["loaded"]
        assert r[name]["guarantee"][0]["cached_tokens"] > 0
        assert r[name]["store"]["g1_writebacks"]
    # greedy answers do not depend on where the KV came from
    answers = {n: sorted((q["conversation"], q["round"], q["answer_sha"])
                         for q in r[n]["per_request"]) for n in r}  # fmt: skip
    assert all(a == answers["none"] for a in answers.values())
    s = res["summary"]
    assert s["ceiling"]["ceiling_gain_fraction"] == 1.0 and s["none"]["speedup_vs_none"] == 1.0
    assert res["workload"]["conversations"] == 3 and len(r["g3"]["per_request"]) == 6
    assert res["engine"]["prompt_drain_s"] == 0.0  # the engine took the flag
    assert res["store"] == {"fetch_procs": 1, "fetch_procs_run": 1,
                            "write_procs": 1, "write_procs_run": 1}  # fmt: skip
    # write-through by default where G2 holds what G1 can cache (g2), not where G2 is
    # smaller (g3); +wt forces it
    assert r["g2"]["write_through"] and not r["g3"]["write_through"]
    assert r["g4+wt+noprocs"]["write_through"]
    # the flags' processes in every store but the one that asks for none
    assert r["g3"]["procs"] == {"fetch": 1, "write": 1}
    assert r["g4+wt+noprocs"]["procs"] == {"fetch": 0, "write": 0}
    # the engine thread's time per step: planning and launching it, in the trace too
    for name in r:
        sp = r[name]["steps"]
        ls = sp["launch_s"]
        assert ls["decode_only"] > 0 and ls["with_prompt"] > 0
        trace = sp["trace"]
        assert len(trace) == sp["steps"] and all(len(row) == 8 for row in trace)
        assert abs(sum(row[7] for row in trace) - ls["decode_only"] - ls["with_prompt"]) < 1e-2
        assert all(row[7] <= row[0] for row in trace if row[1] or row[2])
    assert "engine thread: planning" in printed


def test_g2_holds_every_history_below_its_high_watermark(tmp_path, tiny_model_dir):
    """The g2 configuration is G2 "for every history": G2 evicts down to its low watermark
    once a write would pass the high one, so it is sized past that, or a long run evicts
    histories still to be reused (found at lookup, gone at load: lost hits)."""
    from kvgrid.bench.reuse import store_configs
    from kvgrid.engine.llm_engine import LLMEngine

    eng = LLMEngine(model=str(tiny_model_dir("llama")), device="cpu", block_size=16,
                    num_kv_blocks=64)  # fmt: skip
    wl = AgentWorkload(32, 6, 4096, 256, 64)
    (cfg,) = store_configs(eng, wl, ["g2"], 64, 32, tmp_path / "d3", tmp_path / "d4")
    histories = wl.conversations * -(-wl.max_tokens // 16) * eng.runner.kv_cache[0].nbytes
    assert cfg.store.g2_bytes * cfg.store.high_watermark >= histories


def test_a_configurations_options_are_checked():
    from kvgrid.bench.reuse import config_options

    assert config_options("g4+nowt+noprocs") == (
        "g4",
        {"write_through": False, "fetch_procs": 0, "write_procs": 0},
    )
    assert config_options("ceiling") == ("ceiling", {})
    with pytest.raises(ValueError, match="unknown option 'fast'"):
        config_options("g3+fast")
    with pytest.raises(ValueError, match="unknown option 'noprocs'"):
        config_options("none+noprocs")  # no store to take it
