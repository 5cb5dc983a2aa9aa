"""Live scaling for `kvgrid serve`: the SLA planner of the simulator on real worker processes.

The frontend process runs it. Every interval the planner (kvgrid.bench.planner.Planner, the
same class the fleet simulator drives) sees what the frontend observed: arrivals and first
tokens as clients saw them, and the queues from the workers' load reports. It acts through
``LiveActuator``: "add" starts a `kvgrid worker` process under the serve supervisor (it joins
the router when its engine is up); "drain" makes the router send nothing new there, waits
until the requests in flight on it have finished, then stops the process and forgets it.
An operator can also resize the pool at once (``POST /admin/scale``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kvgrid.bench.planner import (
    ObservationWindow,
    Planner,
    PoolState,
    ReplicaView,
    ScaleAction,
    apply_actions,
)

if TYPE_CHECKING:
    from kvgrid.server.frontend import Frontend
    from kvgrid.server.serve import Supervisor

log = logging.getLogger(__name__)

POOL = "mixed"  # one machine, no disaggregation: one pool


@dataclass
class Replica:
    worker_id: str
    url: str
    slot: int  # the supervisor's process slot
    started_at: float
    draining_since: float | None = None
    inflight_at_drain: int = 0  # requests it still had to finish when the drain began
    stopped_at: float | None = None


class LiveActuator:
    """The planner's actuator (kvgrid.bench.planner.Actuator) on local worker processes."""

    def __init__(
        self,
        fe: Frontend,
        supervisor: Supervisor,
        argv_for: Callable[[str, int], tuple[list[str], str]],
        max_workers: int,
        drain_timeout_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``argv_for(worker_id, index) -> (argv, url)`` builds a new worker's command."""
        self.fe, self.sup, self.argv_for = fe, supervisor, argv_for
        self.max_workers = max_workers
        self.drain_timeout_s = drain_timeout_s
        self.clock = clock
        self.replicas: dict[str, Replica] = {}
        self.retired: list[Replica] = []
        self._next = 0
        self._tasks: set[asyncio.Task] = set()

    def adopt(self, worker_id: str, url: str, slot: int) -> None:
        """A worker `kvgrid serve` started itself."""
        self.replicas[worker_id] = Replica(worker_id, url, slot, self.clock())
        self._next = max(self._next, _index(worker_id) + 1)

    def live(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.draining_since is None]

    # ---- Actuator ------------------------------------------------------------------------

    def pool_states(self, now: float) -> dict[str, PoolState]:
        views = []
        for r in self.replicas.values():
            w = self.fe.router.workers.get(r.worker_id)
            up = w is not None and w.up
            views.append(
                ReplicaView(
                    r.worker_id,
                    ready=up,
                    draining=r.draining_since is not None,
                    num_active=w.num_active() if up else 0,
                    kv_usage=w.load.kv_usage if up else 0.0,
                    waiting_prefill_tokens=w.backlog_tokens() if up else 0,
                    started_at=r.started_at,
                )
            )
        return {POOL: PoolState(POOL, views)}

    def add_replicas(self, pool: str, count: int, now: float) -> None:
        # the machine's cores were divided among max_workers processes: never start more
        count = min(count, self.max_workers - len(self.replicas))
        for _ in range(max(0, count)):
            wid = f"w{self._next}"
            self._next += 1
            argv, url = self.argv_for(wid, self._next - 1)
            slot = self.sup.add(argv)
            self.fe.link.add_url(url)
            self.replicas[wid] = Replica(wid, url, slot, now)
            log.info("autoscale: started worker %s (%s)", wid, url)

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
        # forget the URL first, so that the fleet link does not probe a stopping process back
        self.fe.link.forget(r.url)
        await asyncio.to_thread(self.sup.retire, r.slot)
        self.fe.router.remove_worker(r.worker_id)
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


class Autoscaler:
    """The planner loop of a live server, and the operator's resize."""

    def __init__(
        self,
        actuator: LiveActuator,
        planner: Planner,
        interval_s: float = 10.0,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.actuator, self.planner = actuator, planner
        self.interval_s = interval_s
        self.enabled = enabled  # False: only operator resizes, no planner decisions
        self.clock = clock
        self.window = ObservationWindow(clock())
        self.actions: list[dict[str, Any]] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.window = ObservationWindow(self.clock())
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.actuator.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.tick(self.clock())
            except Exception:  # a planner bug must not take the server down with it
                log.exception("autoscale: planner tick failed")

    def tick(self, now: float) -> list[ScaleAction]:
        ups = [w for w in self.actuator.fe.router.workers.values() if w.up]
        obs = self.window.close(
            now,
            queued_requests=sum(w.load.num_waiting for w in ups),
            waiting_prefill_tokens=sum(w.load.waiting_prefill_tokens for w in ups),
            running_requests=sum(w.load.num_running for w in ups),
        )
        acts = self.planner.step(now, obs, self.actuator)
        self._record(now, acts, "planner")
        return acts

    def resize(self, n: int) -> list[ScaleAction]:
        now = self.clock()
        n = max(1, min(self.actuator.max_workers, n))
        acts = self.planner.resize(self.actuator.pool_states(now), POOL, n)
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
        return {
            "planner": self.enabled,
            "interval_s": self.interval_s,
            "max_workers": act.max_workers,
            "workers": {
                r.worker_id: {
                    **asdict(r),
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
