"""Router + policies, pure: decisions from index, recent record and load, with explicit time."""

import pytest

from kvgrid import keys
from kvgrid.events import BlockStored, EventBatch
from kvgrid.router.policies import POLICIES
from kvgrid.router.router import NoWorkerError, Router, RouteRequest
from kvgrid.router.workers import InFlight, WorkerInfo, WorkerLoad

SCOPE = keys.KVScope("m", "float32")


def fleet(policy="ttft", n=3, **kw) -> Router:
    r = Router(policy, **kw)
    for i in range(n):
        info = WorkerInfo(f"w{i}", epoch="e", scope=SCOPE, max_num_batched_tokens=512)
        assert r.add_worker(info, 0.0) is True  # stale until its snapshot
        assert r.freshness(f"w{i}") == "stale"
        r.on_snapshot(f"w{i}", 0, {}, 0.0)
        assert r.freshness(f"w{i}") == "exact"
        r.on_load(WorkerLoad(f"w{i}", "e", prefill_tokens_per_s=1000.0, decode_step_s=0.01), 0.0)
    return r


def toks(n, start=0):
    return list(range(start, start + n))


def store(r: Router, wid: str, seq: int, tokens, tenant=b""):
    ks = keys.block_keys(tokens, SCOPE.with_tenant(tenant))
    assert (
        r.on_events(EventBatch(wid, seq, 0.0, [BlockStored(tuple(ks), None, "G1", 0)]), 0) == "ok"
    )


def test_ttft_prefers_cached_worker_and_predicts_engine_cached_tokens():
    r = fleet()
    prompt = toks(1000)
    store(r, "w1", 1, prompt[:640])
    d = r.route(RouteRequest("a", prompt), 1.0)
    assert d.worker_id == "w1"
    assert d.predicted_cached_tokens == 640
    c = {c.worker_id: c for c in d.candidates}
    assert c["w1"].overlap.blocks == 10 and c["w0"].overlap.blocks == 0
    assert c["w1"].predicted_ttft_s < c["w0"].predicted_ttft_s
    assert "w1" in d.log_line() and d.to_dict()["candidates"]
    # a fully cached prompt still computes its last token: a block-aligned prompt of 640
    # tokens is served 576 from cache, as the engine does
    assert r.route(RouteRequest("b", prompt[:640]), 1.0).predicted_cached_tokens == 576


def test_siblings_land_together_then_hot_prefix_spreads():
    r = fleet()
    shared = toks(2048)
    first = r.route(RouteRequest("s0", shared + toks(30, 50_000)), 0.0).worker_id
    # no KV event yet: the recent-decision record predicts the prefix on `first`
    d = r.route(RouteRequest("s1", shared + toks(30, 60_000)), 0.01)
    assert d.worker_id == first and d.predicted_cached_tokens == 2048
    # pile a long queue on `first`: recomputing elsewhere becomes faster, the prefix spreads
    r.workers[first].load.waiting_prefill_tokens = 20_000
    d = r.route(RouteRequest("s2", shared + toks(30, 70_000)), 0.02)
    assert d.worker_id != first
    # the recent record expires
    d = r.route(RouteRequest("s3", shared + toks(30, 80_000)), 100.0)
    assert all(c.overlap.predicted == 0 for c in d.candidates)


def test_router_tracks_backlog_of_its_own_requests_and_finish_predicts_output_blocks():
    r = fleet("least_load", n=2)
    r.route(RouteRequest("x", toks(300)), 0.0)
    w = r.workers["w0"]
    assert w.backlog_tokens() == 300 and w.num_active() == 1
    assert r.route(RouteRequest("y", toks(10, 9000)), 0.0).worker_id == "w1"
    r.on_first_token("x", 0.1)
    assert w.backlog_tokens() == 0 and w.num_decoding() == 1
    # finishing with output tokens predicts the blocks the output filled
    r.on_finish("x", 0.2, output_token_ids=toks(100, 7000))
    assert not w.inflight
    nxt = toks(300) + toks(100, 7000)[:-1] + [1, 2, 3]
    d = r.route(RouteRequest("z", nxt), 0.3)
    c = {c.worker_id: c for c in d.candidates}
    assert c["w0"].overlap.blocks == (300 + 99) // 64


@pytest.mark.parametrize("policy", ["least_load", "ttft"])
def test_requests_seen_to_finish_since_the_last_report_do_not_count(policy):
    """A wave of clients that finished together sends together: the worker that served them
    must not look busy (its last report still counts them) and lose the whole next wave."""
    r = fleet(policy, n=2)
    busy = dict(num_running=4, prefill_tokens_per_s=1000.0, decode_step_s=0.01)
    r.on_load(WorkerLoad("w0", "e", **busy), 0.0)  # four running on w0 ...
    for i in range(4):
        r.workers["w0"].add_inflight(f"old{i}", InFlight("w0", 0.0, 20, 20))
        r.on_first_token(f"old{i}", 0.05)
        r.on_finish(f"old{i}", 0.1)  # ... all four seen to finish, no report since
    picks = [r.route(RouteRequest(f"n{i}", toks(20, 100 * i)), 0.1).worker_id for i in range(4)]
    assert sorted(picks) == ["w0", "w0", "w1", "w1"], picks
    # a new report is the truth again: four running there now means busy
    r.on_load(WorkerLoad("w0", "e", **{**busy, "num_running": 6}), 0.2)
    assert r.workers["w0"].num_active() == 6


