"""Queue-level load planning: the waiting requests' stored prefixes come up to G2 before they
are scheduled, as far as the slow tiers' bandwidth allows.

On a busy server the GPU is the bottleneck and the disk is idle: a block read from G3/G4
into G2 before the GPU would reach it is prefill work saved. The engine publishes its queue
(``Queued``: each waiting request's block keys past its G1 hits, and when the GPU would start
computing them, from the prefill work ahead of it). ``plan_fetches`` gives every stored block
a deadline, the moment the GPU would compute it (``start_at + j * block_compute_s``), and
schedules the fetches tier by tier, earliest deadline first in queue order, each tier at
its measured bandwidth; a block that cannot arrive in time is not fetched (counted as
``late``): the request recomputes it, or loads it beside recomputing its first blocks at
admission, never later than its own recompute (``load_plan.plan_blocks``). A planner thread
runs the plan and keeps what it brought up (and the queued requests' blocks already in G2)
pinned until the request is admitted or leaves the queue, within half of G2.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvgrid.store.object import cached_tenant_id

if TYPE_CHECKING:
    from kvgrid.store.host_pool import Slot
    from kvgrid.store.store import ContextStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Queued:
    tenant: bytes
    keys: tuple[bytes, ...]  # its prompt's block keys that G1 does not hold, in order
    start_at: float  # time.monotonic() when the GPU would start computing the first of them


def plan_fetches(
    queue: list[Queued],
    where: Iterable[list[str | None]],
    fetch_s: dict[str, float],
    block_compute_s: float | None,
    now: float,
    busy_until: dict[str, float] | None = None,
    limit: int | None = None,
) -> tuple[list[tuple[int, int]], int]:
    """Which blocks to bring up: ``(request index, block index)`` pairs in the order to
    fetch them, and how many stored blocks below G2 cannot arrive before the GPU would
    compute them. ``where``: per request, in queue order, the tier holding each of its
    blocks (None: nowhere); only each request's leading stored run counts. It is read only
    as far as the plan goes: a generator looks up a request's blocks only when the plan
    reaches it. ``fetch_s``: seconds per block per tier; ``busy_until``: when each tier
    finishes what is already in flight; ``limit``: the plan stops at this many fetches.
    Without a measured prefill speed (``block_compute_s`` None) every stored block is
    fetched."""
    busy = dict(busy_until or {})
    plan: list[tuple[int, int]] = []
    late = 0
    for i, (q, w) in enumerate(zip(queue, where)):
        for j, tier in enumerate(w):
            if tier is None:
                break  # a gap: blocks after it cannot be loaded for this request
            if tier == "G2":
                continue
            if limit is not None and len(plan) >= limit:
                return plan, late
            lands = max(busy.get(tier, now), now) + fetch_s.get(tier, 0.0)
            deadline = None if block_compute_s is None else q.start_at + j * block_compute_s
            if deadline is not None and lands > deadline:
                late += 1
                continue
            busy[tier] = lands
            plan.append((i, j))
    return plan, late


class PrefetchPlanner:
    """Runs ``plan_fetches`` on its own thread each time the engine publishes its queue."""

    MAX_IN_FLIGHT = 32  # fetches submitted at once (the fetch pool works them in order)

    def __init__(self, store: ContextStore) -> None:
        self.store = store
        self._cv = threading.Condition()
        self._queue: list[Queued] | None = None
        self._block_compute_s: float | None = None
        self._closed = False
        self._planning = False
        self._in_flight: dict[tuple[bytes, bytes], Future] = {}
        self._held: dict[tuple[bytes, bytes], Slot] = {}  # (tid, key) -> pinned G2 slot
        self._batch: list = [0.0, 0.0, {}]  # fetches in flight: start, last end, tier -> bytes
        self._thread = threading.Thread(target=self._run, name="kvgrid-prefetch", daemon=True)
        self._thread.start()

    def publish(self, queue: list[Queued], block_compute_s: float | None) -> None:
        """The engine's waiting requests, in order (the latest snapshot replaces the last)."""
        with self._cv:
            self._queue, self._block_compute_s = queue, block_compute_s
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._queue is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                queue, bcs, self._queue = self._queue, self._block_compute_s, None
                self._planning = True
            try:
                self._plan(queue, bcs)
            except Exception:
                log.exception("context store: prefetch planning failed")
            finally:
                with self._cv:
                    self._planning = False
                    self._cv.notify_all()

    def settle(self, timeout_s: float) -> bool:
        """Wait until the last published queue is planned and its fetches have landed
        (``ContextStore.flush``). False if that took longer than ``timeout_s``."""
        end = time.monotonic() + timeout_s
        with self._cv:
            while self._queue is not None or self._planning:
                left = end - time.monotonic()
                if left <= 0 or self._closed:
                    return self._closed
                self._cv.wait(left)
            pending = list(self._in_flight.values())
        for fut in pending:
            try:
                fut.result(max(0.0, end - time.monotonic()))
            except FutureTimeout:
                return False
            except Exception:
                pass  # counted as failed when reaped
        return True

    def _plan(self, queue: list[Queued], block_compute_s: float | None) -> None:
        """One pass over the published queue. Requests are looked up in queue order only as
        far as the free fetch slots reach (the engine publishes every few milliseconds:
        looking up the whole queue each time would hold the GIL its own thread needs)."""
        store = self.store
        if store.g2 is None:
            return
        self._reap()
        tids = [cached_tenant_id(q.tenant) for q in queue]
        self._let_go({(tid, k) for tid, q in zip(tids, queue) for k in q.keys})
        room = self.MAX_IN_FLIGHT - len(self._in_flight)
        if room <= 0:
            return
        bw = store.bandwidth
        fetch_s = {
            t.name: (store.g2.slot_bytes / bw[t.name]) if bw.get(t.name) else 0.0
            for t in store.lower
        }
        now = time.monotonic()
        busy = {t: now + len(self._in_flight) * s for t, s in fetch_s.items()}
        where = (self._locate(tid, q) for tid, q in zip(tids, queue))
        plan, late = plan_fetches(queue, where, fetch_s, block_compute_s, now, busy, room)
        if late:
            store.metrics.inc("prefetch", late, outcome="late")
        cap = max(1, store.g2.num_slots // 2)
        batch = store._run_size()  # a request's blocks to a fetch process, a run at a time
        run: list[tuple[bytes, bytes]] = []  # blocks of one request, not yet submitted
        for n, (i, j) in enumerate(plan):
            if len(self._held) + len(self._in_flight) + len(run) >= cap:
                break
            if not self._in_flight and not run:
                self._batch = [time.perf_counter(), 0.0, {}]  # start, last end, tier -> bytes
            run.append((tids[i], queue[i].keys[j]))
            tenant = queue[i].tenant
            if len(run) == batch or n + 1 == len(plan) or plan[n + 1][0] != i:
                self._submit(run, tenant)
                run = []
        if run:
            self._submit(run, tenant)

    def _submit(self, names: list[tuple[bytes, bytes]], tenant: bytes) -> None:
        store = self.store
        if len(names) == 1:
            self._in_flight[names[0]] = store._fetchers.submit(self._fetch, names[0], tenant)
            return
        futs = [Future() for _ in names]
        keys = [k for _, k in names]
        store._fetchers.submit(store._fetch_run, names[0][0], keys, tenant, futs, self._fetch)
        self._in_flight.update(zip(names, futs))

    def _locate(self, tid: bytes, q: Queued) -> list[str | None]:
        """Where each block of a queued request is (``ReadPath.contains``); what this planner
        holds in G2 or is fetching counts as G2 without a lookup. Blocks found in G2 are
        pinned there for the request, within half of G2."""
        store = self.store
        mine = [(tid, k) in self._held or (tid, k) in self._in_flight for k in q.keys]
        ask = [k for k, m in zip(q.keys, mine) if not m]
        found = iter(store.contains(ask, q.tenant) if ask else ())
        where = ["G2" if m else next(found) for m in mine]
        cap = max(1, store.g2.num_slots // 2)
        for k, m, t in zip(q.keys, mine, where):
            if m or t != "G2" or len(self._held) >= cap:
                continue
            got = store.g2.acquire(tid, k)
            if got is not None:
                self._held[(tid, k)] = got[0]
        return where

    def _fetch(self, name: tuple[bytes, bytes], tenant: bytes):
        r = self.store._fetch_lower(name[0], name[1], tenant)
        return r, time.perf_counter()  # when it was done: the tiers' bandwidth

    def _reap(self) -> None:
        """Collect finished fetches: their G2 slots stay pinned for the queued request. Once
        a batch of fetches is done, its bytes over its time measure the tiers it read (as
        a load's do)."""
        for name, fut in list(self._in_flight.items()):
            if not fut.done():
                continue
            del self._in_flight[name]
            r, done = (None, 0.0) if fut.cancelled() or fut.exception() else fut.result()
            if r is None:
                self.store.metrics.inc("prefetch", outcome="failed")
                continue
            tier, slot, t = r
            self.store.metrics.inc("prefetch", outcome="fetched")
            self._batch[1] = max(self._batch[1], done)
            self._batch[2][tier] = self._batch[2].get(tier, 0) + t.nbytes
            if slot is not None:
                if name in self._held:
                    self.store.g2.release(slot)
                else:
                    self._held[name] = slot
        if not self._in_flight and self._batch[2]:
            start, end, nbytes = self._batch
            for tier, b in nbytes.items():
                self.store._observe_load(tier, b, end - start)
            self._batch = [0.0, 0.0, {}]

    def _let_go(self, wanted: set[tuple[bytes, bytes]]) -> None:
        """Unpin the blocks no queued request wants any more (admitted, or gone)."""
        for name in [n for n in self._held if n not in wanted]:
            self.store.g2.release(self._held.pop(name))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=5.0)
        for fut in self._in_flight.values():
            fut.cancel()
        for fut in list(self._in_flight.values()):
            if fut.cancelled():
                continue
            try:
                r = fut.result(timeout=5.0)[0]
            except Exception:
                continue
            if r is not None and r[1] is not None:
                self.store.g2.release(r[1])
        self._in_flight.clear()
        self._let_go(set())
