"""What every object tier below G2 provides (G3 local disk, G4 shared filesystem or Redis).

Tiers store opaque, already-encoded objects under (tenant id, block key); they enforce a
hard capacity with high/low watermark LRU eviction and per-tenant quotas, and report what
they evicted so the store can publish BlockRemoved events.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class PutResult:
    stored: bool  # the object is in the tier now (also when it already was)
    evicted: list[tuple[bytes, bytes, str]] = field(default_factory=list)  # (tid, key, reason)
    reason: str = ""  # why not stored: too_big, quota, full, error


@dataclass
class Staged:
    """A put in two halves (``ObjectTier.stage``, then ``commit``): ``result`` is set once
    the object is durable and visible, or has failed."""

    tid: bytes
    key: bytes
    size: int
    result: PutResult | None = None
    evicted: list = field(default_factory=list)
    tmp: str = ""  # a tier's work in progress (a temp file)
    fd: int = -1


@dataclass(frozen=True)
class ObjectInfo:
    tenant_id: bytes
    key: bytes
    size: int
    created: float
    last_access: float


def fault_reason(e: BaseException) -> str:
    """A short name for why a tier operation failed (the label of the fault metric)."""
    if isinstance(e, TimeoutError):
        return "timeout"
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full"
    if code == errno.EROFS:
        return "read_only"
    if code in (errno.EACCES, errno.EPERM):
        return "permission"
    return "io_error" if isinstance(e, OSError) else "unreachable"


class ObjectTier(ABC):
    """A tier below G2. A fault (a full or read-only directory, an unreachable server, a
    lock held too long) turns it off: reads are misses and writes are dropped, so the store
    serves from its other tiers and the engine recomputes. After ``retry_s`` the next use
    probes the backend (``_probe``) and turns the tier back on if it answers."""

    name: str  # "G3" or "G4"
    backend: str  # "disk", "fs", "redis"
    capacity: int
    # set by the store: called with (tier, up, reason) when the tier turns off or back on,
    # and with (tier, True, reason) for a fault repaired in place (a recounted ledger)
    on_state: Callable[[ObjectTier, bool, str], None] | None = None

    def _init_health(self, retry_s: float) -> None:
        self.retry_s = retry_s
        self.fault: str | None = None  # why the tier is off; None while it is on
        self._retry_at = 0.0
        self._health = threading.Lock()

    @property
    def up(self) -> bool:
        """False while the tier is off (everything then reads as a miss)."""
        if self.fault is None:
            return True
        if time.monotonic() < self._retry_at or not self._health.acquire(blocking=False):
            return False
        try:  # one thread probes; the others see the tier off meanwhile
            if self.fault is None:
                return True
            try:
                self._probe()
            except Exception as e:
                self._retry_at = time.monotonic() + self.retry_s
                log.debug("%s still off: %s", self.name, e)
                return False
            self._set_on()
            return True
        finally:
            self._health.release()

    def _probe(self) -> None:
        """Raise unless the backend works again (called at most every ``retry_s``)."""
        return None

    def _fail(self, e: BaseException, reason: str | None = None) -> None:
        """Turn the tier off for ``retry_s`` because of ``e``; logged once per outage."""
        reason = reason or fault_reason(e)
        was_on = self.fault is None
        self.fault, self._retry_at = reason, time.monotonic() + self.retry_s
        if was_on:
            log.warning(
                "%s (%s) off: %s (%s); its reads are misses and writes are dropped, "
                "the other tiers serve; retrying every %.0fs",
                self.name, self.backend, reason, e, self.retry_s,
            )  # fmt: skip
            if self.on_state is not None:
                self.on_state(self, False, reason)

    def _set_on(self) -> None:
        if self.fault is None:
            return
        log.warning("%s (%s) is back after %s", self.name, self.backend, self.fault)
        self.fault = None
        if self.on_state is not None:
            self.on_state(self, True, "")

    @abstractmethod
    def put(self, tid: bytes, key: bytes, blob: bytes, quota: int | None = None) -> PutResult: ...

    def stage(self, tid: bytes, key: bytes, blob, quota: int | None = None) -> Staged:
        """The first half of a put whose durability a tier may share among several objects
        (one flush of many files): the object is not visible until ``commit``. Here, the
        whole put at once."""
        return Staged(tid, key, len(blob), self.put(tid, key, blob, quota))

    def commit(self, staged: list[Staged]) -> list[PutResult]:
        """Make staged objects durable, then visible; one result each."""
        return [s.result or PutResult(False, reason="error") for s in staged]

    @abstractmethod
    def get(self, tid: bytes, key: bytes, into: ReadBuffer | None = None) -> bytes | None:
        """The object, or None. With ``into``, it may come back as a view of that buffer
        (valid until the buffer's next use)."""

    @abstractmethod
    def created_many(self, tid: bytes, keys: list[bytes]) -> list[float | None]:
        """Per key: when its object was stored, or None if absent (one round trip)."""

    def known_many(self, tid: bytes, keys: list[bytes]) -> list[float | None]:
        """``created_many`` as far as this process knows it without asking again (None
        where it does not know): for checks that may miss, such as whether a block handed
        down is below already (a miss costs a G2 copy, not a wrong answer)."""
        return self.created_many(tid, keys)

    @abstractmethod
    def delete(self, tid: bytes, key: bytes) -> bool: ...

    @abstractmethod
    def list(self, tid: bytes | None = None) -> Iterator[ObjectInfo]: ...

    @abstractmethod
    def used(self, tid: bytes | None = None) -> int: ...

    @abstractmethod
    def clear(self, tid: bytes | None = None) -> int: ...

    def read_meta(self, name: str) -> bytes | None:
        """A small record about the tier itself (kvgrid.store.keycheck), or None."""
        return None

    def write_meta(self, name: str, data: bytes, replace: bool = False) -> bool:
        """Store a record about the tier; without ``replace`` only if none exists yet (one
        of several servers starting at once wins). True if written."""
        return False

    def will_need(self, tid: bytes, keys: list[bytes]) -> None:
        """A hint: these objects are about to be read. A tier whose device can start the
        reads early (a file system's readahead) starts them; absent objects are skipped."""
        return None

    def wont_need(self, tid: bytes, keys: list[bytes]) -> None:
        """A hint: these objects will not be read soon (a file system drops them from its
        page cache, so that the next read is cold)."""
        return None

    def close(self) -> None:
        return None


class ReadBuffer:
    """A buffer that one thread reads objects into, again and again. A fresh 8 MiB buffer
    per read is a fresh mapping: some 2,000 page faults, which serialise across threads on
    the process's memory map (a bytes object per read held warm-cache loads to a fraction of
    the raw read speed)."""

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.uint8)

    def view(self, n: int) -> memoryview:
        if self._buf.size < n:
            self._buf = np.empty(n, dtype=np.uint8)
        return memoryview(self._buf)[:n]


def watermark_target(capacity: int, high: float, low: float, used: int, size: int) -> int | None:
    """Bytes to get down to before adding ``size``, or None when no eviction is needed."""
    if used + size <= int(high * capacity):
        return None
    return max(0, min(int(low * capacity), capacity) - size)
