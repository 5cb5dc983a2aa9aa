"""The server replay's own logic (the servers it starts run on the GPU machine): speed
ladders per configuration, shards, and the summary's ratios and their lower bound."""

import argparse

import pytest

from kvgrid.bench.gpu.serve_replay import (
    Timeline,
    after_warmup,
    parse_shard,
    parse_speeds,
    summarize,
)
from kvgrid.bench.replay import RequestResult


def test_speeds_per_configuration():
    both = ["no_store", "store"]
    assert parse_speeds(["20,10"], both) == {"no_store": [10.0, 20.0], "store": [10.0, 20.0]}
    got = parse_speeds(["10,20", "store=40,30"], both)
    assert got == {"no_store": [10.0, 20.0], "store": [30.0, 40.0]}
    with pytest.raises(ValueError, match="'g9' is not one of --configs"):
        parse_speeds(["g9=1"], both)
    with pytest.raises(ValueError, match="no speed-ups for no_store"):
        parse_speeds(["store=1"], both)
    with pytest.raises(ValueError, match="numbers separated by commas"):
        parse_speeds(["fast"], both)
    with pytest.raises(ValueError, match="must be positive"):
        parse_speeds(["0,2"], both)


def test_shard_argument():
    assert parse_shard("3/16") == (3, 16)
    for bad in ("16/16", "a/b", "3"):
        with pytest.raises(argparse.ArgumentTypeError, match="--shard"):
            parse_shard(bad)


def point(offered: float, goodput: float, p90: float, failed: int = 0) -> dict:
    return {"offered_req_s": offered, "goodput_req_s": goodput, "ttft_p90_s": p90,
            "failed": failed}  # fmt: skip


def test_summary_takes_the_best_point_within_the_limit_and_bounds_the_ratio():
    points = {
        "no_store": [point(4, 4, 0.8), point(5, 5, 1.3), point(6, 3.6, 3.1)],
        "store": [point(5, 5, 0.5), point(8, 7.9, 1.9), point(9, 6, 2.4), point(10, 10, 1.0)],
    }
    s = summarize(points, 2.0)
    # a point past the limit, or with a failed request, never counts
    assert s["best_goodput_req_s"] == {"no_store": 5, "store": 10}
    assert s["first_missed_at_offered_req_s"] == {"no_store": 6, "store": 9}
    assert s["vs_no_store"] == {"store": 2.0}
    # no store's capacity lies below the rate where it first missed: 10 / 6 at least
    assert s["vs_no_store_lower_bound"]["store"] == pytest.approx(10 / 6)
    points["store"][-1]["failed"] = 1
    assert summarize(points, 2.0)["best_goodput_req_s"]["store"] == 7.9
    none_met = summarize({"no_store": [point(6, 3, 3.0)], "store": [point(6, 6, 1.0)]}, 2.0)
    assert none_met["vs_no_store"] == {"store": None}
    assert none_met["vs_no_store_lower_bound"] == {"store": 1.0}
    assert "from_cold" not in s


def test_after_a_warmup_the_summary_also_gives_the_cold_start_figures():
    warm = {"no_store": [point(5, 5, 1.0), point(6, 3, 3.0)], "store": [point(8, 8, 0.5)]}
    cold = {"no_store": [point(5, 4, 1.5), point(6, 3, 3.5)], "store": [point(8, 6, 2.5)]}
    for c, pts in warm.items():
        for p, q in zip(pts, cold[c]):
            p["from_cold"] = q
    s = summarize(warm, 2.0)
    assert s["vs_no_store"] == {"store": 8 / 5}
    # from a cold start the store's one point misses the limit: no ratio, no best
    assert s["from_cold"]["best_goodput_req_s"] == {"no_store": 4, "store": 0.0}
    assert s["from_cold"]["vs_no_store"] == {"store": 0.0}
    assert s["from_cold"]["first_missed_at_offered_req_s"] == {"no_store": 6, "store": 8}


def test_a_timeline_digest_averages_gauges_and_rates_counters():
    tl = Timeline("http://127.0.0.1:9")  # never started: samples filled by hand
    tl.samples = {"t": [1.0, 2.0, 3.0], "num_running": [2, 4, 6], "num_waiting": [0, 0, 3],
                  "kv_usage": [0.5, 1.0, 0.0], "waiting_prefill_tokens": [0, 0, 0],
                  "mixed_prefill_tokens": [256, 256, 256], "steps": [10, 30, 50],
                  "computed_prompt_tokens": [0, 1000, 4000], "num_room_waits": [1, 1, 5],
                  "num_preemptions": [0, 0, 0],
                  "store_engine_s": [{"save": 0.5}, {"save": 0.7},
                                     {"save": 1.5, "lookup": 0.2}]}  # fmt: skip
    d = tl.digest()
    assert d["mean_num_running"] == 4 and d["mean_num_waiting"] == 1 and d["mean_kv_usage"] == 0.5
    assert d["steps_per_s"] == 20 and d["computed_prompt_tokens_per_s"] == 2000
    assert d["num_room_waits_per_s"] == 2 and d["num_preemptions_per_s"] == 0
    assert d["store_engine_s_per_s"] == {"save": 0.5, "lookup": 0.1}  # a call first seen late
    tl.samples = {k: v[:1] for k, v in tl.samples.items()}
    assert tl.digest() == {}  # one sample spans no time


def test_the_warmup_leaves_the_first_requests_out_of_the_figures():
    # four requests sent 1 s apart, each done 0.5 s after it was sent; the last one failed
    rs = [RequestResult(f"r{i}", i, sent_s=i, e2el_s=0.5, success=True) for i in range(3)]
    rs.append(RequestResult("r3", 3, sent_s=3, success=False))
    kept, span = after_warmup(rs, 0.5)
    assert [r.request_id for r in kept] == ["r2", "r3"] and span == 0.5  # 2.0 .. 2.5
    assert after_warmup(rs, 0.0) == (rs, 2.5)
    with pytest.raises(ValueError, match="no request to measure"):
        after_warmup(rs, 1.0)
