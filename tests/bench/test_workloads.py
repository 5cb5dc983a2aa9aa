"""Workloads: the Mooncake loader reproduces the trace README's numbers; generators are
deterministic under a seed and keep the prefix structure they promise."""

from __future__ import annotations

import itertools

import pytest

from kvgrid import keys
from kvgrid.bench import workloads as wl
from kvgrid.bench.mooncake import BUNDLED_TRACES, load_mooncake


def test_mooncake_hit_rates_match_readme(monkeypatch):
    monkeypatch.delenv("KVGRID_TRACES", raising=False)  # the traces shipped with the package
    conv = load_mooncake("conversation")
    syn = load_mooncake("synthetic")
    assert conv.meta["trace"] == str(BUNDLED_TRACES / "conversation_trace.jsonl")
    assert len(conv) == 12_031 and len(syn) == 3_993
    c, s = conv.theoretical_hit_rate(), syn.theoretical_hit_rate()
    assert round(100 * c["block_weighted"], 1) == 36.6
    assert round(100 * s["block_weighted"], 1) == 64.0
    assert round(100 * c["token_weighted"], 1) == 37.4
    assert round(100 * s["token_weighted"], 1) == 65.1
    assert conv.requests[-1].arrival_s == pytest.approx(3536.999)


def test_mooncake_traces_folder_overrides_the_bundled_one(tmp_path, monkeypatch):
    head = [line for line in (BUNDLED_TRACES / "synthetic_trace.jsonl").open()][:5]
    (tmp_path / "conversation_trace.jsonl").write_text("".join(head))
    monkeypatch.setenv("KVGRID_TRACES", str(tmp_path))
    w = load_mooncake("conversation")
    assert len(w) == 5 and w.meta["trace"] == str(tmp_path / "conversation_trace.jsonl")
    with pytest.raises(FileNotFoundError, match="KVGRID_TRACES"):
        load_mooncake("synthetic")


def test_mooncake_scaled_tokens_keep_prefix_chains(monkeypatch):
    monkeypatch.delenv("KVGRID_TRACES", raising=False)
    w = load_mooncake("conversation", tokens_per_block=64, max_input_tokens=640, limit=40)
    assert all(r.input_length <= 640 for r in w.requests)
    w.materialize()
    a, b = w.requests[0], w.requests[1]
    # every conversation request starts with hash id 0: the same first 64 tokens
    assert a.hash_ids[0] == b.hash_ids[0] == 0
    assert a.prompt_token_ids[:64] == b.prompt_token_ids[:64]
    assert a.prompt_token_ids[64:128] != b.prompt_token_ids[64:128]
    assert len(a.prompt_token_ids) == a.input_length
    assert all(256 <= t < w.vocab_size for t in a.prompt_token_ids)
    # engine-granularity hit rate: the server counts full 64-token blocks only
    scope = keys.KVScope("m", "bf16")
    seen: set[bytes] = set()
    hit = tot = 0
    for r in w.requests:
        ks = keys.block_keys(r.prompt_token_ids, scope, 64)
        n = 0
        for k in ks:
            if k not in seen:
                break
            n += 1
        hit += min(n, (r.input_length - 1) // 64) * 64
        tot += r.input_length
        seen.update(ks)
    assert w.theoretical_hit_rate(64)["token_weighted"] == pytest.approx(hit / tot)


def test_mooncake_copies_in_arrival_order(tmp_path):
    """Overlaid copies come out as a stable sort by arrival of copy 0, copy 1, ... laid end
    to end: ties (equal timestamps, within and across copies) keep copy, then file order."""
    import json

    recs = [(0, [0, 1]), (5, [0, 2]), (5, [3]), (5, [0, 1, 4]), (9, [5]), (12, [0, 2, 6])]
    lines = [
        {"timestamp": t, "input_length": 512 * len(h) - 7, "output_length": i, "hash_ids": h}
        for i, (t, h) in enumerate(recs)
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))

    def fields(r, hash_ids=None, request_id=None):
        return (r.arrival_s, r.max_tokens, r.input_length, hash_ids or r.hash_ids, request_id)

    one = load_mooncake(str(path), speed=2.0).requests
    assert [r.request_id for r in one] == [f"mc-{i}" for i in range(len(recs))]
    top = 7  # copy c offsets every hash id by c * (largest id + 1)
    laid_end_to_end = [
        fields(r, tuple(h + c * top for h in r.hash_ids), f"mc{c}-{i}")
        for c in range(3)
        for i, r in enumerate(one)
    ]
    got = load_mooncake(str(path), speed=2.0, repeat=3).requests
    assert [fields(r, request_id=r.request_id) for r in got] == sorted(
        laid_end_to_end, key=lambda x: x[0]
    )


