"""SLA planner: sizing follows load, hysteresis holds steady load steady, scale-down drains
(in the simulator, no request is lost)."""

from __future__ import annotations

from kvgrid.bench.sim.fleet import SimConfig, simulate
from kvgrid.bench.workloads import bursty_sinusoidal
from kvgrid.planner.planner import (
    ObservedMetrics,
    Planner,
    PlannerConfig,
    PoolState,
    ReplicaView,
    erlang_c,
)


def _obs(rate: float, ttft: float = 0.5) -> ObservedMetrics:
    return ObservedMetrics(10.0, rate, 8192, 1024, [ttft] * 30, [0.02] * 30)


def _pool(n: int, ready: bool = True) -> dict[str, PoolState]:
    return {"mixed": PoolState("mixed", [ReplicaView(f"w{i}", ready=ready) for i in range(n)])}


def test_erlang_c_known_values():
    assert erlang_c(1, 0.5) == 0.5  # M/M/1: P(wait) = rho
    assert abs(erlang_c(2, 1.0) - 1 / 3) < 1e-12
    assert erlang_c(4, 5.0) == 1.0


def test_required_grows_with_load():
    p = Planner()
    sizes = [p.required(lam, 8192, 1024)["mixed"] for lam in (1, 6, 12, 24)]
    assert sizes == sorted(sizes) and sizes[-1] > 3 * sizes[0]


def test_hysteresis_no_flapping_and_delayed_scale_down():
    p = Planner(PlannerConfig(interval_s=10, down_ticks=3, cooldown_s=0))
    want = p.required(8.0, 8192, 1024)["mixed"]
    acts = p.decide(0, _obs(8.0), _pool(want))
    assert acts == []
    # noise of +-10% around a steady rate: no action at all
    for i, r in enumerate([8.6, 7.4, 8.4, 7.6, 8.8, 7.2, 8.0, 8.5, 7.5] * 3):
        assert p.decide(10 * (i + 1), _obs(r), _pool(want)) == [], (i, r)
    # load drops: nothing for down_ticks - 1 intervals, then drains (never removes outright)
    out = []
    for i in range(6):
        out.append(p.decide(1000 + 10 * i, _obs(1.0), _pool(want)))
    assert out[0] == [] and out[1] == []
    drains = [a for acts in out for a in acts]
    assert drains and all(a.kind == "drain" and a.worker_id for a in drains)
    assert all(len(a) <= p.cfg.max_down_step for a in out)


def test_scale_up_counts_starting_replicas_and_drains_starting_first():
    p = Planner(PlannerConfig(cooldown_s=0, down_ticks=1))
    acts = p.decide(0, _obs(20.0), _pool(2))
    assert len(acts) == 1 and acts[0].kind == "add"
    n = 2 + acts[0].count
    # the added replicas are still starting: they count, nothing more is added
    pools = {"mixed": PoolState("mixed", [ReplicaView(f"w{i}", ready=i < 2) for i in range(n)])}
    assert [a for a in p.decide(10, _obs(20.0), pools) if a.kind == "add"] == []
    p2 = Planner(PlannerConfig(cooldown_s=0, down_ticks=1, max_down_step=1))
    p2.decide(0, _obs(1.0), _pool(1))
    mixed = [
        ReplicaView("busy", num_active=9),
        ReplicaView("cold", ready=False),
        ReplicaView("idle", num_active=0),
    ] + [ReplicaView(f"x{i}", num_active=5) for i in range(5)]
    acts = p2.decide(10, _obs(1.0), {"mixed": PoolState("mixed", mixed)})
    assert [a.worker_id for a in acts] == ["cold"]


def test_planner_in_simulator_loses_nothing():
    w = bursty_sinusoidal(
        duration_s=900,
        min_rate=1,
        max_rate=12,
        period_s=600,
        input_tokens=4096,
        output_tokens=256,
        block_tokens=512,
        seed=0,
    )
    pl = Planner(PlannerConfig(ttft_target_s=3.0, interval_s=10, cooldown_s=30))
    res = simulate(w, SimConfig(num_workers=1, planner=pl, startup_s=30))
    fleet = res.pop("fleet")
    kinds = {a["kind"] for a in fleet.actions}
    assert kinds == {"add", "drain"}  # scaled up with the wave and back down
    assert res["completed"] == len(w) and res["failed"] == 0
    stopped = [sw for sw in fleet.workers if sw.stopped_at is not None]
    assert stopped and all(sw.idle() for sw in stopped)
    assert not any(fleet.router.workers.get(sw.worker_id) for sw in stopped)


def test_resize_adds_or_drains_the_least_busy():
    p = Planner()
    pools = {
        "mixed": PoolState(
            "mixed",
            [
                ReplicaView("a", num_active=3),
                ReplicaView("b", num_active=1),
                ReplicaView("c", num_active=2, draining=True),  # already leaving: not counted
            ],
        )
    }
    (add,) = p.resize(pools, "mixed", 4)
    assert add.kind == "add" and add.count == 2
    (drain,) = p.resize(pools, "mixed", 1)
    assert drain.kind == "drain" and drain.worker_id == "b"
    assert p.resize(pools, "mixed", 2) == []


def test_idle_window_keeps_the_pools_of_the_mode():
    # no arrivals in a window: a mixed fleet is sized as one mixed pool, not as a
    # disaggregated pair it does not have
    p = Planner(PlannerConfig(cooldown_s=0))
    assert p.required(0.0, 0, 0) == {"mixed": 1}
    assert [a for a in p.decide(0, _obs(0.0), _pool(1)) if a.kind == "add"] == []
    pd = Planner(PlannerConfig(disagg=True))
    assert pd.required(0.0, 0, 0) == {"prefill": 1, "decode": 1}


def test_scale_down_drains_the_dearest_site_first():
    p = Planner()
    views = [
        ReplicaView("cheap-busy", num_active=3, cost_per_hour=1.0),
        ReplicaView("dear-busy", num_active=3, cost_per_hour=4.0),
        ReplicaView("cheap-idle", num_active=0, cost_per_hour=1.0),
    ]
    pools = {"mixed": PoolState("mixed", views)}
    drains = [a.worker_id for a in p.resize(pools, "mixed", 1)]
    assert drains == ["dear-busy", "cheap-idle"]
    # a replica still starting goes before any serving one, whatever its site costs
    views.append(ReplicaView("starting", ready=False, cost_per_hour=0.5))
    assert p.resize(pools, "mixed", 3)[0].worker_id == "starting"
