"""What every object tier below G2 provides (G3 local disk, G4 shared filesystem or Redis).

Tiers store opaque, already-encoded objects under (tenant id, block key); they enforce a
hard capacity with high/low watermark LRU eviction and per-tenant quotas, and report what
they evicted so the store can publish BlockRemoved events.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PutResult:
    stored: bool  # the object is in the tier now (also when it already was)
    evicted: list[tuple[bytes, bytes, str]] = field(default_factory=list)  # (tid, key, reason)
    reason: str = ""  # why not stored: too_big, quota, full, error


@dataclass(frozen=True)
class ObjectInfo:
    tenant_id: bytes
    key: bytes
    size: int
    created: float
    last_access: float


class ObjectTier(ABC):
    name: str  # "G3" or "G4"
    backend: str  # "disk", "fs", "redis"
    capacity: int

    @property
    def up(self) -> bool:
        """False while the backend is unreachable (everything then reads as a miss)."""
        return True

    @abstractmethod
    def put(self, tid: bytes, key: bytes, blob: bytes, quota: int | None = None) -> PutResult: ...

    @abstractmethod
    def get(self, tid: bytes, key: bytes, into: ReadBuffer | None = None) -> bytes | None:
        """The object, or None. With ``into``, it may come back as a view of that buffer
        (valid until the buffer's next use)."""

    @abstractmethod
    def created_many(self, tid: bytes, keys: list[bytes]) -> list[float | None]:
        """Per key: when its object was stored, or None if absent (one round trip)."""

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
