"""Live scaling for `kvgrid serve`: the SLA planner of the simulator on real worker processes.

The frontend process runs it. Every interval the planner (kvgrid.bench.planner.Planner, the
same class the fleet simulator drives) sees what the frontend observed: arrivals and first
tokens as clients saw them, and the queues from the workers' load reports. It acts through
``LiveActuator``: "add" has a ``Launcher`` start a worker (a `kvgrid worker` process under
the serve supervisor, or a Ray actor: kvgrid.server.ray), which joins the router when its
engine is up; "drain" makes the router send nothing new there, waits until the requests in
flight on it have finished, then has the launcher stop it, and forgets it. An operator can
also resize the pool at once (``POST /admin/scale``).

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

from kvgrid.bench.planner import (
    ObservationWindow,
    Planner,
    PlannerConfig,
    PoolState,
    ReplicaView,
    ScaleAction,
    apply_actions,
    resize_actions,
)
from kvgrid.bench.sim.calibration import Calibration

if TYPE_CHECKING:
    from kvgrid.server.frontend import Frontend

log = logging.getLogger(__name__)

POOL = "mixed"  # one machine, no disaggregation: one pool


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


class Launcher(Protocol):
    """Starts and stops the workers of one server: local processes or Ray actors."""

    def launch(self, worker_id: str) -> Replica:
        """Start a worker (it registers with the router once its engine is up)."""
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
    """The planner's actuator (kvgrid.bench.planner.Actuator) on live workers."""

    def __init__(
        self,
        fe: Frontend,
        launcher: Launcher,
        max_workers: int,
        drain_timeout_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fe, self.launcher = fe, launcher
        self.max_workers = max_workers
        self.drain_timeout_s = drain_timeout_s
        self.clock = clock
        self.replicas: dict[str, Replica] = {}
        self.retired: list[Replica] = []
        self._next = 0
        self._tasks: set[asyncio.Task] = set()

    def adopt(self, r: Replica) -> None:
        """A worker started before the actuator (`kvgrid serve`'s first ones)."""
        self.replicas[r.worker_id] = r
        self._next = max(self._next, _index(r.worker_id) + 1)

    def live(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.draining_since is None]

    # ---- Actuator ------------------------------------------------------------------------

    def pool_states(self, now: float) -> dict[str, PoolState]:
        views = []
        for r in self.replicas.values():
            w = self.fe.router.workers.get(r.worker_id)
            up = w is not None and w.up
            if up and r.joined_at is None:
                r.joined_at = now
            views.append(
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
        return {POOL: PoolState(POOL, views)}

    def add_replicas(self, pool: str, count: int, now: float) -> None:
        # the machine's cores were divided among max_workers processes: never start more
        count = min(count, self.max_workers - len(self.replicas))
        for _ in range(max(0, count)):
            wid = f"w{self._next}"
            self._next += 1
            r = self.launcher.launch(wid)
            r.started_at = now
            self.replicas[wid] = r
            log.info("autoscale: started worker %s (%s)", wid, r.url or "address pending")

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
    the time started workers took to join. None until a worker has measured itself."""
    ups = [
        w
        for w in act.fe.router.workers.values()
        if w.up and w.load.prefill_tokens_per_s and w.load.decode_step_s
    ]
    if not ups:
        return None
    info = ups[0].info
    bs = info.block_size
    joins = [r.joined_at - r.started_at for r in act.replicas.values() if r.joined_at is not None]
    return Calibration(
        step_fixed_s=0.0,  # the measured speed is per token of whole steps: fixed cost in it
        per_token_s=1.0 / statistics.median(w.load.prefill_tokens_per_s for w in ups),
        attn_s=0.0,
        decode_fixed_s=statistics.median(w.load.decode_step_s for w in ups),
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
        ups = [w for w in fe.router.workers.values() if w.up and not w.draining]
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
        return acts

    def resize(self, n: int) -> list[ScaleAction]:
        """Bring the pool to ``n`` serving workers; ValueError (the caller's 400) outside
        1..max_workers: a request for 99 workers is a mistake to report, not to clamp."""
        hi = self.actuator.max_workers
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= hi:
            raise ValueError(f"workers must be an integer from 1 to {hi} (--max-workers): {n!r}")
        now = self.clock()
        acts = resize_actions(self.actuator.pool_states(now), POOL, n)
        apply_actions(acts, self.actuator, now)
        self._record(now, acts, "operator")
        return acts

    def drain(self, worker_id: str) -> list[ScaleAction]:
        if worker_id not in self.actuator.replicas:
            raise KeyError(worker_id)
        if len(self.actuator.live()) <= 1:
            raise ValueError("the last serving worker cannot be drained")
        now = self.clock()
        acts = [ScaleAction("drain", POOL, 1, worker_id, "operator")]
        apply_actions(acts, self.actuator, now)
        self._record(now, acts, "operator")
        return acts

    def _record(self, now: float, acts: list[ScaleAction], by: str) -> None:
        for a in acts:
            self.actions.append({"t": now, "by": by, **a.to_dict()})
            log.info("autoscale (%s): %s %s %s", by, a.kind, a.worker_id or a.count, a.reason)

    def state(self) -> dict[str, Any]:
        act = self.actuator
        router = act.fe.router
        cal = self.planner.calib if self.planner is not None else None
        return {
            "planner": self.enabled,
            "calibration": cal.to_dict() if cal is not None else None,
            "interval_s": self.interval_s,
            "max_workers": act.max_workers,
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


def _index(worker_id: str) -> int:
    try:
        return int(worker_id.lstrip("w"))
    except ValueError:
        return -1
