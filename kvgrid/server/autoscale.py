"""Live scaling for `kvgrid serve`: the SLA planner of the simulator on real worker processes.

The frontend process runs it. Every interval the planner (kvgrid.planner.planner.Planner, the
same class the fleet simulator drives) sees what the frontend observed: arrivals and first
tokens as clients saw them, and the queues from the workers' load reports. It acts through
``LiveActuator``: "add" has a ``Launcher`` start a worker (a `kvgrid worker` process under
the serve supervisor, or a Ray actor: kvgrid.server.ray), which joins the router when its
engine is up; "drain" makes the router send nothing new there, waits until the requests in
flight on it have finished, then has the launcher stop it, and forgets it. An operator can
also resize the pool at once (``POST /admin/scale``).

With role pools (`kvgrid serve --prefill-workers N --decode-workers M --autoscale`) the
planner sizes the prefill and the decode pool apart, as it does in the simulator: the
prefill pool against the TTFT target (the first tokens clients saw, the prompt tokens queued
on the workers), the decode pool against the ITL target (the inter-token latencies clients
saw), each within its own bounds. A new worker starts in the role of its pool; a drained
one is a worker of the pool that shrinks.

The planner models the workers from what this router measures (``observed_calibration``:
the prefill speed and decode step time in their load reports, their KV capacity, the time a
started worker took to join), refreshed every interval; it decides nothing until a worker
has measured itself. Engines measure their prefill speed only on long enough prefills, so
while none has, the autoscaler runs a calibration request of its own on a worker (a prompt
long enough, a few decode steps). A calibration file (``--calibration``, this machine's
measured step times) replaces all that; never a model of another machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kvgrid.planner.calibration import Calibration
from kvgrid.planner.planner import (
    ObservationWindow,
    Planner,
    PlannerConfig,
    PoolState,
    ReplicaView,
    ScaleAction,
    apply_actions,
    resize_actions,
)

if TYPE_CHECKING:
    from kvgrid.server.frontend import Frontend

log = logging.getLogger(__name__)

POOL = "mixed"  # no disaggregation: one pool of workers that prefill and decode
ROLE_OF_POOL = {POOL: "both", "prefill": "prefill", "decode": "decode"}
POOL_OF_ROLE = {role: pool for pool, role in ROLE_OF_POOL.items()}
PREFIX = {POOL: "w", "prefill": "p", "decode": "d"}  # of the worker ids of each pool


@dataclass
class Replica:
    worker_id: str
    url: str | None  # None until the launcher knows it (a Ray actor picks its own port)
    started_at: float
    joined_at: float | None = None  # first seen up by the router
    draining_since: float | None = None
    inflight_at_drain: int = 0  # requests it still had to finish when the drain began
    stopped_at: float | None = None
    cost_per_hour: float = 0.0  # its site's price (kvgrid.router.sites)
    where: dict[str, Any] | None = None  # the launcher's view: process, node, site, restarts
    role: str = "both"  # prefill | decode | both: the pool it belongs to

    @property
    def pool(self) -> str:
        return POOL_OF_ROLE[self.role]


class Launcher(Protocol):
    """Starts and stops the workers of one server: local processes or Ray actors."""

    def launch(self, worker_id: str, role: str = "both") -> Replica:
        """Start a worker in ``role`` (it registers with the router once its engine is up)."""
        ...

    def detach(self, worker_id: str) -> None:
        """Stop following the worker (it is about to stop; no probe may bring it back)."""
        ...

    def retire(self, worker_id: str) -> None:
        """Stop it for good, blocking until it is gone (called from a thread)."""
        ...

    def describe(self, worker_id: str) -> dict[str, Any]:
        """Where and how it runs, for ``GET /admin/scale``."""
        ...


class LiveActuator:
    """The planner's actuator (kvgrid.planner.planner.Actuator) on live workers."""

    def __init__(
        self,
        fe: Frontend,
        launcher: Launcher,
        max_workers: int,
        drain_timeout_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        pool_max: dict[str, int] | None = None,
    ) -> None:
        """``max_workers``: processes at once, all pools together (the machine's cores are
        divided among that many); ``pool_max``: the most of one pool."""
        self.fe, self.launcher = fe, launcher
        self.max_workers = max_workers
        self.pool_max = dict(pool_max or {})
        self.drain_timeout_s = drain_timeout_s
        self.clock = clock
        self.replicas: dict[str, Replica] = {}
        self.retired: list[Replica] = []
        self._next: dict[str, int] = {}  # per worker id prefix
        self._tasks: set[asyncio.Task] = set()

    @property
    def pools(self) -> list[str]:
        """The pools this server runs: role pools, or the one mixed pool."""
        return [p for p in ("prefill", "decode") if p in self.pool_max] or [POOL]

    def adopt(self, r: Replica) -> None:
        """A worker started before the actuator (`kvgrid serve`'s first ones)."""
        self.replicas[r.worker_id] = r
        prefix, i = _index(r.worker_id)
        self._next[prefix] = max(self._next.get(prefix, 0), i + 1)

    def live(self, pool: str | None = None) -> list[Replica]:
        return [
            r
            for r in self.replicas.values()
            if r.draining_since is None and (pool is None or r.pool == pool)
        ]

    # ---- Actuator ------------------------------------------------------------------------

    def pool_states(self, now: float) -> dict[str, PoolState]:
        pools = {p: PoolState(p) for p in self.pools}
        for r in self.replicas.values():
            w = self.fe.router.workers.get(r.worker_id)
            up = w is not None and w.up
            if up and r.joined_at is None:
                r.joined_at = now
            pools.setdefault(r.pool, PoolState(r.pool)).replicas.append(
                ReplicaView(
                    r.worker_id,
                    ready=up,
                    draining=r.draining_since is not None,
                    num_active=w.num_active() if up else 0,
                    kv_usage=w.load.kv_usage if up else 0.0,
                    waiting_prefill_tokens=w.backlog_tokens() if up else 0,
                    started_at=r.started_at,
                    cost_per_hour=r.cost_per_hour,
                )
            )
        return pools

    def add_replicas(self, pool: str, count: int, now: float) -> None:
        # the machine's cores were divided among max_workers processes: never start more
        in_pool = sum(r.pool == pool for r in self.replicas.values())
        count = min(
            count,
            self.max_workers - len(self.replicas),
            self.pool_max.get(pool, self.max_workers) - in_pool,
        )
        role, prefix = ROLE_OF_POOL[pool], PREFIX[pool]
        for _ in range(max(0, count)):
            wid = f"{prefix}{self._next.get(prefix, 0)}"
            self._next[prefix] = self._next.get(prefix, 0) + 1
            r = self.launcher.launch(wid, role) if role != "both" else self.launcher.launch(wid)
            r.started_at, r.role = now, role
            self.replicas[wid] = r
            log.info("autoscale: started %s worker %s (%s)", role, wid, r.url or "address pending")

    def drain(self, worker_id: str, now: float) -> None:
        r = self.replicas.get(worker_id)
        if r is None or r.draining_since is not None:
            return
        r.draining_since = now
        w = self.fe.router.workers.get(worker_id)
        if w is not None:
            self.fe.router.set_draining(worker_id)
            r.inflight_at_drain = len(w.inflight)
        log.info("autoscale: draining %s (%d in flight)", worker_id, r.inflight_at_drain)
        task = asyncio.get_running_loop().create_task(self._finish_drain(r))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- draining ------------------------------------------------------------------------

    def _idle(self, r: Replica, quiet_since: list[float]) -> bool:
        """Nothing left to finish there: none of our requests in flight, and a load report
        sent after that says the engine runs and queues nothing (other frontends' work)."""
        w = self.fe.router.workers.get(r.worker_id)
        if w is None or not w.up:
            return True  # never joined, or died: nothing of it can finish any more
        if w.inflight:
            quiet_since.clear()
            return False
        if not quiet_since:
            quiet_since.append(self.clock())
        ld = w.load
        return w.last_seen > quiet_since[0] and ld.num_running == 0 and ld.num_waiting == 0

    async def _finish_drain(self, r: Replica) -> None:
        quiet: list[float] = []
        deadline = self.clock() + self.drain_timeout_s
        while not self._idle(r, quiet):
            if self.clock() > deadline:
                log.warning(
                    "autoscale: %s still busy after %.0fs; stopping it",
                    r.worker_id,
                    self.drain_timeout_s,
                )
                break
            await asyncio.sleep(0.1)
        # stop following it first, so that nothing probes a stopping worker back in
        self.launcher.detach(r.worker_id)
        await asyncio.to_thread(self.launcher.retire, r.worker_id)
        self.fe.router.remove_worker(r.worker_id)
        r.where = self.launcher.describe(r.worker_id)
        r.stopped_at = self.clock()
        self.replicas.pop(r.worker_id, None)
        self.retired.append(r)
        log.info(
            "autoscale: %s drained and stopped after %.1fs",
            r.worker_id,
            r.stopped_at - (r.draining_since or r.stopped_at),
        )

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


