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

import contextlib
import functools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import torch

from kvgrid import keys as kvkeys
from kvgrid.events import AllCleared, BlockRemoved, BlockStored, KVEvent
from kvgrid.store.config import StoreConfig, TenantPolicy, default_store_dir
from kvgrid.store.crypto import KeyRing, MasterKeyError, load_keyring
from kvgrid.store.disk_tier import DiskTier
from kvgrid.store.host_pool import HostPool, Slot
from kvgrid.store.landing import LayerLanding, land_layers
from kvgrid.store.ledger import BlockLedger
from kvgrid.store.metrics import StoreMetrics, tenant_label
from kvgrid.store.object import (
    MAX_HEADER,
    ObjectError,
    ObjectHeader,
    check_object,
    decode_object,
    dtype_of,
    read_header,
    tenant_id,
)
from kvgrid.store.policy import BoundedWorkQueue, Lease, LeaseManager, LoadDeadline, Sightings
from kvgrid.store.prefetch import PrefetchPlanner
from kvgrid.store.tier import ObjectTier, ReadBuffer
from kvgrid.store.transfer import Copier, CopyEvent, CudaCopier, copy_run, host_copy, wait_ready
from kvgrid.store.writedown import Candidate, WriteDown

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
        disk = dict(hw, retry_s=cfg.disk_retry_s, lock_timeout_s=cfg.lock_timeout_s)
        out: list[ObjectTier] = []
        if cfg.g3_dir:
            out.append(DiskTier(cfg.g3_dir, cfg.g3_bytes, "G3", "disk", **disk))
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

    def contains(self, keys: list[bytes], tenant: bytes, leading: bool = True) -> list[str | None]:
        """The tier holding each key, for the leading run of keys held somewhere; None after
        (``leading=False``: for every key, past gaps too)."""
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
            except OSError as e:
                self.failed(tier.name, "lookup", e)
                continue
            still = []
            for i, c in zip(remaining, created):
                if c is not None and not self._expired(tid, c, now):
                    out[i] = tier.name
                else:
                    still.append(i)
            remaining = still
        if not leading:
            return out
        for i, t in enumerate(out):
            if t is None:
                return out[:i] + [None] * (len(keys) - i)
        return out

    def note_seen(self, keys: list[bytes]) -> None:
        """Count a sighting of each key (a request wanted it): drives disk admission."""
        for k in keys:
            self.sightings.bump(k)

    # ---- reads -----------------------------------------------------------------------------

    def _read_lower(self, tier: ObjectTier, tid: bytes, key: bytes, tenant: bytes, out=None):
        """(header, CPU tensor) of a verified object, or None (a counted miss). ``out`` as
        in ``decode_object``: with it, the object is read into this thread's reused buffer."""
        tl = tenant_label(tid)
        if not tier.up:
            self.metrics.inc("misses", tier=tier.name, tenant=tl, reason="backend_down")
            return None
        try:
            blob = tier.get(tid, key, self._read_buffer() if out is not None else None)
        except OSError as e:
            self.failed(tier.name, "read", e)
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
                out,
            )
        except ObjectError as e:
            self.metrics.inc("integrity_failures", tier=tier.name, kind=e.kind)
            self.metrics.inc("misses", tier=tier.name, tenant=tl, reason=e.kind)
            log.warning("%s object %s failed verification (%s)", tier.name, key.hex()[:16], e)
            if e.kind == "decrypt" and tier.name == "G4":
                self.failed(
                    "G4",
                    "decrypt",
                    "an object of the shared tier does not open with this server's master key: "
                    "every server of a shared tier needs the same key",
                )
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

    def failed(self, tier: str, op: str, error: object) -> None:
        """A store operation failed: counted always, logged at most every 30 s per kind (a
        broken disk fails every request; the log must say so without flooding)."""
        self.metrics.inc("errors", tier=tier, op=op)
        now = time.monotonic()
        if now - self._error_logged.get((tier, op), float("-inf")) >= 30.0:
            self._error_logged[(tier, op)] = now
            n = self.metrics.total("errors", tier=tier, op=op)
            log.error("context store %s %s failed (%d so far): %s", tier, op, n, error)

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

    def _read_buffer(self) -> ReadBuffer:
        buf = getattr(self._local, "read_buffer", None)
        if buf is None:
            buf = self._local.read_buffer = ReadBuffer()
        return buf

    def _fetch_lower(self, tid: bytes, key: bytes, tenant: bytes):
        """(tier, pinned G2 slot or None, CPU tensor) of one block from the first lower tier
        with a valid copy, promoted into G2; None if none has one. Runs on a fetch thread."""
        t0 = time.perf_counter()
        for tier in self.lower:
            got = self._fetch_from(tier, tid, key, tenant, t0)
            if got is not None:
                return got
        return None

    def _fetch_from(self, tier, tid: bytes, key: bytes, tenant: bytes, t0: float):
        """One block from ``tier``, verified and promoted into G2: (tier name, pinned G2
        slot or None, CPU tensor), or None (a counted miss).

        The object is decoded straight into a G2 slot reserved for it (decryption writes
        the plaintext in place), which is shown only once the object has verified: one pass
        over the bytes fewer than decoding first and copying after."""
        held: list[tuple[Slot, bool]] = []  # the block's G2 slot, and whether new

        def into(h: ObjectHeader) -> torch.Tensor | None:
            if self.g2 is None:
                return None
            got = self._g2_reserve(
                tid,
                key,
                h.shape,
                dtype_of(h.dtype),
                h.parent_key,
                h.token_count,
                self._g2_quota(tid),
                h.created,
            )
            if got is None:
                return None
            held.append(got)
            return self.g2.pool[got[0].index] if got[1] else None

        try:
            got = self._read_lower(tier, tid, key, tenant, into)
        except BaseException:
            self._g2_unreserve(held)
            raise
        if got is None:
            self._g2_unreserve(held)
            return None
        h, t = got
        slot = None
        if held:
            slot, new = held[0]
            if new:
                self.g2.commit([slot])
                tl = tenant_label(tid)
                self.metrics.inc("bytes_in", t.nbytes, tier="G2", tenant=tl)
                self._emit(BlockStored((key,), h.parent_key, "G2", h.token_count))
            else:
                # already there, its write-back perhaps still landing; if that copy
                # failed, the block just read and verified serves instead
                try:
                    wait_ready([slot])
                    t = self.g2.pool[slot.index]  # pinned: the device copy can be async
                except Exception:
                    self.g2.release(slot)
                    slot = None
            if slot is not None:
                slot.below.add(tier.name)
        self.metrics.load_seconds.labels(tier=tier.name).observe(time.perf_counter() - t0)
        return tier.name, slot, t

    def accept(self, source: ObjectTier, key: bytes, tenant: bytes) -> tuple[Slot | None, str]:
        """Take one object that arrived from elsewhere (a KV transfer from another worker,
        ``source`` holding it) into G2 through the path loads from G3/G4 take: verified
        (a failure is a counted miss of ``source.name``), decoded into a slot, announced as
        a G2 block. Returns the slot, pinned until the caller releases it (``g2.release``),
        and "ok"; or None and why: "rejected" (failed verification) or "no_room" (no G2,
        or no slot free)."""
        if self.g2 is None:
            return None, "no_room"
        got = self._fetch_from(source, _tid(tenant), key, tenant, time.perf_counter())
        if got is None:
            return None, "rejected"
        if got[1] is None:
            return None, "no_room"
        return got[1], "ok"

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
    ) -> tuple[Slot, bool] | None:
        """A pinned G2 slot for a block: (slot, new), or None (no room after waiting up to
        ``wait_s`` for a pinned slot to be let go, or the block being filled by another
        thread); blocks waiting for the write-down are spared up to ``spare_s`` of that
        wait; evictions, waits and drops are accounted."""
        t0 = time.perf_counter()
        slot, new, evicted = self.g2.reserve(
            tid, key, shape, dtype, parent_key, token_count, quota, created, wait_s, spare_s
        )
        waited = time.perf_counter() - t0
        if wait_s > 0 and waited > 1e-3:
            self.metrics.inc("backpressure_s", waited)
        self._removed("G2", evicted)
        if slot is None:
            if new:
                self.metrics.inc("writes_dropped", tier="G2", reason="full")
            return None
        return slot, new

    def _g2_unreserve(self, held: list[tuple[Slot, bool]]) -> None:
        for slot, new in held:
            if new:
                self.g2.abort([slot])
            else:
                self.g2.release(slot)

    def _drop_fetch(self, fut: Future) -> None:
        """Let go of a fetch nobody will use (a load that stopped early)."""
        if fut.cancel():
            return

        def release(f: Future) -> None:
            r = None if f.cancelled() or f.exception() is not None else f.result()
            if r is not None and r[1] is not None:
                self.g2.release(r[1])

        fut.add_done_callback(release)

    def load_into(
        self,
        keys: list[bytes],
        tenant: bytes,
        dsts: list[torch.Tensor],
        deadline: float | LoadDeadline | None = None,
    ) -> list[str]:
        """Copy the leading stored blocks into ``dsts``; the tiers that served them.

        G2 blocks are copied straight from their pinned slots. Blocks below G2 are fetched by
        ``load_workers`` threads, a window ahead of the copies, each promoted into a pinned
        G2 slot that is the source of its copy. With a ``deadline`` (time.monotonic(), or a
        ``LoadDeadline`` the caller may move), the load stops at the first block not ready by
        then, and the caller recomputes the rest. Returns only after the data has landed
        (device copies are synchronised)."""
        tid = _tid(tenant)
        ctl = deadline if isinstance(deadline, LoadDeadline) else LoadDeadline(deadline)
        n = len(keys)
        t_start = time.perf_counter()
        held: list[Slot] = []
        srcs: list[torch.Tensor | None] = [None] * n
        if self.g2 is not None:
            for i, key in enumerate(keys):
                got = self._g2_acquire(tid, key)
                if got is not None:
                    held.append(got[0])
                    srcs[i] = got[1]
        missing = deque(i for i in range(n) if srcs[i] is None)
        ahead = ReadAhead(self, tid, [keys[i] for i in missing])
        futs: dict[int, Future] = {}
        dev = dsts[0].device if dsts else None

        def refill() -> None:
            # keep the window full, in key order (the copies consume in key order)
            while missing and len(futs) < self._window:
                i = missing.popleft()
                futs[i] = self._fetchers.submit(self._fetch_lower, tid, keys[i], tenant)
            ahead.hint(len(ahead.keys) - len(missing))

        served: list[str] = []
        nbytes: dict[str, int] = {}
        run: list[tuple[torch.Tensor, torch.Tensor]] = []
        cuda_dev = None
        tl = tenant_label(tid)
        try:
            refill()
            self._order_after_writebacks(dev, held, [d.data_ptr() for d in dsts])
            for i in range(n):
                if srcs[i] is not None:
                    tier = "G2"
                else:
                    if self.g2 is not None:
                        self.metrics.inc("misses", tier="G2", tenant=tl, reason="absent")
                    try:
                        r = ctl.wait(futs[i])
                        del futs[i]
                    except FutureTimeout:
                        # not ready in time: recomputing the rest now beats waiting longer
                        r = None
                        lower = self.lower[0].name if self.lower else "G2"
                        self.metrics.inc("misses", tier=lower, tenant=tl, reason="deadline")
                    if r is None:
                        break
                    tier, slot, srcs[i] = r
                    if slot is not None:
                        held.append(slot)
                    refill()
                dst = dsts[i]
                if dst.is_cuda:
                    cuda_dev = dst.device
                run = copy_run(run, srcs[i], dst)
                served.append(tier)
                ctl.landed = len(served)
                nbytes[tier] = nbytes.get(tier, 0) + dst.nbytes
            copy_run(run, None, None)
            if cuda_dev is not None:
                torch.cuda.current_stream(cuda_dev).synchronize()
        finally:
            for fut in futs.values():
                self._drop_fetch(fut)
            if held:
                self.g2.release_run(held)
        self._account_load(tl, served.count("G2"), nbytes, time.perf_counter() - t_start, n)
        return served

    def will_load(self, keys: list[bytes], tenant: bytes) -> None:
        """A load of these blocks is about to start: the disk tiers start reading the first
        of those below G2 now (kernel readahead, from the hint thread: no GIL-bound work),
        while the load itself waits for the engine to launch a step (``kv_loader``)."""
        tid = _tid(tenant)
        below = [k for k in keys if self.g2 is None or self.g2.peek(tid, k) is None]
        ReadAhead(self, tid, below).hint(0)

    def _account_load(
        self, tl: str, n_g2: int, nbytes: dict[str, int], seconds: float, n: int
    ) -> None:
        if n_g2:
            self.metrics.inc("hits", n_g2, tier="G2", tenant=tl)
            self.metrics.inc("bytes_out", nbytes["G2"], tier="G2", tenant=tl)
            for _ in range(n_g2):
                self.metrics.load_seconds.labels(tier="G2").observe(seconds / n)
        # loads overlap, so a tier's bandwidth is its bytes over the whole call (G2 copies
        # are folded into the slower tier's time when both served)
        for tier, b in nbytes.items():
            if tier != "G2" or len(nbytes) == 1:
                self._observe_load(tier, b, seconds)

    def load_layered(
        self, keys: list[bytes], tenant: bytes, dst: torch.Tensor, block_ids: list[int]
    ) -> LayerLanding | None:
        """Start copying blocks that are all in G2 into ``dst[block_ids]`` (the engine's
        cache, ``[num_blocks, *block_shape]``) layer by layer (``kvgrid.store.landing``) and
        return at once; None, with nothing started, unless every block is in G2 (a load
        that reads lower tiers is bound by them: it goes through ``load_into``). The G2
        slots stay leased until the copies have landed."""
        if self.g2 is None or self.g2.pool is None or not keys:
            return None
        if dst.is_cuda and not self.g2.pin_memory:
            return None
        tid = _tid(tenant)
        held = self.g2.acquire_run(tid, keys)
        now = time.time()
        if len(held) < len(keys) or any(self._expired(tid, s.created, now) for s in held):
            self.g2.release_run(held)  # expired blocks are dropped by the block-by-block load
            return None
        t0 = time.perf_counter()
        try:
            at, step = dst.data_ptr(), dst[0].nbytes  # no per-block tensors (see land_layers)
            self._order_after_writebacks(dst.device, held, [at + b * step for b in block_ids])
            landing = land_layers(self.g2.pool, [s.index for s in held], dst, block_ids)
        except Exception:
            self.g2.release_run(held)
            raise
        self._landings.submit(self._landed, landing, held, tenant_label(tid), t0)
        return landing

    def _landed(self, landing: LayerLanding, held: list[Slot], tl: str, t0: float) -> None:
        """Once a layered load has landed: free its slots, count it, measure G2."""
        try:
            landing.synchronize()
        finally:
            self.g2.release_run(held)
        seconds = landing.device_seconds() or time.perf_counter() - t0
        self._account_load(tl, len(held), {"G2": landing.nbytes}, seconds, len(held))

    def _order_after_writebacks(
        self, dev: torch.device | None, slots: list[Slot], dst_ptrs: list[int]
    ) -> None:
        """Before copies into ``dev`` from ``slots``: they read the slots' bytes only once
        their write-backs have landed, and overwrite the G1 blocks at ``dst_ptrs`` only after
        the write-backs that read them have (a load's destination may be a block just
        evicted)."""
        wait_ready(slots, dev)
        if dev is not None and dev.type == "cuda" and self.copier is not None:
            self.copier.fence(dev, dst_ptrs)

    def get(self, key: bytes, tenant: bytes) -> torch.Tensor | None:
        """One block as a new CPU tensor, from the fastest tier that holds a valid copy."""
        tid = _tid(tenant)
        got = self._g2_acquire(tid, key)
        if got is not None:
            try:
                wait_ready([got[0]])
            except Exception:  # its write-back copy failed: the entry is gone, look below
                log.exception("G2 block %s never landed", key.hex()[:16])
                self.metrics.inc("misses", tier="G2", tenant=tenant_label(tid), reason="copy")
                self.g2.release(got[0])
                got = None
        if got is not None:
            try:
                self.metrics.inc("hits", tier="G2", tenant=tenant_label(tid))
                return got[1].clone()
            finally:
                self.g2.release(got[0])
        r = self._fetch_lower(tid, key, tenant)
        if r is None:
            return None
        _, slot, t = r
        try:
            return t.clone()
        finally:
            if slot is not None:
                self.g2.release(slot)

    def prefetch(self, keys: list[bytes], tenant: bytes) -> bool:
        """Bring the leading stored blocks up into G2 in the background. False if dropped."""
        if self.g2 is None:
            return False
        tid = _tid(tenant)

        def job() -> None:
            where = self.contains(keys, tenant)
            todo = [k for k, w in zip(keys, where) if w is not None and w != "G2"]
            futs: deque[Future] = deque()
            ok = True
            ahead = ReadAhead(self, tid, todo)
            nbytes: dict[str, int] = {}
            t0 = time.perf_counter()
            for j, k in enumerate(todo):
                futs.append(self._fetchers.submit(self._fetch_lower, tid, k, tenant))
                ahead.hint(j + 1)
                while futs and (len(futs) >= self._window or not ok):
                    ok = self._end_prefetch(futs.popleft(), nbytes) and ok
                if not ok:
                    break
            while futs:
                ok = self._end_prefetch(futs.popleft(), nbytes) and ok
            seconds = time.perf_counter() - t0
            for tier, b in nbytes.items():  # a prefetch measures its tiers as a load does
                self._observe_load(tier, b, seconds)

        return self.reads.submit(job)

    def _end_prefetch(self, fut: Future, nbytes: dict[str, int]) -> bool:
        r = fut.result()
        if r is not None:
            nbytes[r[0]] = nbytes.get(r[0], 0) + r[2].nbytes
            if r[1] is not None:
                self.g2.release(r[1])
        return r is not None

    def lease(
        self, keys: list[bytes], tenant: bytes, timeout_s: float | None = None
    ) -> Lease | None:
        """Pin the leading G2 blocks of ``keys`` (``with store.lease(...) as l:``); they are not
        evicted until the lease is released or times out."""
        if self.leases is None:
            return None
        return self.leases.acquire(_tid(tenant), keys, timeout_s)

    # ---- writes ----------------------------------------------------------------------------

    def put(
        self,
        key: bytes,
        parent_key: bytes | None,
        tenant: bytes,
        block_tensor: torch.Tensor,
        token_count: int,
    ) -> None:
        """Store one block (``put_many`` of one)."""
        self.put_many([key], [parent_key], tenant, [block_tensor], token_count)

    def put_many(
        self,
        keys: list[bytes],
        parent_keys: list[bytes | None],
        tenant: bytes,
        blocks: list[torch.Tensor],
        token_count: int,
        hints: list[float] | None = None,
        settle: bool = False,
        positions: list[int] | None = None,
    ) -> int:
        """Store blocks; how many were taken without error (stored, or dropped by policy).
        ``put_blocks`` says what became of each."""
        out = self.put_blocks(
            keys, parent_keys, tenant, blocks, token_count, hints, settle, positions
        )
        return sum(o not in ("copy_failed", "error") for o in out)

    def put_blocks(
        self,
        keys: list[bytes],
        parent_keys: list[bytes | None],
        tenant: bytes,
        blocks: list[torch.Tensor],
        token_count: int,
        hints: list[float] | None = None,
        settle: bool = False,
        positions: list[int] | None = None,
    ) -> list[str]:
        """Store blocks handed down from G1; per block, its outcome: ``g2`` (now in G2),
        ``already_stored``, ``queued_below`` (no G2 copy: queued for the disk tiers),
        ``dropped_full``, ``not_admitted``, ``outranked``, ``copy_failed`` or ``error``.

        Host blocks are read before this returns. GPU blocks are copied into G2 on the
        copier's stream: the caller's current stream waits for those copies on the device,
        so its later kernels cannot overwrite the blocks before they are read, and the
        caller may reuse them at once. With every G2 slot pinned, the caller waits up to
        ``g2_wait_s`` for one (back-pressure) before a block is dropped. Disk and network
        writes go through the ranked write-down (``hints``: the engine's reuse prospects
        per block, added to its sightings; ``positions``: each block's place in its chain,
        a prefix's head going first); ``settle`` (shutdown) waives disk admission."""
        if not (len(keys) == len(parent_keys) == len(blocks)):
            raise ValueError("put_many() needs as many keys, parent keys and blocks")
        if not keys:
            return []
        if self.block_shape is None:
            self.configure_blocks(tuple(blocks[0].shape), blocks[0].dtype)
        tid = _tid(tenant)
        self._known_tenants.setdefault(tid, tenant)
        hints = hints or [0.0] * len(keys)
        score = [self.sightings.bump(k, at_least=1) + h for k, h in zip(keys, hints)]
        out = ["not_admitted"] * len(keys)
        if self.g2 is not None:
            self._g2_put_many(tid, keys, parent_keys, blocks, token_count, score, out)
            for key, o in zip(keys, out):
                if o in ("g2", "already_stored"):
                    self.ledger.handed_down(key, o)
        g2_out = list(out)
        for i, key in enumerate(keys):
            in_g2 = out[i] in ("g2", "already_stored")
            try:
                depth = positions[i] if positions else 0
                o = self._offer_below(
                    tid, key, parent_keys[i], tenant, blocks[i], token_count, score[i], settle,
                    in_g2, depth,
                )  # fmt: skip
            except Exception:
                log.exception("store write-back failed")
                o = "error"
            if in_g2:
                if o == "already_stored":
                    out[i] = o
                if self.g2.peek(tid, key) is None:  # its own batch filled G2 past it
                    self.ledger.left_tier(key, "G2")
                continue
            # G2 did not take it: what the lower tiers did says where it went, unless they
            # did not take it either (then G2's reason: full, or a failed copy)
            if o in ("queued_below", "already_stored") or g2_out[i] == "not_admitted":
                out[i] = o
            self.ledger.handed_down(key, out[i])
        return out

    def _g2_put_many(self, tid, keys, parent_keys, blocks, token_count, score, out) -> None:
        """The G2 part of ``put_blocks``: new slots are reserved, filled (one asynchronous
        batch for device blocks), then shown; ``out[i]`` says what became of each. A batch
        larger than what G2 has free fills what it reserved before it waits for more."""
        quota = self._g2_quota(tid)
        fills: list[tuple[int, Slot]] = []
        sync: list[tuple[int, Slot]] = []
        now = time.monotonic()
        wait_end = now + self.config.g2_wait_s  # one bound for the whole call
        spare_end = now + self.config.g2_spare_s
        for i, key in enumerate(keys):
            if score[i] < self.config.admit_after.get("G2", 1):
                continue
            b = blocks[i]
            got = None
            for _ in range(2):
                now = time.monotonic()
                got = self._g2_reserve(tid, key, b.shape, b.dtype, parent_keys[i], token_count,
                                       quota, wait_s=max(0.0, wait_end - now),
                                       spare_s=max(0.0, spare_end - now))  # fmt: skip
                if got is not None or not (fills or sync):
                    break
                # this batch's own slots, still being filled, may be what G2 waits for
                self._g2_fill(tid, keys, parent_keys, blocks, token_count, fills, sync, out)
                fills, sync = [], []
            if got is None:
                out[i] = "dropped_full"
                continue
            slot, new = got
            slot.prospect = max(slot.prospect, score[i])
            if not new:
                out[i] = "already_stored"
                self.g2.release(slot)
            elif self.copier is not None and self.copier.accepts(b, self.g2.pool):
                fills.append((i, slot))
            else:
                sync.append((i, slot))
        self._g2_fill(tid, keys, parent_keys, blocks, token_count, fills, sync, out)

    def _g2_fill(self, tid, keys, parent_keys, blocks, token_count, fills, sync, out) -> None:
        """Copy into reserved G2 slots (``sync`` here, ``fills`` as one asynchronous batch)
        and show them."""
        shown: list[tuple[int, Slot]] = []
        for i, slot in sync:
            try:
                self.g2.fill(slot, blocks[i])
            except Exception:
                log.exception("G2 write-back copy failed")
                self.metrics.inc("writes_dropped", tier="G2", reason="copy_failed")
                out[i] = "copy_failed"
                continue
            self.g2.release(slot)
            shown.append((i, slot))
        if fills:
            slots = [s for _, s in fills]
            pool = self.g2.pool
            try:
                ev = self.copier.copy([(pool[s.index], blocks[i]) for i, s in fills])
            except Exception:
                log.exception("G2 write-back copy failed")
                self._abandon_issued(slots, blocks[fills[0][0]].device)
                self.metrics.inc("writes_dropped", len(slots), tier="G2", reason="copy_failed")
                for i, _ in fills:
                    out[i] = "copy_failed"
            else:
                self.g2.commit(slots, ev)
                self._landings.submit(self._copied, slots, ev)
                shown += fills
            self.metrics.inc("writebacks", len(fills), mode="async")
        if sync:
            self.metrics.inc("writebacks", len(sync), mode="sync")
        tl = tenant_label(tid)
        for i, _ in shown:
            out[i] = "g2"
            self.metrics.inc("bytes_in", blocks[i].nbytes, tier="G2", tenant=tl)
            self._emit(BlockStored((keys[i],), parent_keys[i], "G2", token_count))

    def _copied(self, slots: list[Slot], ev: CopyEvent) -> None:
        """On the landing thread: an asynchronous write-back batch has landed (or failed)."""
        try:
            ev.synchronize()
        except Exception:
            log.exception("G2 write-back copy failed on the device")
            self.g2.abort(slots)
            self.metrics.inc("writes_dropped", len(slots), tier="G2", reason="copy_failed")
            for s in slots:
                self.ledger.record(s.name[1], "dropped:copy_failed")
                self._emit(BlockRemoved((s.name[1],), "G2"))
            return
        self.g2.settle(slots)

    def _abandon_issued(self, slots: list[Slot], dev: torch.device) -> None:
        """A batch failed while its copies were being issued: some may still be running, so
        their slots are reused only once the copy stream is idle; if that cannot be known
        (the device is broken), never."""
        try:
            self.copier.synchronize(dev)
        except Exception:
            log.exception("device unusable: %d G2 slots retired", len(slots))
            self.g2.retire(slots)
        self.g2.abort(slots)

    def _offer_below(
        self, tid, key, parent_key, tenant, block, token_count, score, settle, in_g2, depth=0
    ) -> str:
        """Offer one block to the write-down for the disk tiers (by its G2 slot when G2
        holds it, else with a host copy of its own); the outcome for a block G2 lacks."""
        admit = self.config.admit_after
        targets = [t for t in self.lower if t.up and (settle or score >= admit.get(t.name, 1))]
        for t in self.lower:
            if t.up and t not in targets:
                self.metrics.inc("writedown", tier=t.name, outcome="not_admitted")
        got = self.g2.acquire(tid, key) if in_g2 and targets else None
        if got is not None:
            targets = [t for t in targets if t.name not in got[0].below]  # already there
            if not targets:
                self.g2.release(got[0])
                return "already_stored"
        if not targets:
            if self.lower and in_g2:
                self.ledger.skipped_below(key, "not_admitted")
            return "not_admitted"
        copied = None
        if got is not None:
            slot, src = got  # pinned until written or skipped
        else:
            slot = None
            src, copied = self._off_device(block)
        c = Candidate(
            tid, key, parent_key, tenant, token_count, score, targets, src, slot, copied, depth
        )
        wait = self.config.io_block_s if not settle else 60.0
        return "queued_below" if self.writes.offer(c, wait_s=wait) else "outranked"

    def settle(self, timeout_s: float = 120.0) -> int:
        """At shutdown, after G1's blocks have been handed down: what G2 holds that no
        lower tier has goes down, best prospects first, within each tier's capacity
        (``WriteDown.settle``). Returns how many blocks were offered."""
        return self.writes.settle(timeout_s)

    def _off_device(self, block: torch.Tensor) -> tuple[torch.Tensor, CopyEvent | None]:
        """A host copy of ``block`` for a write below G2 (no G2 slot holds it), and the
        event it lands with. From a GPU it is issued on the copier's stream, the caller's
        stream ordered after it as for G2 write-backs: a synchronous copy would make the
        engine's thread wait for the step in flight, then for a pageable copy."""
        dst = torch.empty(block.shape, dtype=block.dtype, pin_memory=block.is_cuda)
        if self.copier is not None and self.copier.accepts(block, dst):
            return dst, self.copier.copy([(dst, block)])
        host_copy(dst, block)
        return dst, None

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

    # ---- restart, retention, maintenance ---------------------------------------------------

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
            known[_tid(t)] = t
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

    def close(self) -> None:
        self._closed.set()
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.writes.close()
        self.reads.close()
        self._fetchers.shutdown(wait=True)
        self._hints.shutdown(wait=True)
        self._landings.shutdown(wait=True)
        for t in self.lower:
            t.close()

    def __enter__(self) -> ContextStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ReadAhead:
    """Readahead for one load below G2: the tiers are told about the next ``window`` blocks
    beyond those handed to the fetch threads, so a disk keeps reading while those threads
    verify, decrypt and decode (each thread alone leaves the disk idle meanwhile: cold zstd
    loads reached 77% of a plain read of the same files with as many threads)."""

    def __init__(self, store: ContextStore, tid: bytes, keys: list[bytes]) -> None:
        self.store, self.tid, self.keys = store, tid, keys
        self._hinted = 0

    def hint(self, submitted: int) -> None:
        """``submitted``: how many of ``keys`` (in order) the fetch threads have been given."""
        upto = min(len(self.keys), submitted + self.store._window)
        if upto <= self._hinted:
            return
        batch, self._hinted = self.keys[self._hinted : upto], upto
        for tier in self.store.lower:
            if tier.up:
                self.store._hints.submit(tier.will_need, self.tid, batch)
