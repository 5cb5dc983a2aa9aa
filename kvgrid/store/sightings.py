"""Sightings: how often each block was wanted, which decides what is worth a write to disk
(``StoreConfig.admit_after``)."""

from __future__ import annotations

import threading
from collections import OrderedDict


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
