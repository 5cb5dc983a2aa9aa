"""SLA planner: sizes the prefill and decode pools to TTFT and ITL targets at percentiles.

One planner for the simulator and a live ``kvgrid serve``:
``Planner.decide(now, observed, pools) -> list[ScaleAction]``, called every interval with
what was observed since the last call and the pools' replicas. ``Planner.step`` does that
against an ``Actuator`` (the simulated fleet, or the live server's worker processes): it
starts replicas ("add": usable after their start-up time) and drains them ("drain": route
nothing new there, let in-flight requests finish, then stop the process), so a scale-down
loses no request. ``ObservationWindow`` collects what the planner observes, in both.

Model (per pool, from the engine calibration):
- Prefill is a queue with c servers (the router spreads work like a shared queue). The
  service time S of a request is its uncached prefill plus the decode steps its chunks
  carry; its variability enters through the Allen-Cunneen factor (1 + cv^2) / 2, and the
  waiting-time tail of M/M/c (Erlang C: P(W > t) = C(c, a) e^{-(c mu - lambda) t}) gives the
  smallest c whose TTFT percentile S + W_q(p) meets the target.
- Decode: each running request holds (input + output) tokens of KV and a batch slot; the
  decode step time at batch B and KV K must leave the ITL target met once stretched by the
  prefill share of the worker's time (chunked prefill runs in the same steps); Little's law
  gives the running requests, and the KV capacity caps B.
- The load planned for is the larger of the smoothed current rate and its trend
  extrapolated over the start-up time plus one interval, so replicas are ready when needed.
- Feedback: when the observed TTFT percentile misses the target the planned load is scaled
  up (and relaxes back slowly), which absorbs what the model misses (cache hits, skew).
  Misses right after a scale-up (replicas starting, the old backlog draining) are already
  being answered and do not count. Disaggregated, the decode pool has its own: the observed
  inter-token latency percentile against the ITL target scales the load it plans for.
- Bounds: ``min_replicas``/``max_replicas`` for every pool, ``pool_min``/``pool_max`` for
  one (a live server's --max-prefill-workers).
- Hysteresis: scale up at once (counting replicas still starting). Scale down only to the
  largest size wanted over the last ``down_ticks`` intervals at ``down_margin`` more load
  (sustained headroom, so Poisson noise in a steady rate cannot drain a replica that the next
  noisy window adds back), never below one more than the size at the last real TTFT miss
  while the load is still at that miss's level, not within ``cooldown_s`` of a scale-up, and
  by at most ``max_down_step`` per interval.
- Consolidation on scale-down: replicas still starting go first (no cache, no work), then
  those of the dearest site (sites price their GPUs differently), then the ones with the
  least in-flight work and KV (they drain soonest and lose the least cache).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from kvgrid.keys import DEFAULT_BLOCK_SIZE
from kvgrid.planner.calibration import Calibration, load_calibration
from kvgrid.slo import DEFAULT_ITL_TARGET_S, DEFAULT_TTFT_PERCENTILE, DEFAULT_TTFT_TARGET_S
from kvgrid.stats import ewma, quantile
from kvgrid.transfer.model import DEFAULT_LAND_BYTES_PER_S


@dataclass
class ObservedMetrics:
    window_s: float
    arrival_rate: float  # requests/s over the window
    mean_input_tokens: float = 0.0
    mean_output_tokens: float = 0.0
    ttft_s: list[float] = field(default_factory=list)  # first tokens seen in the window
    tpot_s: list[float] = field(default_factory=list)
    queued_requests: int = 0
    waiting_prefill_tokens: int = 0
    running_requests: int = 0
    hit_rate: float | None = None  # prompt tokens served from cache, if known


@dataclass
class ReplicaView:
    worker_id: str
    ready: bool = True
    draining: bool = False
    num_active: int = 0
    kv_usage: float = 0.0
    waiting_prefill_tokens: int = 0
    started_at: float = 0.0
    cost_per_hour: float = 0.0  # its site's price: of replicas alike, the dearest goes first


@dataclass
class PoolState:
    pool: str  # "mixed" | "prefill" | "decode"
    replicas: list[ReplicaView] = field(default_factory=list)

    def serving(self) -> list[ReplicaView]:
        """Replicas that count as capacity (ready or starting, not draining)."""
        return [r for r in self.replicas if not r.draining]


@dataclass
class ScaleAction:
    kind: str  # "add" | "drain"
    pool: str
    count: int = 1
    worker_id: str | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PlannerConfig:
    ttft_target_s: float = DEFAULT_TTFT_TARGET_S
    ttft_percentile: float = DEFAULT_TTFT_PERCENTILE
    itl_target_s: float = DEFAULT_ITL_TARGET_S
    min_replicas: int = 1
    max_replicas: int = 1024
    max_utilization: float = 0.85  # of a replica's prefill time and KV
    startup_s: float | None = None  # None: the calibration's
    interval_s: float = 10.0
    down_ticks: int = 12
    down_margin: float = 0.2
    cooldown_s: float = 60.0
    max_down_step: int = 2
    rate_smoothing: float = 0.5  # EMA weight of the newest window
    trend_windows: int = 6
    trend_z: float = 3.0
    service_cv: float = 0.5  # coefficient of variation of prefill service times
    disagg: bool = False
    # bounds of single pools ({"prefill": 4}); pools not named: min_replicas, max_replicas
    pool_min: dict[str, int] = field(default_factory=dict)
    pool_max: dict[str, int] = field(default_factory=dict)

    def bounds(self, pool: str) -> tuple[int, int]:
        """(fewest, most) replicas of ``pool``."""
        return (
            self.pool_min.get(pool, self.min_replicas),
            self.pool_max.get(pool, self.max_replicas),
        )


class Actuator(Protocol):
    """What the planner acts on: the simulated fleet or the live server's processes."""

    def pool_states(self, now: float) -> dict[str, PoolState]: ...

    def add_replicas(self, pool: str, count: int, now: float) -> None: ...

    def drain(self, worker_id: str, now: float) -> None: ...


