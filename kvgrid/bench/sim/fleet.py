"""Discrete-event fleet simulator: simulated engines behind the real router.

The router, KV index, policies and planner here are the live system's classes
(kvgrid.router.Router, kvgrid.planner.planner.Planner), driven with explicit simulated times:
workers register with ``add_worker``, publish their stored/evicted blocks as numbered
``EventBatch``es, send ``WorkerLoad`` reports whenever their state changes, and every request
is placed by ``Router.route``. Only the engines are modelled (kvgrid.bench.sim.worker).

One heap orders wake-ups; arrivals stream from the (sorted) workload beside it, so memory
does not grow with the number of requests. Prompts are keyed by hashing their hash-id chain
with kvgrid.keys (one id per block), so block keys are real keys of the one key function.

Options: prefill/decode disaggregation (a prefill pool routed by the policy, a decode pool
by least load, KV moved as the live path's time model says: ``kvgrid.transfer.model``),
sites (kvgrid.router.sites: a network round trip the router weighs and the client sees, a
cost per GPU-hour the planner weighs), a G2 host-memory tier, a candidate preselection for
very large fleets, and a planner called
every ``planner_interval_s``.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvgrid import gc_tuning
from kvgrid import keys as kvkeys
from kvgrid.bench.sim.worker import PREFILL, SimRequest, SimWorker
from kvgrid.bench.workload import Workload
from kvgrid.planner.calibration import Calibration, load_calibration
from kvgrid.planner.planner import ObservationWindow, PoolState, ReplicaView
from kvgrid.router.policies import DEFAULT_POLICY
from kvgrid.router.router import Router, RouteRequest
from kvgrid.router.sites import Site
from kvgrid.router.workers import WorkerInfo, WorkerLoad
from kvgrid.stats import percentile
from kvgrid.transfer.model import DEFAULT_LAND_BYTES_PER_S, TransferModel

SIM_SCOPE = kvkeys.KVScope("sim:llama3-8b", "bfloat16")
_WAKE, _DELIVER, _HANDOFF, _READY, _TICK = range(5)


@dataclass
class SimConfig:
    num_workers: int = 16
    policy: str = DEFAULT_POLICY
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None
    disagg: bool = False
    num_prefill: int = 0  # with disagg; num_workers - num_prefill decode
    # prefill -> decode KV transfer; None: the calibration's (what the live path measured)
    transfer: TransferModel | None = None
    sites: list[Site] = field(default_factory=lambda: [Site()])
    candidates: int | None = None  # route among cache holders + this many sampled workers
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    g2_capacity_tokens: int = 0
    planner: Any = None
    planner_interval_s: float = 10.0
    startup_s: float | None = None
    recent_ttl_s: float = 5.0
    warmup_s: float = 0.0  # requests arriving earlier are simulated but not counted
    seed: int = 0


class Fleet:
    def __init__(self, workload: Workload, cfg: SimConfig) -> None:
        self.w = workload
        self.cfg = cfg
        self.calib = cfg.calibration or load_calibration()
        self.bt = workload.block_tokens
        self.rng = random.Random(cfg.seed)
        self.router = Router(
            cfg.policy,
            recent_ttl_s=cfg.recent_ttl_s,
            site_rtt_s={s.name: s.rtt_s for s in cfg.sites},
            **cfg.policy_kwargs,
        )
        self.decode_router = Router("least_load") if cfg.disagg else None
        self.digest = SIM_SCOPE.digest
        self.heap: list = []
        self.seq = 0
        self.workers: list[SimWorker] = []
        self.by_id: dict[str, SimWorker] = {}
        self.pool_of: dict[str, str] = {}
        self.startup_s = self.calib.startup_s if cfg.startup_s is None else cfg.startup_s
        self.site_cycle = self._site_assignment()
        n = len(workload.requests)
        self.ttft = np.full(n, np.nan)
        self.tpot = np.full(n, np.nan)
        self.e2e = np.full(n, np.nan)
        self.cached = np.zeros(n, dtype=np.int64)
        self.worker_of = np.full(n, -1, dtype=np.int32)
        self.rtt = np.zeros(n)
        self.completed = 0
        self.failed = 0
        self.actions: list[dict[str, Any]] = []
        self.pool_sizes: list[tuple[float, dict[str, int]]] = []
        self._win = ObservationWindow()
        self.events = 0
        self.now = 0.0
        self.wall_s = 0.0
        self._live_cache: list[str] | None = None

    # ---- fleet membership ----------------------------------------------------------------

    def _site_assignment(self):
        sites = self.cfg.sites or [Site()]
        total = sum(s.share for s in sites)
        weights = [s.share / total for s in sites]
        counts = [0] * len(sites)

        def nxt() -> Site:
            # the site furthest below its share (deterministic, balanced)
            k = sum(counts) + 1
            i = max(range(len(sites)), key=lambda j: weights[j] * k - counts[j])
            counts[i] += 1
            return sites[i]

        return nxt

    def add_worker(self, pool: str, now: float, ready: bool = True) -> SimWorker:
        i = len(self.workers)
        wid = f"{pool[0]}{i}"
        role = {"mixed": "mixed", "prefill": "prefill", "decode": "decode"}[pool]
        site = self.site_cycle()
        w = SimWorker(wid, i, self.calib, self.bt, role, site.name, self.cfg.g2_capacity_tokens)
        w.site_obj = site  # type: ignore[attr-defined]
        w.started_at = now
        w.t_last = now
        self.workers.append(w)
        self.by_id[wid] = w
        self.pool_of[wid] = pool
        if ready:
            self._register(w, now)
        else:
            w.ready = False
            self._push(now + self.startup_s, _READY, w)
        return w

    def _register(self, w: SimWorker, now: float) -> None:
        w.ready = True
        c = self.calib
        router = self.decode_router if w.role == "decode" else self.router
        info = WorkerInfo(
            w.worker_id,
            scope=SIM_SCOPE,
            block_size=self.bt,
            max_model_len=1 << 20,
            bytes_per_block=self.bt * c.kv_bytes_per_token,
            max_num_batched_tokens=c.max_num_batched_tokens,
            events=w.role != "decode",
            site=w.site,
        )
        if router.add_worker(info, now):
            router.on_snapshot(w.worker_id, 0, {}, now)
        self._report(w, now)

    def _report(self, w: SimWorker, now: float) -> None:
        router = self.decode_router if w.role == "decode" else self.router
        router.on_load(
            WorkerLoad(
                w.worker_id,
                kv_seq=w.seq,
                num_running=len(w.batch) + w.n_decoding,
                num_waiting=len(w.queue),
                waiting_prefill_tokens=w.waiting_prefill_tokens(),
                kv_usage=w.kv_usage(),
                num_kv_blocks=w.cap,
                # measured speeds, reported to ~10% (a live worker reports smoothed figures;
                # every change makes the router recompute its fleet medians)
                prefill_tokens_per_s=_round_rel(w.prefill_tps),
                decode_step_s=_round_rel(w.last_step_s),
                tier_bytes_per_s=self.calib.tier_bytes_per_s,
            ),
            now,
        )

    # ---- the planner's actuator (kvgrid.planner.planner.Actuator) ---------------------------

    def add_replicas(self, pool: str, count: int, now: float) -> None:
        for _ in range(count):
            self.add_worker(pool, now, ready=False)
        self._live_cache = None

    def drain(self, wid: str, now: float) -> None:
        self._live_cache = None
        w = self.by_id[wid]
        if w.draining or w.stopped_at is not None:
            return
        w.draining = True
        if w.ready:
            router = self.decode_router if w.role == "decode" else self.router
            router.set_draining(wid)
        self._maybe_remove(w, now)

    def _maybe_remove(self, w: SimWorker, now: float) -> None:
        if w.draining and w.stopped_at is None and w.idle():
            w.stopped_at = now
            w.close_busy(now)
            if w.ready:
                router = self.decode_router if w.role == "decode" else self.router
                router.remove_worker(w.worker_id)

    # ---- event loop ----------------------------------------------------------------------

    def _push(self, t: float, kind: int, obj: Any, extra: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, obj, extra))

    def _schedule(self, w: SimWorker, nxt: float | None) -> None:
        w.version += 1
        if nxt is not None:
            self._push(nxt, _WAKE, w, w.version)

    def _wake(self, w: SimWorker, now: float) -> None:
        done: list[SimRequest] = []
        pre: list[SimRequest] = []
        firsts: list[SimRequest] = []
        nxt = w.step(now, done, pre, firsts)
        self._schedule(w, nxt)
        router = self.decode_router if w.role == "decode" else self.router
        b = w.take_events()
        if b is not None:
            b.timestamp = now
            router.on_events(b, now)
        for r in firsts:
            router.on_first_token(r.rid, now)
            if w.role != "prefill":  # disaggregated: the first token leaves with the handoff
                self._win.first_token(r.t_first - r.t_arrival + self.rtt[r.idx])
        for r in pre:  # disaggregated: prompt done, move its KV to a decode worker
            router.on_finish(r.rid, now)
            self._handoff(r, now)
        for r in done:
            router.on_finish(r.rid, now)
            self._record(r, now)
        self._report(w, now)
        if w.draining:
            self._maybe_remove(w, now)

    def _handoff(self, r: SimRequest, now: float) -> None:
        d = self.decode_router.route(  # type: ignore[union-attr]
            RouteRequest(r.rid, keys=[], num_tokens=r.input_len), now
        )
        dw = self.by_id[d.worker_id]
        r.decode_worker = dw.index
        self._push(now + self._handoff_s(r), _HANDOFF, dw, r)

    def _handoff_s(self, r: SimRequest) -> float:
        """The transfer's tail after this prefill, then the landing in the decode worker's
        G1: the time model the router decides with, with the same parameters."""
        c, bt = self.calib, self.bt
        model = self.cfg.transfer or c.transfer
        per_step = max(1, c.max_num_batched_tokens // bt)
        produce = c.prefill_s(r.uncached, r.input_len - r.uncached)
        g2 = c.tier_bytes_per_s.get("G2") or DEFAULT_LAND_BYTES_PER_S
        return model.handoff_s(
            max(0, (r.input_len - 1) // bt), bt * c.kv_bytes_per_token, produce, per_step, g2
        )

    def _record(self, r: SimRequest, now: float) -> None:
        i = r.idx
        if r.t_first < -1.5:  # never fitted a worker's KV
            self.failed += 1
            return
        rtt = self.rtt[i]
        self.ttft[i] = r.t_first - r.t_arrival + rtt
        self.e2e[i] = r.t_done - r.t_arrival + rtt
        if r.out > 1:
            self.tpot[i] = (r.t_done - r.t_first) / (r.out - 1)
        self.cached[i] = r.cached
        self.completed += 1
        self._win.finished(self.tpot[i])

    def _arrive(self, i: int, now: float) -> None:
        req = self.w.requests[i]
        bt = self.bt
        n_full = req.input_length // bt
        keys = kvkeys.block_keys(list(req.hash_ids[:n_full]), self.digest, 1) if n_full else []
        r = SimRequest(i, req.request_id or str(i), now, req.input_length, req.max_tokens, keys)
        self._win.arrived(req.input_length, req.max_tokens)
        rr = RouteRequest(r.rid, keys=keys, num_tokens=req.input_length)
        cands = self._candidates(keys) if self.cfg.candidates else None
        d = self.router.route(rr, now, candidates=cands)
        w = self.by_id[d.worker_id]
        r.worker = w.index
        self.worker_of[i] = w.index
        site = w.site_obj  # type: ignore[attr-defined]
        if site.rtt_s > 0:
            self.rtt[i] = site.rtt_s
            self._push(now + site.rtt_s / 2, _DELIVER, w, r)
        else:
            self._deliver(w, r, now)

    def _deliver(self, w: SimWorker, r: SimRequest, now: float) -> None:
        r.t_sent = now
        w.enqueue(r, now)
        if w.mode != PREFILL:
            self._wake(w, now)
        else:
            self._report(w, now)

    def _candidates(self, keys: list[bytes]) -> list[str]:
        """Cache holders of the prompt's first blocks plus K sampled live workers."""
        k = self.cfg.candidates or 0
        live = self._live_ids()
        out = set(self.rng.sample(live, min(k, len(live))))
        index = self.router.index
        # the deepest block anyone holds (or is predicted to): few workers, the best matches
        for m in index.held_masks_deepest_first(keys, self.router.recent.masks):
            holders = index.sample_owners(m, k, self.rng)
            if holders:
                out.update(holders)
                break
        return list(out)

    def _live_ids(self) -> list[str]:
        if self._live_cache is None:
            self._live_cache = [
                w.worker_id
                for w in self.workers
                if w.ready and not w.draining and w.stopped_at is None and w.role != "decode"
            ]
        return self._live_cache

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        wall0 = time.perf_counter()
        reqs = self.w.requests
        t0 = reqs[0].arrival_s if reqs else 0.0
        self._live_cache = None
        if cfg.disagg:
            n_pre = cfg.num_prefill or max(1, cfg.num_workers // 2)
            for _ in range(n_pre):
                self.add_worker("prefill", 0.0)
            for _ in range(max(1, cfg.num_workers - n_pre)):
                self.add_worker("decode", 0.0)
        else:
            for _ in range(cfg.num_workers):
                self.add_worker("mixed", 0.0)
        if cfg.planner is not None:
            self._push(cfg.planner_interval_s, _TICK, None)
        self._pool_sample(0.0)
        heap = self.heap
        n = len(reqs)
        i = 0
        last_t = 0.0
        while i < n or heap:
            ta = reqs[i].arrival_s - t0 if i < n else float("inf")
            if heap and heap[0][0] <= ta:
                t, _, kind, obj, extra = heapq.heappop(heap)
                self.now = last_t = t
                self.events += 1
                if kind == _WAKE:
                    if extra == obj.version:
                        self._wake(obj, t)
                elif kind == _DELIVER:
                    self._deliver(obj, extra, t)
                elif kind == _HANDOFF:
                    extra.t_first = t  # the first token leaves with the transferred KV
                    self._win.first_token(t - extra.t_arrival + self.rtt[extra.idx])
                    obj.start_decode(extra, t)
                    self.decode_router.on_first_token(extra.rid, t)  # type: ignore[union-attr]
                    self._wake(obj, t)
                elif kind == _READY:
                    if obj.stopped_at is None:
                        self._register(obj, t)
                        self._live_cache = None
                        if obj.draining:
                            self._maybe_remove(obj, t)
                elif kind == _TICK:
                    self._tick(t)
                    if i < n or any(not w.idle() for w in self.workers):
                        self._push(t + cfg.planner_interval_s, _TICK, None)
            else:
                self.now = last_t = ta
                self.events += 1
                self._arrive(i, ta)
                i += 1
        end = last_t
        for w in self.workers:
            w.close_busy(end)
        self.wall_s = time.perf_counter() - wall0
        return self.results(end)

    # ---- planner -------------------------------------------------------------------------

    def _pool_sample(self, now: float) -> None:
        sizes: dict[str, int] = {}
        for w in self.workers:
            if w.stopped_at is None:
                sizes[self.pool_of[w.worker_id]] = sizes.get(self.pool_of[w.worker_id], 0) + 1
        self.pool_sizes.append((now, sizes))

    def pool_states(self, now: float) -> dict[str, PoolState]:
        pools: dict[str, PoolState] = {}
        for w in self.workers:
            if w.stopped_at is not None:
                continue
            p = self.pool_of[w.worker_id]
            st = pools.setdefault(p, PoolState(p))
            st.replicas.append(
                ReplicaView(
                    w.worker_id,
                    ready=w.ready,
                    draining=w.draining,
                    num_active=w.num_active(),
                    kv_usage=w.kv_usage(),
                    waiting_prefill_tokens=w.waiting_prefill_tokens(),
                    started_at=w.started_at,
                    cost_per_hour=w.site_obj.cost_per_gpu_hour,  # type: ignore[attr-defined]
                )
            )
        return pools

    def _tick(self, now: float) -> None:
        live = [w for w in self.workers if w.stopped_at is None and w.ready]
        obs = self._win.close(
            now,
            queued_requests=sum(len(w.queue) for w in live),
            waiting_prefill_tokens=sum(w.waiting_prefill_tokens() for w in live),
            running_requests=sum(w.n_decoding for w in live),
        )
        actions = self.cfg.planner.step(now, obs, self)
        self.actions.extend({"t": now, **a.to_dict()} for a in actions)
        self._pool_sample(now)

    # ---- results -------------------------------------------------------------------------

    def results(self, end: float) -> dict[str, Any]:
        cfg, calib = self.cfg, self.calib
        reqs = self.w.requests
        t0 = reqs[0].arrival_s if reqs else 0.0
        arr = np.array([r.arrival_s - t0 for r in reqs])
        ins = np.array([r.input_length for r in reqs], dtype=np.int64)
        outs = np.array([r.max_tokens for r in reqs], dtype=np.int64)
        m = (arr >= cfg.warmup_s) & ~np.isnan(self.ttft)
        ttft, tpot = self.ttft[m], self.tpot[m]
        good = (ttft <= cfg.slo_ttft_s) & (np.isnan(tpot) | (tpot <= cfg.slo_tpot_s))
        span = max(end - max(cfg.warmup_s, 0.0), 1e-9)
        routed = np.array([w.routed for w in self.workers if w.role != "decode"], dtype=float)
        busy = np.array([w.busy_s for w in self.workers if w.role != "decode"], dtype=float)

        gpu_h = cost = energy_j = 0.0
        for w in self.workers:
            stop = w.stopped_at if w.stopped_at is not None else end
            alive = max(0.0, stop - w.started_at)
            gpu_h += alive / 3600
            cost += alive / 3600 * w.site_obj.cost_per_gpu_hour  # type: ignore[attr-defined]
            energy_j += calib.idle_w * alive + (calib.busy_w - calib.idle_w) * w.busy_s
        out_tok = int(outs[m].sum())
        mean_routed = routed.mean() if routed.size else 0.0
        return {
            "config": {
                "workers": cfg.num_workers,
                "policy": cfg.policy,
                "disagg": cfg.disagg,
                "candidates": cfg.candidates,
                "slo_ttft_s": cfg.slo_ttft_s,
                "slo_tpot_s": cfg.slo_tpot_s,
                "calibration": calib.meta.get("source", "")[:80],
                "calibration_measured": bool(calib.meta.get("measured", False)),
            },
            "workload": self.w.name,
            "requests": len(reqs),
            "completed": self.completed,
            "failed": self.failed,
            "counted": int(m.sum()),
            "sim_duration_s": end,
            "wall_s": self.wall_s,
            "events": self.events,
            "hit_rate": float(self.cached[m].sum() / max(1, ins[m].sum())),
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p90_s": percentile(ttft, 90),
            "ttft_p99_s": percentile(ttft, 99),
            "tpot_p50_s": percentile(tpot, 50),
            "tpot_p99_s": percentile(tpot, 99),
            "e2e_p50_s": percentile(self.e2e[m], 50),
            "goodput_fraction": float(good.mean()) if good.size else 0.0,
            "goodput_rps": float(good.sum() / span),
            "output_tokens_per_s": out_tok / span,
            "load_skew_max_over_mean": float(routed.max() / mean_routed) if mean_routed else None,
            "load_max_over_min": float(routed.max() / max(1.0, routed.min()))
            if routed.size
            else None,
            "busy_skew_max_over_mean": float(busy.max() / busy.mean())
            if busy.size and busy.mean()
            else None,
            "gpu_hours": gpu_h,
            "cost": cost,
            "energy_j_per_output_token": energy_j / max(1, out_tok),
            "scale_actions": len(self.actions),
        }


def _round_rel(x: float, step: float = 0.1) -> float:
    """``x`` rounded to a geometric grid of ``step`` relative spacing."""
    if x <= 0:
        return x
    return math.exp(round(math.log(x) / step) * step)


_gc_depth = 0


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Keep the cyclic collector from re-walking the simulation's long-lived objects.

    A large run holds millions of objects that live to its end (the workload's requests,
    the index's keys and masks, the workers' caches) and allocates fast, so the default
    thresholds trigger full collections that walk all of them again and again: at 1,000
    workers a quarter of the run. Within the block, what exists is frozen and the young
    generation is collected less often (as ``kvgrid.gc_tuning.tune_gc`` does for the
    router process); settings are restored on exit. Reentrant. Collection never affects
    what the simulation computes, only when memory is reclaimed.
    """
    global _gc_depth
    outer = _gc_depth == 0
    old = gc.get_threshold()
    # a process that froze its own heap (kvgrid.gc_tuning.tune_gc) keeps it frozen
    unfreeze = outer and gc.get_freeze_count() == 0
    _gc_depth += 1
    gc.freeze()  # also on nested entry: what the outer block built since is long-lived too
    gc.set_threshold(*gc_tuning.THRESHOLDS)
    try:
        yield
    finally:
        _gc_depth -= 1
        if outer:
            gc.set_threshold(*old)
            if unfreeze:
                gc.unfreeze()


def simulate(workload: Workload, cfg: SimConfig | None = None, **kw: Any) -> dict[str, Any]:
    """Run one simulation; keyword arguments override fields of ``cfg``."""
    cfg = cfg or SimConfig()
    for k, v in kw.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown simulator option {k!r}")
        setattr(cfg, k, v)
    with quiet_gc():
        fleet = Fleet(workload, cfg)
        res = fleet.run()
    res["fleet"] = fleet
    return res
