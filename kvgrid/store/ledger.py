"""BlockLedger: what became of each block handed down from G1, and so why a later request
had to recompute a block that was once stored.

Every block the engine hands down gets a fate (``in:G2``, ``dropped:full``, ``evicted:G2``,
``skipped:outranked``...), updated as it moves between tiers. When an admitted request
recomputes blocks the ledger knows, each is counted once under a reason
(``kvgrid_store_lost_hits{reason}``): never written (and why), evicted from a tier, or found
but not loaded (the plan recomputed it, or a block before it was missing). Bounded: the
oldest keys are forgotten first, and an unknown key is never counted.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict

from kvgrid.store.metrics import StoreMetrics


class BlockLedger:
    def __init__(self, metrics: StoreMetrics, max_keys: int = 1 << 20) -> None:
        self.metrics = metrics
        self.max_keys = max_keys
        self._fates: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    def handed_down(self, blocks: list[tuple[bytes, str]]) -> None:
        """Blocks left G1 (or were copied down from it): (key, outcome) each, counted per
        outcome (a hand-down is hundreds of blocks, on the engine's thread)."""
        for outcome, n in Counter(o for _, o in blocks).items():
            self.metrics.inc("g1_writebacks", n, outcome=outcome)
        with self._lock:
            for key, outcome in blocks:
                if outcome in ("g2", "queued_below"):
                    self._record(key, "in:G2" if outcome == "g2" else "queued")
                elif outcome not in ("already_stored", "deferred"):  # (deferred: still in G1)
                    self._record(key, f"dropped:{outcome}")

    def record(self, key: bytes, fate: str) -> None:
        with self._lock:
            self._record(key, fate)

    def _record(self, key: bytes, fate: str) -> None:
        self._fates.pop(key, None)
        self._fates[key] = fate
        if len(self._fates) > self.max_keys:
            self._fates.popitem(last=False)

    def left_tier(self, key: bytes, tier: str) -> None:
        """``tier`` evicted the block: if that is where the ledger last placed it, it is gone
        (keeping why it never went lower, if it did not)."""
        with self._lock:
            fate = self._fates.get(key)
            if fate is not None and (fate == f"in:{tier}" or fate.startswith(f"in:{tier}:")):
                self._fates[key] = "evicted:" + fate[3:]

    def stored(self, key: bytes, tier: str) -> None:
        """A copy of the block reached ``tier`` (a write-down or a promotion)."""
        with self._lock:
            if key in self._fates:
                self._fates[key] = f"in:{tier}"

    def skipped_below(self, key: bytes, why: str) -> None:
        """The write-down to the disk tiers passed over the block (admission, rank, G2
        evicted it first): remembered for when G2 lets go of it too."""
        with self._lock:
            fate = self._fates.get(key)
            if fate == "in:G2":
                self._fates[key] = f"in:G2:{why}"
            elif fate == "queued":
                self._fates[key] = f"dropped:{why}"

    def fate(self, key: bytes) -> str | None:
        with self._lock:
            return self._fates.get(key)

    def account_misses(self, keys: list[bytes], tiers: list[str | None]) -> Counter:
        """Count the blocks of ``keys`` (a request's stored-prefix candidates that it will
        recompute) that were once stored; ``tiers`` says where each is now (None: nowhere).
        Returns the counts by reason."""
        out: Counter = Counter()
        gap = False
        with self._lock:
            fates = [self._fates.get(k) for k in keys]
        for tier, fate in zip(tiers, fates):
            if tier is not None:
                # still stored: the plan chose to recompute it, or a block before it is gone
                out["behind_miss" if gap else "not_loaded_plan"] += 1
                continue
            gap = True
            if fate is None:
                continue  # never handed down (or forgotten): not a lost hit
            out[_reason(fate)] += 1
        for reason, n in out.items():
            self.metrics.inc("lost_hits", n, reason=reason)
        return out

    def count(self, reason: str, n: int) -> None:
        """Blocks found but not loaded for a reason seen at load time (deadline, error)."""
        if n > 0:
            self.metrics.inc("lost_hits", n, reason=reason)


def _reason(fate: str) -> str:
    kind, _, what = fate.partition(":")
    if kind == "dropped":
        return f"not_written_{what}"
    if kind == "evicted":  # evicted:G2, or evicted:G2:<why it never went lower>
        return "evicted_" + what.lower().replace(":", "_")
    if kind == "queued":
        return "in_flight"
    # the ledger believed it stored, yet no tier has it (expired, deleted, backend down)
    return "vanished"
