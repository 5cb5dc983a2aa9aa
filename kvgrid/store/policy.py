"""Store policies: admission by sightings, leases on G2 slots, bounded background I/O, load
deadlines."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch

from kvgrid.store.host_pool import HostPool, Slot

log = logging.getLogger(__name__)
_POLL_S = 0.005  # a load waiting on a fetch looks at its deadline this often


@dataclass
class LoadDeadline:
    """When a load stops waiting for blocks below G2 (``at``, a time.monotonic(); None: never)
    and the caller recomputes the rest. The engine may move ``at`` while the load runs; the
    load counts the blocks it has copied in ``landed``."""

    at: float | None = None
    landed: int = 0

    def wait(self, fut: Future):
        """``fut``'s result, or raise FutureTimeout once ``at`` has passed first."""
        while True:
            at = self.at
            left = _POLL_S if at is None else min(_POLL_S, at - time.monotonic())
            if left <= 0 and not fut.done():
                raise FutureTimeout
            try:
                return fut.result(timeout=max(left, 0.0))
            except FutureTimeout:
                continue


class Sightings:
    """How many times each block key was wanted (bounded: the oldest keys are forgotten)."""

    def __init__(self, max_keys: int = 1 << 20) -> None:
        self.max_keys = max_keys
        self.counts: OrderedDict[bytes, int] = OrderedDict()
        self.lock = threading.Lock()

    def bump(self, key: bytes, at_least: int = 0) -> int:
        """Count one sighting (``at_least`` > 0: only raise the count to that)."""
        with self.lock:
            n = self.counts.pop(key, 0)
            n = max(n, at_least) if at_least else n + 1
            self.counts[key] = n
            if len(self.counts) > self.max_keys:
                self.counts.popitem(last=False)
            return n

    def get(self, key: bytes) -> int:
        with self.lock:
            return self.counts.get(key, 0)


class LeaseExpired(Exception):
    """The lease ran out (or was released): its slots may no longer be read through it."""


class Lease:
    """Pins on G2 slots; released on exit, on ``release()``, or when its time is up.

    Read the slots inside ``use()``: a lease that expires while a ``use()`` is open keeps
    its pins until that block ends, so a slot is never evicted and refilled under a reader
    that may still be reading it; after expiry ``use()`` raises ``LeaseExpired``."""

    def __init__(self, mgr: LeaseManager, slots: list[Slot], deadline: float) -> None:
        self.mgr, self.slots, self.deadline = mgr, slots, deadline
        self.released = False
        self.expired = False
        self.users = 0

    def __len__(self) -> int:
        return len(self.slots)

    @contextlib.contextmanager
    def use(self) -> Iterator[list[torch.Tensor]]:
        """The leased slots' tensors, valid until the block ends."""
        with self.mgr.lock:
            if self.released or self.expired:
                raise LeaseExpired(f"a lease on {len(self.slots)} G2 blocks has run out")
            self.users += 1
        try:
            yield [self.mgr.pool.pool[s.index] for s in self.slots]
        finally:
            with self.mgr.lock:
                self.users -= 1
                late = self.expired and not self.users
            if late:
                self.mgr._release(self)

    def release(self) -> None:
        self.mgr._release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LeaseManager:
    def __init__(self, pool: HostPool, timeout_s: float) -> None:
        self.pool, self.timeout_s = pool, timeout_s
        self.active: set[Lease] = set()
        self.lock = threading.Lock()
        self.expired = 0
        self.expired_in_use = 0  # of those, read at the moment: freed when the read ended

    def acquire(self, tid: bytes, keys: list[bytes], timeout_s: float | None = None) -> Lease:
        """Pin the leading ``keys`` present in G2 (stops at the first absent one)."""
        self.reap()
        slots = []
        for k in keys:
            got = self.pool.acquire(tid, k)
            if got is None:
                break
            slots.append(got[0])
        lease = Lease(self, slots, time.monotonic() + (timeout_s or self.timeout_s))
        with self.lock:
            self.active.add(lease)
        return lease

    def _release(self, lease: Lease) -> None:
        with self.lock:
            if lease.released:
                return
            lease.released = True
            self.active.discard(lease)
        for s in lease.slots:
            self.pool.release(s)

    def reap(self) -> int:
        """Expire leases past their deadline (a holder that never let go): their pins are
        released now, or, for one being read, when that read ends."""
        now = time.monotonic()
        free, busy = [], []
        with self.lock:
            for le in self.active:
                if le.deadline <= now and not le.expired:
                    le.expired = True
                    (busy if le.users else free).append(le)
            self.active.difference_update(busy)
        for le in free + busy:
            log.warning(
                "a G2 lease on %d blocks timed out%s", len(le.slots),
                "; its pins go when its read ends" if le in busy else "; released",
            )  # fmt: skip
        for le in free:
            self._release(le)
        self.expired += len(free) + len(busy)
        self.expired_in_use += len(busy)
        return len(free) + len(busy)


class WorkerThreads:
    """Background threads working through jobs under one condition: ``in_flight`` jobs are
    queued or running, ``closed`` stops the threads once the queue is empty."""

    cv: threading.Condition
    threads: list[threading.Thread]
    closed: bool
    in_flight: int

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until every submitted job has finished."""
        end = time.monotonic() + timeout_s
        with self.cv:
            while self.in_flight:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cv.wait(left)
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        self.drain(timeout_s)
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        for t in self.threads:
            t.join(timeout=1.0)


class BoundedWorkQueue(WorkerThreads):
    """Background I/O with at most ``max_in_flight`` jobs queued or running.

    ``submit`` waits at most ``block_s`` for room, then drops the job (counted): the engine
    never waits on a slow disk or network for longer than configured, and memory held by
    pending writes is bounded.
    """

    def __init__(self, max_in_flight: int, workers: int, block_s: float = 0.0, name="io"):
        self.max_in_flight, self.block_s = max_in_flight, block_s
        self.slots = threading.BoundedSemaphore(max_in_flight)
        self.jobs: deque[Callable[[], None]] = deque()
        self.cv = threading.Condition()
        self.in_flight = 0
        self.max_seen = 0
        self.dropped = self.done = self.failed = 0
        self.closed = False
        self.threads = [
            threading.Thread(target=self._run, name=f"kvgrid-store-{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self.threads:
            t.start()

    def submit(self, job: Callable[[], None]) -> bool:
        if self.closed:
            got = False
        elif self.block_s > 0:
            got = self.slots.acquire(timeout=self.block_s)
        else:
            got = self.slots.acquire(blocking=False)
        if not got:
            with self.cv:
                self.dropped += 1
            return False
        with self.cv:
            self.in_flight += 1
            self.max_seen = max(self.max_seen, self.in_flight)
            self.jobs.append(job)
            self.cv.notify()
        return True

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.jobs and not self.closed:
                    self.cv.wait()
                if not self.jobs:
                    return
                job = self.jobs.popleft()
            try:
                job()
                ok = True
            except Exception:
                log.exception("store background job failed")
                ok = False
            with self.cv:
                self.in_flight -= 1
                self.done += ok
                self.failed += not ok
                self.cv.notify_all()
            self.slots.release()