def apply_actions(actions: list[ScaleAction], actuator: Actuator, now: float) -> None:
    for a in actions:
        if a.kind == "add":
            actuator.add_replicas(a.pool, a.count, now)
        elif a.kind == "drain" and a.worker_id:
            actuator.drain(a.worker_id, now)


class ObservationWindow:
    """What the planner observes between two ticks: arrivals, first tokens, finishes."""

    def __init__(self, t0: float = 0.0) -> None:
        self.t0 = t0
        self.n = 0
        self.in_tok = 0
        self.out_tok = 0
        self.ttft: list[float] = []
        self.tpot: list[float] = []

    def arrived(self, n_in: int, n_out: int) -> None:
        self.n += 1
        self.in_tok += n_in
        self.out_tok += n_out

    def first_token(self, ttft: float) -> None:
        # at the first token, as a live frontend sees it: a planner must not learn of a
        # TTFT miss only when the request's whole output is done
        self.ttft.append(ttft)

    def finished(self, tpot: float) -> None:
        if tpot == tpot:  # not NaN (single-token outputs have none)
            self.tpot.append(tpot)

    def close(
        self,
        now: float,
        queued_requests: int = 0,
        waiting_prefill_tokens: int = 0,
        running_requests: int = 0,
    ) -> ObservedMetrics:
        """The window's observations (plus the fleet's queues now); starts the next one."""
        dt = max(now - self.t0, 1e-9)
        obs = ObservedMetrics(
            window_s=dt,
            arrival_rate=self.n / dt,
            mean_input_tokens=self.in_tok / self.n if self.n else 0.0,
            mean_output_tokens=self.out_tok / self.n if self.n else 0.0,
            ttft_s=self.ttft,
            tpot_s=self.tpot,
            queued_requests=queued_requests,
            waiting_prefill_tokens=waiting_prefill_tokens,
            running_requests=running_requests,
        )
        self.__init__(now)
        return obs


