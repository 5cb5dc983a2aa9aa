"""Maintenance of ``ContextStore``: the write-down at shutdown, flushing background work,
rebuilding the index of a disk tier after a restart, the TTL sweep, verification, clearing,
and stats."""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from kvgrid.events import AllCleared, BlockRemoved, BlockStored
from kvgrid.store.disk_tier import DiskTier
from kvgrid.store.object import (
    MAX_HEADER,
    ObjectError,
    cached_tenant_id,
    check_object,
    decode_object,
    read_header,
)

log = logging.getLogger(__name__)


class Maintenance:
    """Upkeep of ``ContextStore`` (mixed into it, ``store.py``)."""

    def settle(self, timeout_s: float = 120.0) -> int:
        """At shutdown, after G1's blocks have been handed down: what G2 holds that no
        lower tier has goes down, best prospects first, within each tier's capacity
        (``WriteDown.settle``). Returns how many blocks were offered."""
        return self.writes.settle(timeout_s)

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait for write-back copies, queued background writes and prefetches to finish."""
        if self._closed.is_set():
            return True  # close() waited for all of them
        try:
            self._landings.submit(lambda: None).result(timeout_s)
        except FutureTimeout:
            return False
        if self.prefetcher is not None and not self.prefetcher.settle(timeout_s):
            return False
        return self.writes.drain(timeout_s) and self.reads.drain(timeout_s)

    def _rebuild(self, tier: DiskTier) -> int:
        """Read every object's header after a restart: announce the valid ones (BlockStored),
        drop the ones whose header is damaged or does not match their name."""
        n = 0
        try:
            infos = list(tier.list())
        except OSError as e:
            tier._fail(e)
            return 0
        for info in infos:
            try:
                head = tier.read_prefix(info.tenant_id, info.key, MAX_HEADER)
                if head is None:
                    continue
                h = read_header(head)
                if h.key != info.key or h.tenant_id != info.tenant_id or h.object_len != info.size:
                    raise ObjectError("mismatch", "header does not match the object's name")
            except OSError as e:
                tier._fail(e)
                return n
            except ObjectError as e:
                self.metrics.inc("integrity_failures", tier=tier.name, kind=e.kind)
                if tier.delete(info.tenant_id, info.key):
                    self.metrics.inc("evictions", tier=tier.name, reason="corrupt")
                continue
            if self._expired(info.tenant_id, h.created):
                continue  # the sweeper deletes it; never announced, never served
            self._emit(BlockStored((h.key,), h.parent_key, tier.name, h.token_count))
            n += 1
        return n

    def sweep(self) -> int:
        """Delete objects past their tenant's TTL on every tier; how many were deleted."""
        now = time.time()
        n = 0
        if self.g2 is not None:
            for tid, key, s in self.g2.items():
                if self._expired(tid, s.created, now) and self.g2.delete(tid, key):
                    self._removed("G2", [(tid, key, "ttl")])
                    n += 1
        has_ttl = self.config.default_tenant.ttl_s is not None
        for tier in self.lower:
            if not tier.up:
                continue
            tids = [None] if has_ttl else [t for t, p in self._policy_by_tid.items() if p.ttl_s]
            for tid in tids:
                for info in list(tier.list(tid)):
                    if self._expired(info.tenant_id, info.created, now):
                        with contextlib.suppress(OSError):
                            if tier.delete(info.tenant_id, info.key):
                                self._removed(tier.name, [(info.tenant_id, info.key, "ttl")])
                                n += 1
        return n

    def _sweep_loop(self) -> None:
        while not self._closed.wait(self.config.sweep_interval_s):
            try:
                self.sweep()
            except Exception:
                log.exception("TTL sweep failed")

    def verify(
        self, tenants: list[bytes] = (), remove_bad: bool = False
    ) -> dict[str, dict[str, Any]]:
        """Read back every object below G2. Objects of a known tenant are fully checked
        (checksum, key, decryption, decoding); others by header and checksum only. Bad
        objects are listed (``bad_objects``: tenant id, key, kind) and removed only with
        ``remove_bad`` (an object that fails decryption is kept: the key may be wrong)."""
        known = dict(self._known_tenants)
        for t in tenants:
            known[cached_tenant_id(t)] = t
        report: dict[str, dict[str, Any]] = {}
        for tier in self.lower:
            r = report[tier.name] = {"ok": 0, "checksum_only": 0, "bad": 0, "removed": 0}
            bad: list[tuple[bytes, bytes, str]] = r.setdefault("bad_objects", [])
            for info in list(tier.list()):
                try:
                    blob = tier.get(info.tenant_id, info.key)
                except OSError as e:
                    self.failed(tier.name, "read", e)
                    continue
                if blob is None:
                    continue
                try:
                    if info.tenant_id in known:
                        decode_object(blob, info.key, known[info.tenant_id], self.keyring)
                        r["ok"] += 1
                    else:
                        h = check_object(blob)
                        if h.key != info.key or h.tenant_id != info.tenant_id:
                            raise ObjectError("mismatch", "object stored under another name")
                        r["checksum_only"] += 1
                except ObjectError as e:
                    r["bad"] += 1
                    bad.append((info.tenant_id, info.key, e.kind))
                    self.metrics.inc("integrity_failures", tier=tier.name, kind=e.kind)
                    if remove_bad and e.kind != "decrypt" and tier.delete(info.tenant_id, info.key):
                        r["removed"] += 1
                        self._removed(tier.name, [(info.tenant_id, info.key, "corrupt")])
        return report

    def clear(self, tenant: bytes | None = None) -> int:
        """Remove every object (of ``tenant``, or of everyone) from every tier."""
        tid = None if tenant is None else cached_tenant_id(tenant)
        n = 0
        for tier in self._tiers():
            if tid is None:
                n += tier.clear()
                self._emit(AllCleared(tier.name))
                continue
            if tier is self.g2:
                items = [(t, k) for t, k, _ in self.g2.items() if t == tid]
            else:
                items = [(i.tenant_id, i.key) for i in tier.list(tid)]
            for t, k in items:
                if tier.delete(t, k):
                    self._emit(BlockRemoved((k,), tier.name))
                    n += 1
        return n

    def stats(self) -> dict:
        tiers = {}
        for t in self._tiers():
            cap = t.capacity
            used = t.used()
            up = t.up
            tiers[t.name] = {
                "backend": t.backend,
                "capacity_bytes": cap,
                "used_bytes": used,
                "up": up,
                "fault": getattr(t, "fault", None),
            }
            self.metrics.capacity.labels(tier=t.name).set(cap)
            self.metrics.used.labels(tier=t.name).set(used)
            self.metrics.backend_up.labels(tier=t.name, backend=t.backend).set(1 if up else 0)
            if t is self.g2:
                tiers["G2"]["blocks"] = len(self.g2.entries)
        for name, reason in self.disabled.items():
            tiers[name] = {"backend": None, "capacity_bytes": 0, "used_bytes": 0, "up": False,
                           "fault": reason}  # fmt: skip
        pinned = self.g2.pinned_count() if self.g2 else 0
        self.metrics.pinned.set(pinned)
        self.metrics.in_flight.set(self.writes.in_flight)
        return {
            "tiers": tiers,
            "bandwidth_bytes_per_s": dict(self.bandwidth),
            "pinned_blocks": pinned,
            "leases": len(self.leases.active) if self.leases else 0,
            "io": {
                "in_flight": self.writes.in_flight,
                "max_in_flight": self.writes.max_in_flight,
                "max_seen": self.writes.max_seen,
                "dropped": self.writes.dropped,
                "done": self.writes.done,
                "failed": self.writes.failed,
            },
            "rebuilt": dict(self.rebuilt),
            "counters": self.metrics.summary(),
        }