CALIBRATION_PROMPT = list(range(1000, 1000 + 320))  # one prefill step long enough to time
CALIBRATION_EVERY_S = 30.0


def observed_calibration(act: LiveActuator, default_startup_s: float = 30.0) -> Calibration | None:
    """The planner's engine model from what the router measures of the workers it has: the
    median prefill speed and decode step time of their load reports, their KV capacity, and
    the time started workers took to join. None until workers have measured both (a prefill
    worker measures only its prefill speed, a decode worker may measure only its steps)."""
    ups = [w for w in act.fe.router.workers.values() if w.up]
    pf = [w.load.prefill_tokens_per_s for w in ups if w.load.prefill_tokens_per_s]
    ds = [w.load.decode_step_s for w in ups if w.load.decode_step_s]
    if not (pf and ds):
        return None
    ups = [w for w in ups if w.load.prefill_tokens_per_s or w.load.decode_step_s]
    info = ups[0].info
    bs = info.block_size
    joins = [r.joined_at - r.started_at for r in act.replicas.values() if r.joined_at is not None]
    return Calibration(
        step_fixed_s=0.0,  # the measured speed is per token of whole steps: fixed cost in it
        per_token_s=1.0 / statistics.median(pf),
        attn_s=0.0,
        decode_fixed_s=statistics.median(ds),
        decode_per_seq_s=0.0,
        decode_per_kv_token_s=0.0,
        kv_bytes_per_token=max(1, info.bytes_per_block // bs),
        kv_capacity_tokens=int(statistics.median(w.load.num_kv_blocks for w in ups)) * bs,
        max_num_batched_tokens=info.max_num_batched_tokens,
        max_num_seqs=256,
        startup_s=statistics.median(joins) if joins else default_startup_s,
        meta={"measured": True, "source": "router load reports", "workers": len(ups)},
    )


class Autoscaler:
    """The planner loop of a live server, and the operator's resize."""

    def __init__(
        self,
        actuator: LiveActuator,
        planner: Planner | PlannerConfig,
        interval_s: float = 10.0,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``planner``: a Planner with its own calibration (a measured file), or the
        config of one whose engine model is ``observed_calibration``, refreshed each tick."""
        self.actuator = actuator
        self.measured = isinstance(planner, PlannerConfig)
        self.planner_config = planner if self.measured else planner.cfg
        self.planner: Planner | None = None if self.measured else planner
        self.interval_s = interval_s
        self.enabled = enabled  # False: only operator resizes, no planner decisions
        self.clock = clock
        self.window = ObservationWindow(clock())
        self.actions: list[dict[str, Any]] = []
        self._task: asyncio.Task | None = None
        self._probed: dict[str, float] = {}  # worker -> when it last got a calibration request
        self._probes: set[asyncio.Task] = set()

    def start(self) -> None:
        self.window = ObservationWindow(self.clock())
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        for t in [self._task, *self._probes]:
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        await self.actuator.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.tick(self.clock())
            except Exception:  # a planner bug must not take the server down with it
                log.exception("autoscale: planner tick failed")

    def _calibrate(self, now: float) -> bool:
        if not self.measured:
            return True
        self.actuator.pool_states(now)  # notes when started workers joined
        cal = observed_calibration(self.actuator)
        if cal is None:
            self._calibration_request(now)
            return False
        if self.planner is None:
            self.planner = Planner(self.planner_config, cal)
            log.info(
                "autoscale: planning from measured speeds: %.0f prefill tok/s, %.3fs decode step",
                1 / cal.per_token_s,
                cal.decode_fixed_s,
            )
        else:
            self.planner.recalibrate(cal)
        return True

    def _calibration_request(self, now: float) -> None:
        """No worker has measured itself: have one measure (a long enough prefill, then a
        few decode steps), at most every CALIBRATION_EVERY_S per worker."""
        fe = self.actuator.fe
        # a worker that decodes: its load reports then carry both speeds
        ups = [
            w for w in fe.router.workers.values() if w.up and not w.draining and w.role != "prefill"
        ]
        if not ups or fe.link.client is None:
            return
        w = min(ups, key=lambda w: self._probed.get(w.worker_id, float("-inf")))
        if now - self._probed.get(w.worker_id, float("-inf")) < CALIBRATION_EVERY_S:
            return
        self._probed[w.worker_id] = now
        body = {
            "request_id": f"calibrate-{w.worker_id}-{int(now * 1000)}",
            "prompt_token_ids": CALIBRATION_PROMPT,
            "params": {"max_tokens": 8, "ignore_eos": True, "temperature": 0.0},
            "tenant": "",
        }

        async def run() -> None:
            try:
                r = await fe.link.client.post(
                    f"{w.info.url}/generate",
                    json=body,
                    headers=fe.link.headers(w.worker_id),
                    timeout=120.0,
                )
                r.raise_for_status()
                log.info("autoscale: ran a calibration request on %s", w.worker_id)
            except Exception as e:  # the next interval tries again (another worker, maybe)
                log.warning("autoscale: calibration request on %s failed: %r", w.worker_id, e)

        task = asyncio.get_running_loop().create_task(run())
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    def tick(self, now: float) -> list[ScaleAction]:
        ups = [w for w in self.actuator.fe.router.workers.values() if w.up]
        obs = self.window.close(
            now,
            queued_requests=sum(w.load.num_waiting for w in ups),
            waiting_prefill_tokens=sum(w.load.waiting_prefill_tokens for w in ups),
            running_requests=sum(w.load.num_running for w in ups),
        )
        if not self._calibrate(now):
            return []  # no worker has measured itself yet: nothing to plan with
        acts = self.planner.step(now, obs, self.actuator)
        self._record(now, acts, "planner")
        self._count_workers(now)
        return acts

    def bounds(self, pool: str) -> tuple[int, int]:
        """(fewest, most) serving workers of ``pool`` an operator may ask for: a pool that
        decodes keeps one; prefill workers may all go (decode workers prefill themselves)."""
        act = self.actuator
        return (0 if pool == "prefill" else 1), act.pool_max.get(pool, act.max_workers)

    def resize(self, n: int, pool: str = POOL) -> list[ScaleAction]:
        """Bring ``pool`` to ``n`` serving workers; ValueError (the caller's 400) outside its
        bounds, or for a pool this server does not run: a request for 99 workers is a
        mistake to report, not to clamp."""
        if pool not in self.actuator.pools:
            raise ValueError(f"this server runs no {pool} pool (it runs {self.actuator.pools})")
        lo, hi = self.bounds(pool)
        flag = "--max-workers" if pool == POOL else f"--max-{pool}-workers"
        if not isinstance(n, int) or isinstance(n, bool) or not lo <= n <= hi:
            raise ValueError(f"{pool} workers must be an integer from {lo} to {hi} ({flag}): {n!r}")
        now = self.clock()
        acts = resize_actions(self.actuator.pool_states(now), pool, n)
        apply_actions(acts, self.actuator, now)
        self._record(now, acts, "operator")
        return acts

    def drain(self, worker_id: str) -> list[ScaleAction]:
        r = self.actuator.replicas.get(worker_id)
        if r is None:
            raise KeyError(worker_id)
        if r.role != "prefill" and sum(x.role != "prefill" for x in self.actuator.live()) <= 1:
            raise ValueError("the last serving worker that decodes cannot be drained")
        now = self.clock()
        acts = [ScaleAction("drain", r.pool, 1, worker_id, "operator")]
        apply_actions(acts, self.actuator, now)
        self._record(now, acts, "operator")
        return acts

    def _record(self, now: float, acts: list[ScaleAction], by: str) -> None:
        metrics = getattr(self.actuator.fe, "metrics", None)
        for a in acts:
            self.actions.append({"t": now, "by": by, "role": ROLE_OF_POOL[a.pool], **a.to_dict()})
            log.info(
                "autoscale (%s): %s %s %s: %s",
                by,
                a.kind,
                a.pool,
                a.worker_id or a.count,
                a.reason,
            )
            if metrics is not None:
                metrics.scale_actions.labels(ROLE_OF_POOL[a.pool], a.kind, by).inc(a.count)

    def _count_workers(self, now: float) -> None:
        metrics = getattr(self.actuator.fe, "metrics", None)
        if metrics is None:
            return
        need = self.planner.history[-1]["need"] if self.planner and self.planner.history else {}
        for pool, st in self.actuator.pool_states(now).items():
            role = ROLE_OF_POOL[pool]
            metrics.scale_workers.labels(role).set(len(st.serving()))
            if pool in need:
                lo, hi = self.planner_config.bounds(pool)
                metrics.scale_target.labels(role).set(max(lo, min(hi, need[pool])))

    def state(self) -> dict[str, Any]:
        act = self.actuator
        router = act.fe.router
        cal = self.planner.calib if self.planner is not None else None
        return {
            "planner": self.enabled,
            "calibration": cal.to_dict() if cal is not None else None,
            "interval_s": self.interval_s,
            "max_workers": act.max_workers,
            "pools": {
                p: {
                    "role": ROLE_OF_POOL[p],
                    "serving": len(act.live(p)),
                    "min": self.planner_config.bounds(p)[0],
                    "max": act.pool_max.get(p, act.max_workers),
                }
                for p in act.pools
            },
            "workers": {
                r.worker_id: {
                    **asdict(r),
                    "where": act.launcher.describe(r.worker_id),
                    "up": bool(router.workers.get(r.worker_id) and router.workers[r.worker_id].up),
                }
                for r in act.replicas.values()
            },
            "retired": [asdict(r) for r in act.retired],
            "actions": self.actions[-200:],
        }


def _index(worker_id: str) -> tuple[str, int]:
    """(prefix, number) of a worker id like p3."""
    prefix = worker_id.rstrip("0123456789")
    try:
        return prefix, int(worker_id[len(prefix) :])
    except ValueError:
        return prefix, -1
