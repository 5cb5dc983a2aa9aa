"""ContextStore: the tiers below G1 (G2 host memory, G3 local disk, G4 shared) as one store.

Reads go G2, then G3, then G4; a hit below G2 is verified, decrypted and promoted into G2.
Writes land in G2 first (that copy is the staging buffer): from host memory synchronously;
from a GPU on a side stream (``transfer.CudaCopier``), the caller's stream ordered after the
copy, so a write-back never holds up the engine's thread. They go to G3/G4 on bounded
background workers, once a block has been seen often enough (admission). Every failure of
an object is a miss plus a metric, never an exception to the caller and never wrong data.
Tier changes are queued as KV events (BlockStored / BlockRemoved / AllCleared with tiers
"G2".."G4") for ``drain_events``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from kvgrid import keys as kvkeys
from kvgrid.events import AllCleared, BlockRemoved, KVEvent
from kvgrid.stats import ewma
from kvgrid.store.config import StoreConfig, TenantPolicy, default_store_dir
from kvgrid.store.crypto import KeyRing, MasterKeyError, load_keyring
from kvgrid.store.disk_tier import DiskTier
from kvgrid.store.fetch_procs import FetchProcs
from kvgrid.store.host_pool import HostPool, Slot
from kvgrid.store.lease import LeaseManager
from kvgrid.store.ledger import BlockLedger
from kvgrid.store.load import LoadPath
from kvgrid.store.maintenance import Maintenance
from kvgrid.store.metrics import StoreMetrics
from kvgrid.store.object import cached_tenant_id
from kvgrid.store.prefetch import PrefetchPlanner
from kvgrid.store.read import ReadPath
from kvgrid.store.sightings import Sightings
from kvgrid.store.tier import ObjectTier
from kvgrid.store.transfer import Copier, CudaCopier
from kvgrid.store.workqueue import BoundedWorkQueue
from kvgrid.store.write import WritePath
from kvgrid.store.write_procs import WriteProcs
from kvgrid.store.writedown import WriteDown

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)
_EWMA = 0.2


class ContextStore(ReadPath, LoadPath, WritePath, Maintenance):
    """The tiers, their shared state and their lifecycle; each path lives in its own module:
    lookups and fetches (``read.py``), loads and prefetches (``load.py``), write-backs
    (``write.py``), upkeep (``maintenance.py``)."""

    def __init__(
        self,
        config: StoreConfig | None = None,
        registry: CollectorRegistry | None = None,
        keyring: KeyRing | None = None,
        tiers: list[ObjectTier] | None = None,
        copier: Copier | None = None,
        read_only: bool = False,
    ) -> None:
        """``tiers`` replaces the G3/G4 tiers built from the config (for tools and tests);
        ``copier`` the asynchronous G1 -> G2 copies (default: on CUDA, a side stream).
        ``read_only`` (inspection tools): nothing on any tier is created, changed, deleted
        or touched, and no key is generated."""
        self.config = cfg = config or StoreConfig()
        cfg.validate()
        self.read_only = read_only
        self.metrics = StoreMetrics(registry)
        self.disabled: dict[str, str] = {}  # tiers never opened -> why
        self.keyring = None
        if cfg.encrypt:
            try:
                self.keyring = keyring or load_keyring(cfg.master_key_file, default_store_dir())
            except (MasterKeyError, OSError) as e:
                # stored KV leaves the process encrypted or not at all: below G2 is off
                for name in (
                    "G3" if cfg.g3_dir else None,
                    "G4" if cfg.g4_dir or cfg.g4_redis else None,
                ):
                    if name and tiers is None:
                        self.disabled[name] = "bad_key"
                        self.metrics.inc("tier_faults", tier=name, reason="bad_key")
                log.error(
                    "context store: the master key cannot be used (%s); %s off until it is "
                    "fixed and the worker restarted (G2 still serves)",
                    e, ", ".join(self.disabled) or "nothing below G2",
                )  # fmt: skip
        self.g2 = (
            HostPool(cfg.g2_bytes, cfg.high_watermark, cfg.low_watermark) if cfg.g2_bytes else None
        )
        self.leases = LeaseManager(self.g2, cfg.lease_timeout_s) if self.g2 else None
        if tiers is not None:
            self.lower: list[ObjectTier] = tiers
        elif self.disabled:
            self.lower = []
        else:
            self.lower = self._build_tiers(cfg, read_only)
        self._error_logged: dict[tuple[str, str], float] = {}
        if self.keyring is not None and not read_only:
            from kvgrid.store.keycheck import check_shared_tier

            for t in self.lower:
                if t.name == "G4" and t.up:
                    check_shared_tier(t, self.keyring)  # refuse another server's master key
        self.sightings = Sightings()
        self.ledger = BlockLedger(self.metrics)
        # the disk tiers' objects opened and written in processes of their own
        # (fetch_procs.py, write_procs.py)
        disks = not read_only and any(isinstance(t, DiskTier) for t in self.lower)
        n, w = cfg.fetch_procs_here(), cfg.write_procs_here()
        self._procs = (
            FetchProcs(n, self.keyring, lambda e: self.failed("fetch", "start", e))
            if n and disks
            else None
        )
        self.write_procs = (
            WriteProcs(w, self.keyring, lambda e: self.failed("write", "start", e))
            if w and disks
            else None
        )
        # what goes below G2, best reuse prospects first (writedown.py)
        self.writes = WriteDown(self, cfg.io_queue, cfg.io_workers, cfg.io_block_s, cfg.io_batch)
        self.reads = BoundedWorkQueue(cfg.io_queue, 1, 0.0, "prefetch")
        # reads below G2 (loads and prefetches): file/network read, verification, decryption
        # and decoding all release the GIL, so these threads run in parallel
        self._fetchers = ThreadPoolExecutor(cfg.load_workers, thread_name_prefix="kvgrid-load")
        # waits for device copies (layered loads, write-backs) to land, then frees their G2
        # slots; one thread, in order, so a no-op job is a barrier (flush)
        self._landings = ThreadPoolExecutor(1, thread_name_prefix="kvgrid-landed")
        # readahead hints to the lower tiers (ReadAhead): one thread, as a hint on a busy
        # disk may block for a while in the kernel's request queue
        self._hints = ThreadPoolExecutor(1, thread_name_prefix="kvgrid-readahead")
        self.copier = (
            copier if copier is not None else (CudaCopier() if torch.cuda.is_available() else None)
        )
        self._local = threading.local()  # per thread: the buffer objects are read into
        self._window = 2 * cfg.load_workers  # blocks in flight per load: bounds memory
        self._block_bytes = 0
        self.block_shape: tuple[int, ...] | None = None
        self.block_dtype: torch.dtype | None = None
        self.bandwidth: dict[str, float] = {}  # tier -> measured load bytes/s (EWMA)
        self._known_tenants: dict[bytes, bytes] = {cached_tenant_id(kvkeys.PUBLIC_TENANT): b""}
        for t in cfg.tenants:
            self._known_tenants[cached_tenant_id(t)] = t
        self._policy_by_tid = {cached_tenant_id(t): p for t, p in cfg.tenants.items()}
        self._events: list[KVEvent] = []
        self._ev_lock = threading.Lock()
        self._closed = threading.Event()
        for t in self._tiers():
            self.metrics.capacity.labels(tier=t.name).set(
                t.capacity_bytes if t is self.g2 else t.capacity
            )
        for t in self.lower:
            self.metrics.backend_up.labels(tier=t.name, backend=t.backend).set(1 if t.up else 0)
            if t.fault is not None:
                self.metrics.inc("tier_faults", tier=t.name, reason=t.fault)
            if getattr(t, "ledger_repairs", 0):  # found while opening it
                self.metrics.inc("tier_faults", t.ledger_repairs, tier=t.name, reason="ledger")
            t.on_state = self._tier_state
        self.rebuilt = {}
        if not read_only:
            self.rebuilt = {
                t.name: self._rebuild(t)
                for t in self.lower
                if isinstance(t, DiskTier) and t.fault is None
            }
        # the waiting requests' prefixes come up into G2 ahead of admission (prefetch.py)
        self.prefetcher = PrefetchPlanner(self) if self.g2 is not None else None
        self._janitor = None
        if cfg.sweep_interval_s > 0 and not read_only:
            self._janitor = threading.Thread(
                target=self._sweep_loop, name="kvgrid-store-ttl", daemon=True
            )
            self._janitor.start()

    @staticmethod
    def _build_tiers(cfg: StoreConfig, read_only: bool = False) -> list[ObjectTier]:
        hw = dict(high=cfg.high_watermark, low=cfg.low_watermark, read_only=read_only)
        disk = dict(
            hw, retry_s=cfg.disk_retry_s, lock_timeout_s=cfg.lock_timeout_s, fsync=cfg.sync_writes
        )
        out: list[ObjectTier] = []
        if cfg.g3_dir:
            # G3 is the worker's own folder: it owns it (lookups from memory)
            out.append(DiskTier(cfg.g3_dir, cfg.g3_bytes, "G3", "disk", sole=not read_only, **disk))
        if cfg.g4_dir:
            out.append(DiskTier(cfg.g4_dir, cfg.g4_bytes, "G4", "fs", **disk))
        elif cfg.g4_redis:
            from kvgrid.store.redis_tier import RedisTier

            out.append(
                RedisTier(
                    cfg.g4_redis, cfg.g4_bytes, "G4", cfg.g4_prefix, retry_s=cfg.redis_retry_s, **hw
                )
            )
        return out

    def _tier_state(self, tier: ObjectTier, up: bool, reason: str) -> None:
        """A tier turned off (a fault) or back on: metrics, and the router's view. Off, its
        blocks are unreachable (AllCleared); back, they are announced again (a rebuild on
        the background read thread)."""
        if reason:
            self.metrics.inc("tier_faults", tier=tier.name, reason=reason)
        self.metrics.backend_up.labels(tier=tier.name, backend=tier.backend).set(1 if up else 0)
        if not up:
            self._emit(AllCleared(tier.name))
        elif not reason and isinstance(tier, DiskTier) and not self.read_only:
            self.reads.submit(lambda: self._rebuild(tier))

    def _tiers(self) -> list:
        return ([self.g2] if self.g2 else []) + self.lower

    def tier(self, name: str) -> ObjectTier | HostPool | None:
        return next((t for t in self._tiers() if t.name == name), None)

    # ---- events, tenant policies, measurements ---------------------------------------------

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
        for tid, key, reason in evicted:
            if tier == "G2":  # if it was still waiting for the write-down, it never will
                self.writes.forget(tid, key)
            self.metrics.inc("evictions", tier=tier, reason=reason)
            self.ledger.left_tier(key, tier)
            self._emit(BlockRemoved((key,), tier))

    def _observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = nbytes / seconds
        self.bandwidth[tier] = ewma(self.bandwidth.get(tier), rate, _EWMA)
        self.metrics.bandwidth.labels(tier=tier).set(self.bandwidth[tier])

    def configure_blocks(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Declare the block shape/dtype (the engine's KV layout); G2 allocates its slab."""
        nbytes = math.prod(shape) * dtype.itemsize
        for procs in (self._procs, self.write_procs):
            if procs is not None:  # before a fetch or write thread sees the shape
                procs.configure(tuple(shape), dtype)
        self.block_shape, self.block_dtype = tuple(shape), dtype
        self._block_bytes = nbytes
        if self.g2 is not None and not self.g2.configure(self.block_shape, dtype):
            log.warning(
                "G2 (%d bytes) cannot hold one block %s %s: G2 off",
                self.g2.capacity_bytes,
                shape,
                dtype,
            )
            self.g2 = None
            self.leases = None

    def failed(self, tier: str, op: str, error: object) -> None:
        """A store operation failed: counted always, logged at most every 30 s per kind (a
        broken disk fails every request; the log must say so without flooding)."""
        self.metrics.inc("errors", tier=tier, op=op)
        now = time.monotonic()
        if now - self._error_logged.get((tier, op), float("-inf")) >= 30.0:
            self._error_logged[(tier, op)] = now
            n = self.metrics.total("errors", tier=tier, op=op)
            log.error("context store %s %s failed (%d so far): %s", tier, op, n, error)

    # ---- G2 slots: reserved by fetches (read.py) and write-backs (write.py) alike --------

    def _g2_quota(self, tid: bytes) -> int | None:
        """The tenant's G2 quota, after expired leases let go of their slots."""
        if self.leases is not None:
            self.leases.reap()
        return self._policy(tid).quota_bytes.get("G2")

    def _g2_reserve(
        self,
        tid,
        key,
        shape,
        dtype,
        parent_key,
        token_count,
        quota,
        created=None,
        wait_s=0.0,
        spare_s=0.0,
        count_drop=True,
    ) -> tuple[Slot, bool] | None:
        """A pinned G2 slot for a block: (slot, new), or None (no room after waiting up to
        ``wait_s`` for a pinned slot to be let go, or the block being filled by another
        thread); blocks waiting for the write-down are spared up to ``spare_s`` of that
        wait; evictions, waits and drops (unless ``count_drop`` is off: the caller keeps
        the block) are accounted."""
        t0 = time.perf_counter()
        slot, new, evicted = self.g2.reserve(
            tid, key, shape, dtype, parent_key, token_count, quota, created, wait_s, spare_s
        )
        waited = time.perf_counter() - t0
        if wait_s > 0 and waited > 1e-3:
            self.metrics.inc("backpressure_s", waited)
        self._removed("G2", evicted)
        if slot is None:
            if new and count_drop:
                self.metrics.inc("writes_dropped", tier="G2", reason="full")
            return None
        return slot, new

    def _g2_unreserve(self, held: list[tuple[Slot, bool]]) -> None:
        for slot, new in held:
            if new:
                self.g2.abort([slot])
            else:
                self.g2.release(slot)

    def close(self) -> None:
        self._closed.set()
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.writes.close()
        self.reads.close()
        self._fetchers.shutdown(wait=True)
        for procs in (self._procs, self.write_procs):
            if procs is not None:
                procs.close()
        self._hints.shutdown(wait=True)
        self._landings.shutdown(wait=True)
        for t in self.lower:
            t.close()

    def __enter__(self) -> ContextStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