def erlang_c(c: int, a: float) -> float:
    """Probability that an arrival waits in M/M/c with offered load a = lambda / mu."""
    if a <= 0:
        return 0.0
    if a >= c:
        return 1.0
    # the Erlang B recursion is stable for large c
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    rho = a / c
    return b / (1 - rho + rho * b)


class Planner:
    def __init__(self, cfg: PlannerConfig | None = None, calib: Calibration | None = None) -> None:
        self.cfg = cfg or PlannerConfig()
        self.calib = calib or load_calibration()
        self.startup_s = self.calib.startup_s if self.cfg.startup_s is None else self.cfg.startup_s
        self.rate = None  # smoothed arrival rate
        self.rates: deque[float] = deque(maxlen=self.cfg.trend_windows)
        self.mean_in = 0.0
        self.mean_out = 0.0
        self.boost = 1.0  # feedback on observed TTFT misses
        self.itl_boost = 1.0  # the decode pool's, on observed ITL misses (disaggregated)
        self.last_obs: dict[str, float | None] = {}  # what the last decision saw, to explain it
        self.down_hist: dict[str, deque[int]] = {}  # per pool: sizes wanted, last intervals
        self.miss_floor: dict[str, tuple[int, float]] = {}  # per pool: (size, rate) at a miss
        self.missed = False
        self.prev_waiting = 0
        # arrival rates over the scale-down window: the level a miss happened at, and whether
        # the load has really fallen since (every window of it, not one noisy dip)
        self.slow_rates: deque[float] = deque(maxlen=max(1, self.cfg.down_ticks))
        self.last_up: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []

    # ---- model ---------------------------------------------------------------------------

    def _prefill_service(self, mean_in: float, hit: float, decoders: float) -> float:
        c = self.calib
        u = max(1.0, mean_in * (1 - hit))
        s = c.prefill_s(int(u), int(mean_in - u))
        if decoders > 0:
            s += math.ceil(u / c.max_num_batched_tokens) * c.decode_step_s(
                int(decoders), decoders * (mean_in + self.mean_out / 2)
            )
        return s

    def _handoff_s(self, mean_in: float, prefill_s: float) -> float:
        """The KV transfer after a disaggregated prefill (the router's and the simulator's
        model: ``kvgrid.transfer.model``)."""
        c = self.calib
        bt = DEFAULT_BLOCK_SIZE
        per_step = max(1, c.max_num_batched_tokens // bt)
        g2 = c.tier_bytes_per_s.get("G2") or DEFAULT_LAND_BYTES_PER_S
        n = int(mean_in) // bt
        return c.transfer.handoff_s(n, bt * c.kv_bytes_per_token, prefill_s, per_step, g2)

    def _ttft_ok(self, n: int, lam: float, s: float, after_s: float = 0.0) -> bool:
        """``after_s``: what every first token also waits for after its prefill (a
        disaggregated pool's KV transfer)."""
        cfg = self.cfg
        a = lam * s
        if a >= n * cfg.max_utilization:
            return False
        mu = 1 / s
        budget = cfg.ttft_target_s - s - after_s
        if budget <= 0:
            return False
        pw = erlang_c(n, a) * (1 + cfg.service_cv**2) / 2
        tail = 1 - cfg.ttft_percentile
        if pw <= tail:
            return True
        wq = math.log(pw / tail) / (n * mu - lam)
        return wq <= budget

    def _decode_ok(self, n: int, lam: float, mean_in: float, mean_out: float, rho_p: float) -> bool:
        c, cfg = self.calib, self.cfg
        if rho_p >= 1:
            return False
        # Little: running requests = rate x decode time (iterate once on the step time)
        step = c.decode_step_s(1, mean_in)
        for _ in range(3):
            tpot = step / (1 - rho_p)
            b = lam * mean_out * tpot / n
            step = c.decode_step_s(max(1, math.ceil(b)), b * (mean_in + mean_out / 2))
        tpot = step / (1 - rho_p)
        kv_per_req = mean_in + mean_out
        b = lam * mean_out * tpot / n
        kv_ok = b * kv_per_req <= cfg.max_utilization * c.kv_capacity_tokens
        return tpot <= cfg.itl_target_s and b <= c.max_num_seqs and kv_ok

    def required(self, lam: float, mean_in: float, mean_out: float, hit: float = 0.0) -> dict:
        """Replicas per pool for arrival rate ``lam`` (requests/s)."""
        cfg = self.cfg
        if lam <= 0:
            pools = ("prefill", "decode") if cfg.disagg else ("mixed",)
            return {p: cfg.bounds(p)[0] for p in pools}
        if cfg.disagg:
            s = self._prefill_service(mean_in, hit, 0)
            handoff = self._handoff_s(mean_in, s)
            n_p = self._search(lambda n: self._ttft_ok(n, lam, s, handoff))
            lam_d = lam * self.itl_boost
            n_d = self._search(lambda n: self._decode_ok(n, lam_d, mean_in, mean_out, 0.0))
            return {"prefill": n_p, "decode": n_d}

        def ok(n: int) -> bool:
            decoders = lam * mean_out * self.calib.decode_step_s(8, 8 * mean_in) / n
            s = self._prefill_service(mean_in, hit, decoders)
            rho_p = lam * s / n
            return self._ttft_ok(n, lam, s) and self._decode_ok(n, lam, mean_in, mean_out, rho_p)

        return {"mixed": self._search(ok)}

    def _search(self, ok) -> int:
        cfg = self.cfg
        n = cfg.min_replicas
        while n < cfg.max_replicas and not ok(n):
            n = n + 1 if n < 16 else n + max(1, n // 16)
        return min(n, cfg.max_replicas)

    # ---- decisions -----------------------------------------------------------------------

    def _observe(self, obs: ObservedMetrics, now: float, settling: bool) -> float:
        cfg = self.cfg
        a = cfg.rate_smoothing
        self.rate = ewma(self.rate, obs.arrival_rate, a)
        if obs.arrival_rate == 0 and self.rate * obs.window_s < 0.5:
            # not one request in this window, nor half of one expected: the load is gone
            # (a smoothed rate only ever approaches zero, and any rate plans for capacity)
            self.rate = 0.0
        self.rates.append(obs.arrival_rate)
        self.slow_rates.append(obs.arrival_rate)
        if obs.arrival_rate > 0:
            first = not self.mean_in  # the first window's means are taken whole
            self.mean_in = ewma(None if first else self.mean_in, obs.mean_input_tokens, a)
            self.mean_out = ewma(None if first else self.mean_out, obs.mean_output_tokens, a)
        # feedback: misses raise the planned load; meeting it comfortably lowers it again.
        # Not while settling after a scale-up or while the backlog shrinks: those misses are
        # already being answered.
        self.missed = False
        self.last_obs = {
            "ttft_p": quantile(obs.ttft_s, cfg.ttft_percentile, "rank"),
            "itl_p": quantile(obs.tpot_s, cfg.ttft_percentile, "rank"),
        }
        # a backlog that shrinks means the capacity suffices: its misses are old work
        draining = obs.waiting_prefill_tokens < 0.9 * self.prev_waiting
        self.prev_waiting = obs.waiting_prefill_tokens
        settling = settling or draining
        if len(obs.ttft_s) >= 20:
            p = self.last_obs["ttft_p"]
            # requests that waited p seconds arrived before the replicas of the last
            # scale-up were ready: their miss says nothing about the pool as it is now
            before_up = now - p < max(self.last_up.values(), default=-1e18) + self.startup_s
            if p > cfg.ttft_target_s and not (settling or before_up):
                self.boost = min(3.0, self.boost * 1.15)
                self.missed = True
            elif p < 0.5 * cfg.ttft_target_s:
                self.boost = max(1.0, self.boost * 0.97)
        if cfg.disagg and len(obs.tpot_s) >= 20:
            p = self.last_obs["itl_p"]
            if p > cfg.itl_target_s and not settling:
                self.itl_boost = min(3.0, self.itl_boost * 1.15)
            elif p < 0.5 * cfg.itl_target_s:
                self.itl_boost = max(1.0, self.itl_boost * 0.97)
        # trend over the last windows, extrapolated to when a new replica would be ready
        horizon = self.startup_s + cfg.interval_s
        # only a ramp that Poisson noise cannot explain counts: the least-squares slope over
        # the last windows must exceed `trend_z` standard errors (a window's rate estimate
        # varies by rate / window). A steady load then almost never shows a false ramp.
        trend = 0.0
        ys = list(self.rates)
        if len(ys) == self.rates.maxlen and len(ys) >= 3:
            dt = max(obs.window_s, 1e-9)
            xs = [(i - (len(ys) - 1) / 2) * dt for i in range(len(ys))]
            sxx = sum(x * x for x in xs)
            mean = sum(ys) / len(ys)
            slope = sum(x * y for x, y in zip(xs, ys)) / sxx
            se = math.sqrt(max(mean, 1e-9) / dt / sxx)
            if slope > cfg.trend_z * se:
                trend = slope * horizon
        return max(self.rate, self.rate + trend) * self.boost

    def decide(
        self, now: float, observed: ObservedMetrics, pools: dict[str, PoolState]
    ) -> list[ScaleAction]:
        cfg = self.cfg
        starting = any(not r.ready for p in pools.values() for r in p.replicas)
        last_up = max(self.last_up.values(), default=-1e18)
        settling = starting or now - last_up < self.startup_s + 2 * cfg.interval_s
        lam = self._observe(observed, now, settling)
        hit = observed.hit_rate or 0.0
        need = self.required(lam, self.mean_in, self.mean_out, hit)
        # a backlog the pool cannot clear within the TTFT target needs capacity by the time
        # new replicas are up (the queue a steady load always has does not: counting it would
        # add a replica whenever a snapshot happens to catch one); capped so that a burst
        # cannot ask for an unbounded fleet
        key = "prefill" if cfg.disagg else "mixed"
        serving_now = len(pools[key].serving()) if key in pools else 0
        backlog_s = (
            self.calib.prefill_s(int(observed.waiting_prefill_tokens))
            if observed.waiting_prefill_tokens
            else 0.0
        )
        if self.mean_in and backlog_s > max(1, serving_now) * cfg.ttft_target_s:
            extra = math.ceil(backlog_s / (self.startup_s + cfg.interval_s))
            need[key] = need.get(key, 0) + min(extra, need.get(key, 0) // 2 + 1)
        # the level a scale-down must still satisfy: more load than now, by the margin
        need_down = self.required(lam * (1 + cfg.down_margin), self.mean_in, self.mean_out, hit)
        actions: list[ScaleAction] = []
        for name, want in need.items():
            pool = pools.get(name, PoolState(name))
            serving = pool.serving()
            have = len(serving)
            lo, hi = cfg.bounds(name)
            want = max(lo, min(hi, want))
            hist = self.down_hist.setdefault(name, deque(maxlen=max(1, cfg.down_ticks)))
            hist.append(max(want, need_down.get(name, want)))
            if self.missed:
                # this size was not enough for this load: do not come back down to it
                level = sum(self.slow_rates) / len(self.slow_rates)
                self.miss_floor[name] = (have + 1, level)
            if want > have:
                self.last_up[name] = now
                hist.clear()
                why = f"need {want}: {self._explain(name, lam, observed)}"
                actions.append(ScaleAction("add", name, want - have, reason=why))
                continue
            keep = max(lo, max(hist))
            floor, at_rate = self.miss_floor.get(name, (0, 0.0))
            fallen = (
                len(self.slow_rates) == self.slow_rates.maxlen
                and max(self.slow_rates) < (1 - cfg.down_margin) * at_rate
            )
            if fallen:
                self.miss_floor.pop(name, None)  # the load has fallen well below that miss
            else:
                keep = max(keep, floor)
            if (
                keep < have
                and len(hist) == hist.maxlen
                and now - self.last_up.get(name, -1e18) >= cfg.cooldown_s
            ):
                n = min(cfg.max_down_step, have - keep)
                why = f"keep {keep}: {self._explain(name, lam, observed)}"
                for r in self._victims(serving, n):
                    actions.append(ScaleAction("drain", name, 1, r.worker_id, why))
        self.history.append(
            {"t": now, "rate": lam, "need": need, "boost": self.boost, "actions": len(actions)}
        )
        return actions

    def _explain(self, pool: str, lam: float, obs: ObservedMetrics) -> str:
        """The numbers a decision for ``pool`` rests on: the load planned for, and what was
        observed against the target that pool answers for."""
        cfg = self.cfg
        pct = f"p{round(cfg.ttft_percentile * 100)}"
        load = f"{lam:.2f} req/s planned, {self.mean_in:.0f}+{self.mean_out:.0f} tokens"
        if pool == "decode":
            itl = self.last_obs.get("itl_p")
            seen = f"{itl * 1e3:.0f}ms" if itl is not None else "-"
            return f"{load}, ITL {pct} {seen} vs {cfg.itl_target_s * 1e3:.0f}ms target"
        ttft = self.last_obs.get("ttft_p")
        seen = f"{ttft:.3g}s" if ttft is not None else "-"
        return (
            f"{load}, TTFT {pct} {seen} vs {cfg.ttft_target_s:.3g}s target, "
            f"{obs.waiting_prefill_tokens} prompt tokens queued"
        )

    def step(self, now: float, observed: ObservedMetrics, actuator: Actuator) -> list[ScaleAction]:
        """One planner interval against an actuator: decide, then act."""
        actions = self.decide(now, observed, actuator.pool_states(now))
        apply_actions(actions, actuator, now)
        return actions

    def resize(self, pools: dict[str, PoolState], pool: str, n: int) -> list[ScaleAction]:
        """Actions that bring ``pool`` to ``n`` serving replicas now (an operator's order),
        choosing what to drain as a scale-down of the planner's own would."""
        return resize_actions(pools, pool, n)

    def recalibrate(self, calib: Calibration) -> None:
        """New engine speeds (a live server's own measurements); the planner's history of
        rates and misses stays."""
        self.calib = calib
        if self.cfg.startup_s is None:
            self.startup_s = calib.startup_s

    @staticmethod
    def _victims(serving: list[ReplicaView], n: int) -> list[ReplicaView]:
        ranked = sorted(
            serving,
            key=lambda r: (
                r.ready,
                -r.cost_per_hour,
                r.num_active,
                r.waiting_prefill_tokens,
                r.kv_usage,
                r.worker_id,
            ),
        )
        return ranked[:n]


def resize_actions(pools: dict[str, PoolState], pool: str, n: int) -> list[ScaleAction]:
    """What brings ``pool`` to ``n`` serving replicas (Planner.resize; needs no model)."""
    serving = pools.get(pool, PoolState(pool)).serving()
    if n > len(serving):
        return [ScaleAction("add", pool, n - len(serving), reason=f"resize to {n}")]
    return [
        ScaleAction("drain", pool, 1, r.worker_id, f"resize to {n}")
        for r in Planner._victims(serving, len(serving) - n)
    ]
