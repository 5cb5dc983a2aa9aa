"""Fleet simulator: deterministic, sane under load, and wired to the real router (its index
follows the simulated workers' KV events)."""

from __future__ import annotations

import numpy as np
import pytest

from kvgrid.bench.sim.fleet import SimConfig, Site, simulate
from kvgrid.bench.workloads import multi_turn_chat, no_reuse, shared_system_prompt
from kvgrid.planner.calibration import load_calibration


def _chat():
    return multi_turn_chat(
        num_sessions=60,
        turns=4,
        system_tokens=1024,
        user_tokens=512,
        output_tokens=64,
        session_rate=4.0,
        think_time_s=3.0,
        seed=3,
    )


def test_default_calibration_is_marked_unmeasured():
    c = load_calibration()
    assert c.meta["measured"] is False and "DESIGN.md" in c.meta["source"]
    assert c.prefill_s(8192) == pytest.approx(0.31, rel=0.02)
    assert c.prefill_s(32768) == pytest.approx(1.45, rel=0.02)


def test_deterministic():
    a = simulate(_chat(), SimConfig(num_workers=4, policy="ttft"))
    b = simulate(_chat(), SimConfig(num_workers=4, policy="ttft"))
    fa, fb = a.pop("fleet"), b.pop("fleet")
    for k in ("ttft_p50_s", "ttft_p99_s", "hit_rate", "events", "completed"):
        assert a[k] == b[k]
    assert np.array_equal(fa.worker_of, fb.worker_of)


def test_more_workers_lower_ttft_under_load():
    w = no_reuse(num_requests=1500, input_tokens=4096, output_tokens=64, rate=30.0, seed=0)
    ttft = []
    for n in (2, 4, 8):
        r = simulate(w, SimConfig(num_workers=n, policy="least_load"))
        r.pop("fleet")
        assert r["completed"] == 1500 and r["failed"] == 0
        ttft.append(r["ttft_p99_s"])
    assert ttft[0] > ttft[1] > ttft[2]
    assert ttft[0] > 10 * ttft[2]  # 2 workers are overloaded (30 req/s x 0.14 s of prefill)


def test_router_index_follows_worker_events():
    w = _chat()
    res = simulate(w, SimConfig(num_workers=4, policy="ttft"))
    fleet = res.pop("fleet")
    router = fleet.router
    for sw in fleet.workers:  # the index holds exactly each worker's cached G1 blocks
        held = set(sw.lru) | set(sw.pinned)
        assert router.index.worker_keys(sw.worker_id, "G1") == held
        assert router.freshness(sw.worker_id) == "exact"
    theo = w.theoretical_hit_rate(w.block_tokens)["token_weighted"]
    assert 0.5 * theo < res["hit_rate"] <= theo + 1e-9
    # cache-aware routing keeps sessions together: most hits round robin cannot get
    rr = simulate(w, SimConfig(num_workers=4, policy="round_robin"))
    rr.pop("fleet")
    assert res["hit_rate"] > rr["hit_rate"] + 0.1


def test_hot_prefix_is_spread():
    sp = shared_system_prompt(
        num_requests=2000, system_tokens=2048, user_tokens=256, output_tokens=64, rate=40.0, seed=0
    )
    r = simulate(sp, SimConfig(num_workers=8, policy="ttft"))
    fleet = r.pop("fleet")
    assert r["load_skew_max_over_mean"] <= 1.25
    # spread by computing the prefix once per worker, not by giving up on the cache
    assert all(sw.routed > 0 for sw in fleet.workers)
    assert r["hit_rate"] >= 0.95 * sp.theoretical_hit_rate(sp.block_tokens)["token_weighted"]


def test_no_reuse_is_balanced():
    nr = no_reuse(num_requests=2000, input_tokens=2048, output_tokens=64, rate=40.0, seed=0)
    r = simulate(nr, SimConfig(num_workers=8, policy="ttft"))
    r.pop("fleet")
    assert r["load_max_over_min"] <= 1.2


def test_disaggregation_sites_and_candidates_run():
    w = _chat()
    d = simulate(
        w,
        SimConfig(
            num_workers=6,
            num_prefill=3,
            disagg=True,
            sites=[Site("near", 0.0, 3.0, 1), Site("far", 0.08, 1.0, 1)],
        ),
    )
    fleet = d.pop("fleet")
    assert d["completed"] == len(w) and d["failed"] == 0
    assert {sw.role for sw in fleet.workers} == {"prefill", "decode"}
    assert all(sw.idle() and sw.private == 0 for sw in fleet.workers)
    assert d["energy_j_per_output_token"] > 0 and d["cost"] > 0
    # the router weighs each site's round trip: the near workers answer well within the far
    # site's 80 ms, so no prefill goes there at this load
    assert {fleet.workers[wi].site for wi in fleet.worker_of} == {"near"}
    c = simulate(w, SimConfig(num_workers=8, candidates=2))
    c.pop("fleet")
    assert c["completed"] == len(w)


def test_sites_round_trips_weighed_and_paid():
    """The near site takes more of the work (blind to the round trip, the router splits it
    205/195); once the near workers queue longer than the far site's round trip, requests go
    far, and each pays that round trip in its TTFT (the client sees it, not only the router)."""
    w = no_reuse(num_requests=400, input_tokens=2048, output_tokens=16, rate=20.0, seed=0)
    sites = [Site("near", 0.0, 3.0, 1), Site("far", 0.02, 1.0, 1)]
    d = simulate(w, SimConfig(num_workers=4, sites=sites))
    fleet = d.pop("fleet")
    assert d["completed"] == len(w)
    far = [i for i, wi in enumerate(fleet.worker_of) if fleet.workers[wi].site == "far"]
    near = [i for i, wi in enumerate(fleet.worker_of) if fleet.workers[wi].site == "near"]
    assert far and len(near) > 1.3 * len(far)
    assert np.all(fleet.ttft[far] >= 0.02)


def test_quiet_gc_restores_the_collector():
    import gc

    from kvgrid.bench.sim.fleet import quiet_gc

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    with quiet_gc():
        assert gc.get_threshold() == (50_000, 50, 100) and gc.get_freeze_count() > frozen
        with quiet_gc():  # nested (a simulation inside an experiment's block)
            pass
        assert gc.get_threshold() == (50_000, 50, 100)
    assert gc.get_threshold() == before
    # unfrozen again, unless something had frozen the heap before (then it stays frozen)
    assert gc.get_freeze_count() == 0 if frozen == 0 else gc.get_freeze_count() >= frozen