def test_mooncake_shards_split_the_trace_by_prefix_family(monkeypatch):
    """Shards partition the requests; every prefix past the first block stays within one
    shard (what a router that keeps each family on one server gives each server), so a
    shard keeps the reuse the trace has within families, at a fraction of its rate."""
    monkeypatch.delenv("KVGRID_TRACES", raising=False)
    whole = load_mooncake("synthetic")
    shards = [wl.load_workload(f"mooncake:synthetic,shards=4,shard={i}") for i in range(4)]
    ids = [{r.request_id for r in s.requests} for s in shards]
    assert sum(map(len, ids)) == len(whole) and set().union(*ids) == {
        r.request_id for r in whole.requests
    }
    owner = {}
    for i, s in enumerate(shards):
        assert s.meta["shard"] == f"{i}/4"
        for r in s.requests:
            for h in r.hash_ids[1:]:
                assert owner.setdefault(h, i) == i, "a shared prefix crosses shards"
    # each keeps most of the trace's reuse (64.0% block-weighted over the whole trace)
    for s in shards:
        assert s.theoretical_hit_rate()["block_weighted"] > 0.5
        assert s.requests[-1].arrival_s > 0.9 * whole.requests[-1].arrival_s
    with pytest.raises(ValueError, match=r"shard must be in 0\.\.shards-1"):
        load_mooncake("synthetic", shards=4, shard=4)


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown Mooncake trace"):
        load_mooncake("nope")
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    with pytest.raises(ValueError, match="not a Mooncake trace record"):
        load_mooncake(str(bad))
    with pytest.raises(ValueError, match="unknown workload"):
        wl.load_workload("nothing:a=1")
    with pytest.raises(ValueError, match="bad options"):
        wl.load_workload("chat:bogus=3")


@pytest.mark.parametrize("name", sorted(wl.GENERATORS))
def test_generators_deterministic_under_seed(name):
    small = {
        "chat": dict(num_sessions=5, turns=3),
        "agent": dict(num_tasks=3, fanout=4, prefix_tokens=512),
        "system_prompt": dict(num_requests=30),
        "docqa": dict(num_docs=2, questions_per_doc=3, doc_tokens=1024),
        "sinusoidal": dict(duration_s=60, period_s=30, input_tokens=256, output_tokens=8),
        "constant": dict(duration_s=20, rate=2.0, input_tokens=256, output_tokens=8),
        "no_reuse": dict(num_requests=30),
    }[name]
    gen = wl.GENERATORS[name]
    a, b, c = gen(seed=1, **small), gen(seed=1, **small), gen(seed=2, **small)
    da = [r.to_dict() for r in a.requests]
    assert da == [r.to_dict() for r in b.requests]
    assert da != [r.to_dict() for r in c.requests]
    for r in a.requests:  # one hash id per block, last one partial
        assert len(r.hash_ids) == -(-r.input_length // a.block_tokens)
    assert [r.arrival_s for r in a.requests] == sorted(r.arrival_s for r in a.requests)
    assert a.prompt_tokens(a.requests[0]) == b.prompt_tokens(b.requests[0])


def test_generator_prefix_structure():
    chat = wl.multi_turn_chat(num_sessions=3, turns=3, seed=0)
    by_session: dict[str, list] = {}
    for r in chat.requests:
        by_session.setdefault(r.session_id, []).append(r)
    for turns in by_session.values():
        for prev, nxt in itertools.pairwise(turns):
            full = prev.input_length // chat.block_tokens
            assert nxt.hash_ids[:full] == prev.hash_ids[:full]  # the history is resent
            p, n = chat.prompt_tokens(prev), chat.prompt_tokens(nxt)
            assert n[: len(p)] == p
    agent = wl.agent_fanout(num_tasks=2, fanout=5, prefix_tokens=1024, seed=0)
    first = {r.session_id: r.hash_ids[:16] for r in agent.requests}
    assert all(r.hash_ids[:16] == first[r.session_id] for r in agent.requests)
    sp = wl.shared_system_prompt(num_requests=50, system_tokens=512, seed=0)
    assert sp.theoretical_hit_rate()["block_weighted"] > 0.5
    nr = wl.no_reuse(num_requests=50, seed=0)
    assert nr.theoretical_hit_rate()["block_weighted"] == 0.0
    sin = wl.bursty_sinusoidal(duration_s=400, min_rate=1, max_rate=20, period_s=200, seed=0)
    t = [r.arrival_s for r in sin.requests]
    trough = sum(1 for x in t if x < 20)  # the rate starts at its minimum
    peak = sum(1 for x in t if 90 <= x < 110)
    assert peak > 5 * max(trough, 1)
