"""Bounded background work of the store: the write-down's and the prefetches' worker threads."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)


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
