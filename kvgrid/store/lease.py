"""Leases: pins on G2 slots for a reader, released on exit or when their time is up."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import torch

from kvgrid.store.host_pool import HostPool, Slot

log = logging.getLogger(__name__)


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
            yield [self.mgr.pool.view(s.index) for s in self.slots]
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