def test_down_worker_gets_nothing_and_rejoins_with_new_epoch():
    r = fleet(n=2)
    store(r, "w0", 1, toks(640))
    r.mark_down("w0", 1.0, "test")
    assert r.freshness("w0") == "down"
    for i in range(4):
        assert r.route(RouteRequest(f"r{i}", toks(640)), 1.0).worker_id == "w1"
    # back with a new process: old blocks are gone, stale until snapshot
    assert r.add_worker(WorkerInfo("w0", epoch="e2", scope=SCOPE), 2.0) is True
    assert r.index.num_blocks("w0") == 0
    r.mark_down("w1", 2.0)
    with pytest.raises(NoWorkerError):
        r.route(RouteRequest("q", toks(10), model="other"), 2.0)
    assert r.route(RouteRequest("q", toks(10)), 2.0).worker_id == "w0"


def test_heartbeat_timeout_and_gap_detection_from_load_report():
    r = fleet(n=2, heartbeat_timeout_s=3.0)
    r.on_load(WorkerLoad("w0", "e", kv_seq=0), 2.0)
    assert r.check_liveness(4.0) == ["w1"]  # w1's last report was at 0.0
    assert r.on_load(WorkerLoad("w0", "e", kv_seq=5), 4.0) is True  # batches 1..5 lost
    assert r.freshness("w0") == "stale"
    # stale entries are not trusted: only predictions count
    d = r.route(RouteRequest("a", toks(200)), 4.0)
    assert d.candidates[0].freshness == "stale"


def test_every_policy_decides_and_explains():
    for name in POLICIES:
        r = fleet(name, n=4)
        store(r, "w2", 1, toks(1024))
        chosen = [r.route(RouteRequest(f"{name}{i}", toks(1024)), 0.0).worker_id for i in range(4)]
        assert len(chosen) == 4
        if name == "round_robin":
            assert sorted(chosen) == ["w0", "w1", "w2", "w3"]
        if name in ("ttft", "dynamo_cost", "prefix_affinity"):
            assert chosen[0] == "w2"
        if name == "least_load":
            assert len(set(chosen)) == 4
    with pytest.raises(ValueError, match="unknown routing policy"):
        Router("nope")


def test_prefix_affinity_falls_back_to_least_load_when_imbalanced():
    r = fleet("prefix_affinity", n=2)
    store(r, "w0", 1, toks(1024))
    r.workers["w0"].load.num_running = 100
    assert r.route(RouteRequest("a", toks(1024)), 0.0).worker_id == "w1"


def test_dynamo_cost_credits_lower_tiers_less():
    r = fleet("dynamo_cost", n=2)
    ks = keys.block_keys(toks(1024), SCOPE)
    r.on_events(EventBatch("w0", 1, 0.0, [BlockStored(tuple(ks[:8]), None, "G1", 0)]), 0)
    r.on_events(EventBatch("w1", 1, 0.0, [BlockStored(tuple(ks[:8]), None, "G3", 0)]), 0)
    d = r.route(RouteRequest("a", toks(1024)), 0.0)
    c = {c.worker_id: c for c in d.candidates}
    assert d.worker_id == "w0" and c["w0"].score < c["w1"].score


def test_ttft_weighs_each_sites_round_trip():
    r = Router("ttft", site_rtt_s={"near": 0.0, "far": 0.3})
    for wid, site in (("n", "near"), ("f", "far")):
        r.add_worker(WorkerInfo(wid, epoch="e", scope=SCOPE, site=site), 0.0)
        r.on_snapshot(wid, 0, {}, 0.0)
        r.on_load(WorkerLoad(wid, "e", prefill_tokens_per_s=1000.0, decode_step_s=0.01), 0.0)
    d = r.route(RouteRequest("a", toks(100)), 1.0, dry_run=True)
    c = {c.worker_id: c for c in d.candidates}
    assert c["f"].ttft_parts()["network_s"] == 0.3 and c["n"].ttft_parts()["network_s"] == 0.0
    assert c["f"].predicted_ttft_s == pytest.approx(c["n"].predicted_ttft_s + 0.3)
    assert d.worker_id == "n"
    # once the near worker queues more than the round trip costs, the far one wins
    r.on_load(
        WorkerLoad("n", "e", waiting_prefill_tokens=500, num_waiting=1,
                   prefill_tokens_per_s=1000.0, decode_step_s=0.01),
        1.0,
    )  # fmt: skip
    assert r.route(RouteRequest("b", toks(100)), 1.0).worker_id == "f"
