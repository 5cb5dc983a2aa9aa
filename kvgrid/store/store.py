"""ContextStore: the tiers below G1 (G2 host memory, G3 local disk, G4 shared) as one store.

Reads go G2, then G3, then G4; a hit below G2 is verified, decrypted and promoted into G2.
Writes land in G2 synchronously (that copy is the staging buffer, so the caller's memory is
free when ``put`` returns) and go to G3/G4 on bounded background workers, once a block has
been seen often enough (admission). Every failure of an object is a miss plus a metric,
never an exception to the caller and never wrong data. Tier changes are queued as KV events
(BlockStored / BlockRemoved / AllCleared with tiers "G2".."G4") for ``drain_events``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from typing import TYPE_CHECKING

import torch

from kvgrid import keys as kvkeys
from kvgrid.events import AllCleared, BlockRemoved, BlockStored, KVEvent
from kvgrid.store.config import StoreConfig, TenantPolicy, default_store_dir
from kvgrid.store.crypto import KeyRing, load_keyring
from kvgrid.store.disk_tier import DiskTier
from kvgrid.store.host_pool import HostPool, Slot
from kvgrid.store.metrics import StoreMetrics, tenant_label
from kvgrid.store.object import (
    MAX_HEADER,
    ObjectError,
    check_object,
    decode_object,
    encode_object,
    read_header,
    tenant_id,
)
from kvgrid.store.policy import BoundedWorkQueue, Lease, LeaseManager, Sightings
from kvgrid.store.tier import ObjectTier, PutResult

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

_tid = functools.lru_cache(maxsize=4096)(tenant_id)
_EWMA = 0.2


class ContextStore:
    def __init__(
        self,
        config: StoreConfig | None = None,
        registry: CollectorRegistry | None = None,
        keyring: KeyRing | None = None,
        tiers: list[ObjectTier] | None = None,
    ) -> None:
        """``tiers`` replaces the G3/G4 tiers built from the config (for tools and tests)."""
        self.config = cfg = config or StoreConfig()
        cfg.validate()
        self.metrics = StoreMetrics(registry)
        if cfg.encrypt:
            self.keyring = keyring or load_keyring(cfg.master_key_file, default_store_dir())
        else:
            self.keyring = None
        self.g2 = (
            HostPool(cfg.g2_bytes, cfg.high_watermark, cfg.low_watermark) if cfg.g2_bytes else None
        )
        self.leases = LeaseManager(self.g2, cfg.lease_timeout_s) if self.g2 else None
        self.lower: list[ObjectTier] = tiers if tiers is not None else self._build_tiers(cfg)
        self.sightings = Sightings()
        self.writes = BoundedWorkQueue(cfg.io_queue, cfg.io_workers, cfg.io_block_s, "write")
        self.reads = BoundedWorkQueue(cfg.io_queue, 1, 0.0, "prefetch")
        self.block_shape: tuple[int, ...] | None = None
        self.block_dtype: torch.dtype | None = None
        self.bandwidth: dict[str, float] = {}  # tier -> measured load bytes/s (EWMA)
        self._known_tenants: dict[bytes, bytes] = {_tid(kvkeys.PUBLIC_TENANT): b""}
        for t in cfg.tenants:
            self._known_tenants[_tid(t)] = t
        self._policy_by_tid = {_tid(t): p for t, p in cfg.tenants.items()}
        self._events: list[KVEvent] = []
        self._ev_lock = threading.Lock()
        self._closed = threading.Event()
        for t in self._tiers():
            self.metrics.capacity.labels(tier=t.name).set(
                t.capacity_bytes if t is self.g2 else t.capacity
            )
        self.rebuilt = {t.name: self._rebuild(t) for t in self.lower if isinstance(t, DiskTier)}
        self._janitor = None
        if cfg.sweep_interval_s > 0:
            self._janitor = threading.Thread(
                target=self._sweep_loop, name="kvgrid-store-ttl", daemon=True
            )
            self._janitor.start()

    @staticmethod
    def _build_tiers(cfg: StoreConfig) -> list[ObjectTier]:
        hw = dict(high=cfg.high_watermark, low=cfg.low_watermark)
        out: list[ObjectTier] = []
        if cfg.g3_dir:
            out.append(DiskTier(cfg.g3_dir, cfg.g3_bytes, "G3", "disk", **hw))
        if cfg.g4_dir:
            out.append(DiskTier(cfg.g4_dir, cfg.g4_bytes, "G4", "fs", **hw))
        elif cfg.g4_redis:
            from kvgrid.store.redis_tier import RedisTier

            out.append(
                RedisTier(
                    cfg.g4_redis, cfg.g4_bytes, "G4", cfg.g4_prefix, retry_s=cfg.redis_retry_s, **hw
                )
            )
        return out

    def _tiers(self) -> list:
        return ([self.g2] if self.g2 else []) + self.lower

    def tier(self, name: str) -> ObjectTier | HostPool | None:
        return next((t for t in self._tiers() if t.name == name), None)

    # ---- small helpers --------------------------------------------------------------------

    def _emit(self, ev: KVEvent) -> None:
        with self._ev_lock:
            self._events.append(ev)

    def drain_events(self) -> list[KVEvent]:
        with self._ev_lock:
            out, self._events = self._events, []
        return out

    def _policy(self, tid: bytes) -> TenantPolicy:
        return self._policy_by_tid.get(tid, self.config.default_tenant)

    def _expired(self, tid: bytes, created: float, now: float | None = None) -> bool:
        ttl = self._policy(tid).ttl_s
        return ttl is not None and created + ttl < (now or time.time())

    def _removed(self, tier: str, evicted: list[tuple[bytes, bytes, str]]) -> None:
        for _, key, reason in evicted:
            self.metrics.inc("evictions", tier=tier, reason=reason)
            self._emit(BlockRemoved((key,), tier))

    def _observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = nbytes / seconds
        old = self.bandwidth.get(tier)
        self.bandwidth[tier] = rate if old is None else (1 - _EWMA) * old + _EWMA * rate
        self.metrics.bandwidth.labels(tier=tier).set(self.bandwidth[tier])

    def configure_blocks(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Declare the block shape/dtype (the engine's KV layout); G2 allocates its slab."""
        self.block_shape, self.block_dtype = tuple(shape), dtype
        if self.g2 is not None and not self.g2.configure(self.block_shape, dtype):
            log.warning(
                "G2 (%d bytes) cannot hold one block %s %s: G2 off",
                self.g2.capacity_bytes,
                shape,
                dtype,
            )
            self.g2 = None
            self.leases = None

    # ---- lookups ---------------------------------------------------------------------------

    def contains(self, keys: list[bytes], tenant: bytes) -> list[str | None]:
        """The tier holding each key, for the leading run of keys held somewhere; None after."""
        tid = _tid(tenant)
        now = time.time()
        out: list[str | None] = [None] * len(keys)
        remaining = []
        for i, k in enumerate(keys):
            s = self.g2.peek(tid, k) if self.g2 else None
            if s is not None and not self._expired(tid, s.created, now):
                out[i] = "G2"
            else:
                remaining.append(i)
        for tier in self.lower:
            if not remaining:
                break
            if not tier.up:
                continue
            try:
                created = tier.created_many(tid, [keys[i] for i in remaining])
            except OSError:
                continue
            still = []
            for i, c in zip(remaining, created):
                if c is not None and not self._expired(tid, c, now):
                    out[i] = tier.name
                else:
                    still.append(i)
            remaining = still
        for i, t in enumerate(out):
            if t is None:
                return out[:i] + [None] * (len(keys) - i)
        return out

    def note_seen(self, keys: list[bytes]) -> None:
        """Count a sighting of each key (a request wanted it): drives disk admission."""
        for k in keys:
            self.sightings.bump(k)

    # ---- reads -----------------------------------------------------------------------------

    def _read_lower(self, tier: ObjectTier, tid: bytes, key: bytes, tenant: bytes):
        """(header, CPU tensor) of a verified object, or None (a counted miss)."""
        tl = tenant_label(tid)
        if not tier.up:
            self.metrics.inc("misses", tier=tier.name, tenant=tl, reason="backend_down")
            return None
        try:
            blob = tier.get(tid, key)
        except OSError as e:
            log.warning("%s read failed: %s", tier.name, e)
            blob = None
        if blob is None:
            reason = "absent" if tier.up else "backend_down"
            self.metrics.inc("misses", tier=tier.name, tenant=tl, reason=reason)
            return None
        try:
            h, t = decode_object(
                blob,
                key,
                tenant,
                self.keyring,
                self.block_dtype,
                self.block_shape,
                self.config.model_fingerprint or None,
            )
        except ObjectError as e:
            self.metrics.inc("integrity_failures", tier=tier.name, kind=e.kind)
            self.metrics.inc("misses", tier=tier.name, tenant=tl, reason=e.kind)
            log.warning("%s object %s failed verification (%s)", tier.name, key.hex()[:16], e)
            if e.kind != "decrypt":  # damaged or misplaced: never this block; drop it
                with contextlib.suppress(OSError):
                    if tier.delete(tid, key):
                        self._removed(tier.name, [(tid, key, "corrupt")])
            return None
        if self._expired(tid, h.created):
            self.metrics.inc("misses", tier=tier.name, tenant=tl, reason="expired")
            with contextlib.suppress(OSError):
                if tier.delete(tid, key):
                    self._removed(tier.name, [(tid, key, "ttl")])
            return None
        self._known_tenants.setdefault(tid, tenant)
        self.metrics.inc("hits", tier=tier.name, tenant=tl)
        self.metrics.inc("bytes_out", len(blob), tier=tier.name, tenant=tl)
        return h, t

    def _g2_acquire(self, tid: bytes, key: bytes) -> tuple[Slot, torch.Tensor] | None:
        if self.g2 is None:
            return None
        got = self.g2.acquire(tid, key)
        if got is None:
            return None
        if self._expired(tid, got[0].created):
            self.g2.release(got[0])
            self.metrics.inc("misses", tier="G2", tenant=tenant_label(tid), reason="expired")
            if self.g2.delete(tid, key):
                self._removed("G2", [(tid, key, "ttl")])
            return None
        return got

    def _promote(self, tid: bytes, key: bytes, t: torch.Tensor, h) -> None:
        if self.g2 is None:
            return
        stored, evicted = self._g2_put(tid, key, t, h.parent_key, h.token_count, h.created)
        del stored
        self._removed("G2", evicted)

    def load_into(self, keys: list[bytes], tenant: bytes, dsts: list[torch.Tensor]) -> list[str]:
        """Copy the leading stored blocks into ``dsts``; the tiers that served them.

        Returns only after the data has landed (device copies are synchronised)."""
        tid = _tid(tenant)
        served: list[str] = []
        held: list[Slot] = []
        g2_bytes, t_start, lower_s = 0, time.perf_counter(), 0.0
        cuda_dev = None
        try:
            for key, dst in zip(keys, dsts):
                got = self._g2_acquire(tid, key)
                if got is not None:
                    held.append(got[0])
                    dst.copy_(got[1], non_blocking=dst.is_cuda)
                    self.metrics.inc("hits", tier="G2", tenant=tenant_label(tid))
                    self.metrics.inc("bytes_out", dst.nbytes, tier="G2", tenant=tenant_label(tid))
                    g2_bytes += dst.nbytes
                    served.append("G2")
                elif self.g2 is not None:
                    self.metrics.inc("misses", tier="G2", tenant=tenant_label(tid), reason="absent")
                if got is None:
                    t0 = time.perf_counter()
                    tier = self._load_lower(tid, key, tenant, dst)
                    if tier is None:
                        break
                    dt = time.perf_counter() - t0
                    lower_s += dt
                    self._observe_load(tier, dst.nbytes, dt)
                    self.metrics.load_seconds.labels(tier=tier).observe(dt)
                    served.append(tier)
                if dst.is_cuda:
                    cuda_dev = dst.device
            if cuda_dev is not None:
                torch.cuda.current_stream(cuda_dev).synchronize()
        finally:
            for s in held:
                self.g2.release(s)
        if g2_bytes:
            dt = time.perf_counter() - t_start - lower_s
            self._observe_load("G2", g2_bytes, dt)
            n = served.count("G2")
            for _ in range(n):
                self.metrics.load_seconds.labels(tier="G2").observe(dt / n)
        return served

    def _load_lower(self, tid: bytes, key: bytes, tenant: bytes, dst: torch.Tensor) -> str | None:
        for tier in self.lower:
            got = self._read_lower(tier, tid, key, tenant)
            if got is None:
                continue
            h, t = got
            if tuple(t.shape) != tuple(dst.shape) or t.dtype != dst.dtype:
                self.metrics.inc(
                    "misses", tier=tier.name, tenant=tenant_label(tid), reason="mismatch"
                )
                continue
            self._promote(tid, key, t, h)
            dst.copy_(t)
            return tier.name
        return None

    def get(self, key: bytes, tenant: bytes) -> torch.Tensor | None:
        """One block as a new CPU tensor, from the fastest tier that holds a valid copy."""
        tid = _tid(tenant)
        got = self._g2_acquire(tid, key)
        if got is not None:
            try:
                self.metrics.inc("hits", tier="G2", tenant=tenant_label(tid))
                return got[1].clone()
            finally:
                self.g2.release(got[0])
        for tier in self.lower:
            r = self._read_lower(tier, tid, key, tenant)
            if r is not None:
                self._promote(tid, key, r[1], r[0])
                return r[1].clone()
        return None

    def prefetch(self, keys: list[bytes], tenant: bytes) -> bool:
        """Bring the leading stored blocks up into G2 in the background. False if dropped."""
        if self.g2 is None:
            return False
        tid = _tid(tenant)

        def job() -> None:
            for key, where in zip(keys, self.contains(keys, tenant)):
                if where is None:
                    return
                if where != "G2":
                    tier = self.tier(where)
                    r = self._read_lower(tier, tid, key, tenant)
                    if r is None:
                        return
                    self._promote(tid, key, r[1], r[0])

        return self.reads.submit(job)

    def lease(
        self, keys: list[bytes], tenant: bytes, timeout_s: float | None = None
    ) -> Lease | None:
        """Pin the leading G2 blocks of ``keys`` (``with store.lease(...) as l:``); they are not
        evicted until the lease is released or times out."""
        if self.leases is None:
            return None
        return self.leases.acquire(_tid(tenant), keys, timeout_s)

    # ---- writes ----------------------------------------------------------------------------

    def _g2_put(self, tid, key, block, parent_key, token_count, created=None) -> tuple[bool, list]:
        if self.leases is not None:
            self.leases.reap()
        quota = self._policy(tid).quota_bytes.get("G2")
        new = self.g2.peek(tid, key) is None
        stored, evicted = self.g2.put(tid, key, block, parent_key, token_count, quota, created)
        if stored and new:
            self.metrics.inc("bytes_in", block.nbytes, tier="G2", tenant=tenant_label(tid))
            self._emit(BlockStored((key,), parent_key, "G2", token_count))
        elif not stored:
            self.metrics.inc("writes_dropped", tier="G2", reason="full")
        return stored, evicted

    def put(
        self,
        key: bytes,
        parent_key: bytes | None,
        tenant: bytes,
        block_tensor: torch.Tensor,
        token_count: int,
    ) -> None:
        """Store one block. Reads ``block_tensor`` before returning; disk and network writes
        finish in the background (``flush`` waits for them)."""
        if self.block_shape is None:
            self.configure_blocks(tuple(block_tensor.shape), block_tensor.dtype)
        tid = _tid(tenant)
        self._known_tenants.setdefault(tid, tenant)
        seen = self.sightings.bump(key, at_least=1)
        admit = self.config.admit_after
        if self.g2 is not None and seen >= admit.get("G2", 1):
            _, evicted = self._g2_put(tid, key, block_tensor, parent_key, token_count)
            self._removed("G2", evicted)
        targets = [t for t in self.lower if seen >= admit.get(t.name, 1) and t.up]
        if not targets:
            return
        got = self.g2.acquire(tid, key) if self.g2 is not None else None
        if got is not None:
            slot, src = got  # pinned until the write has read it
        else:
            slot, src = None, block_tensor.detach().to("cpu", copy=True).contiguous()

        def job() -> None:
            try:
                self._write_lower(targets, tid, key, parent_key, tenant, src, token_count)
            finally:
                if slot is not None:
                    self.g2.release(slot)

        if not self.writes.submit(job):
            if slot is not None:
                self.g2.release(slot)
            for t in targets:
                self.metrics.inc("writes_dropped", tier=t.name, reason="queue_full")
        self.metrics.in_flight.set(self.writes.in_flight)

    def _write_lower(self, targets, tid, key, parent_key, tenant, src, token_count) -> None:
        todo = []
        for t in targets:
            with contextlib.suppress(OSError):
                if t.created_many(tid, [key])[0] is None:
                    todo.append(t)
        if not todo:
            return
        blob = encode_object(
            src,
            key,
            parent_key,
            tenant,
            token_count,
            self.keyring,
            self.config.codec,
            self.config.compression_level,
            self.config.lossy_max_rel_error,
            self.config.model_fingerprint,
            kvkeys.KV_LAYOUT_VERSION,
        )
        pol = self._policy(tid)
        for t in todo:
            try:
                res = t.put(tid, key, blob, pol.quota_bytes.get(t.name))
            except OSError as e:
                log.warning("%s write failed: %s", t.name, e)
                res = PutResult(False, reason="error")
            self._removed(t.name, res.evicted)
            if res.stored:
                self.metrics.inc("bytes_in", len(blob), tier=t.name, tenant=tenant_label(tid))
                self._emit(BlockStored((key,), parent_key, t.name, token_count))
            else:
                self.metrics.inc("writes_dropped", tier=t.name, reason=res.reason or "error")

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait for queued background writes to finish."""
        return self.writes.drain(timeout_s) and self.reads.drain(timeout_s)

    # ---- restart, retention, maintenance ---------------------------------------------------

    def _rebuild(self, tier: DiskTier) -> int:
        """Read every object's header after a restart: announce the valid ones (BlockStored),
        drop the ones whose header is damaged or does not match their name."""
        n = 0
        for info in list(tier.list()):
            try:
                head = tier.read_prefix(info.tenant_id, info.key, MAX_HEADER)
                if head is None:
                    continue
                h = read_header(head)
                if h.key != info.key or h.tenant_id != info.tenant_id or h.object_len != info.size:
                    raise ObjectError("mismatch", "header does not match the object's name")
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
        self, tenants: list[bytes] = (), remove_bad: bool = True
    ) -> dict[str, dict[str, int]]:
        """Read back every object below G2. Objects of a known tenant are fully checked
        (checksum, key, decryption, decoding); others by header and checksum only."""
        known = dict(self._known_tenants)
        for t in tenants:
            known[_tid(t)] = t
        report: dict[str, dict[str, int]] = {}
        for tier in self.lower:
            r = report[tier.name] = {"ok": 0, "checksum_only": 0, "bad": 0, "removed": 0}
            for info in list(tier.list()):
                blob = tier.get(info.tenant_id, info.key)
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
                    self.metrics.inc("integrity_failures", tier=tier.name, kind=e.kind)
                    if remove_bad and e.kind != "decrypt" and tier.delete(info.tenant_id, info.key):
                        r["removed"] += 1
                        self._removed(tier.name, [(info.tenant_id, info.key, "corrupt")])
        return report

    def clear(self, tenant: bytes | None = None) -> int:
        """Remove every object (of ``tenant``, or of everyone) from every tier."""
        tid = None if tenant is None else _tid(tenant)
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

    # ---- introspection ---------------------------------------------------------------------

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
            }
            self.metrics.capacity.labels(tier=t.name).set(cap)
            self.metrics.used.labels(tier=t.name).set(used)
            self.metrics.backend_up.labels(tier=t.name, backend=t.backend).set(1 if up else 0)
            if t is self.g2:
                tiers["G2"]["blocks"] = len(self.g2.entries)
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

    def close(self) -> None:
        self._closed.set()
        self.writes.close()
        self.reads.close()
        for t in self.lower:
            t.close()

    def __enter__(self) -> ContextStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
