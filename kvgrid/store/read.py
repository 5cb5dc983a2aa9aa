"""The read path of ``ContextStore``: lookups, and single blocks fetched from the tiers below
G2, verified, decrypted and promoted into G2 (``get``, ``accept``, and each block a load or a
prefetch brings up, ``load.py``); leases on G2 blocks."""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future

import torch

from kvgrid.events import BlockStored
from kvgrid.store.disk_tier import DiskTier
from kvgrid.store.fetch_procs import BATCH, FetchProcError
from kvgrid.store.host_pool import Slot
from kvgrid.store.lease import Lease
from kvgrid.store.metrics import tenant_label
from kvgrid.store.object import (
    ObjectError,
    ObjectHeader,
    cached_tenant_id,
    decode_object,
    dtype_of,
)
from kvgrid.store.tier import ObjectTier, ReadBuffer
from kvgrid.store.transfer import wait_ready

log = logging.getLogger(__name__)


class ReadPath:
    """Lookups and fetches of ``ContextStore`` (mixed into it, ``store.py``)."""

    def contains(self, keys: list[bytes], tenant: bytes, leading: bool = True) -> list[str | None]:
        """The tier holding each key, for the leading run of keys held somewhere; None after
        (``leading=False``: for every key, past gaps too)."""
        tid = cached_tenant_id(tenant)
        now = time.time()
        out: list[str | None] = [None] * len(keys)
        remaining = []
        slots = self.g2.peek_many(tid, keys) if self.g2 else [None] * len(keys)
        for i, s in enumerate(slots):
            if s is not None and not self._expired(tid, s.created, now):
                out[i] = "G2"
            else:
                remaining.append(i)
        if not leading:
            self._find_below(tid, keys, remaining, out, now)
            return out
        # the tiers below are asked in growing chunks up to the first key none holds: keys
        # past a gap are not looked up (a miss costs a stat or a round trip per tier)
        size = 8
        while remaining:
            chunk, remaining = remaining[:size], remaining[size:]
            self._find_below(tid, keys, chunk, out, now)
            if any(out[i] is None for i in chunk):
                break
            size *= 2
        for i, t in enumerate(out):
            if t is None:
                return out[:i] + [None] * (len(keys) - i)
        return out

    def _find_below(self, tid: bytes, keys: list[bytes], idx: list[int], out: list, now: float):
        """Fill ``out[i]`` for each ``i`` of ``idx`` with the first lower tier holding
        ``keys[i]`` (unexpired); None where none does."""
        for tier in self.lower:
            if not idx:
                return
            held = self._held_in(tier, tid, keys, idx, now) if tier.up else None
            if held is None:
                continue
            for i, h in zip(idx, held):
                if h:
                    out[i] = tier.name
            idx = [i for i, h in zip(idx, held) if not h]

    def _held_in(
        self, tier: ObjectTier, tid: bytes, keys, idx, now: float, known: bool = False
    ) -> list[bool] | None:
        """Whether ``tier`` holds ``keys[i]`` (unexpired) for each ``i`` of ``idx``; None when
        it cannot be asked (counted and logged as a failed lookup). ``known``: as far as
        this process knows without asking (``ObjectTier.known_many``)."""
        ask = tier.known_many if known else tier.created_many
        try:
            created = ask(tid, [keys[i] for i in idx])
        except OSError as e:
            self.failed(tier.name, "lookup", e)
            return None
        return [c is not None and not self._expired(tid, c, now) for c in created]

    def note_seen(self, keys: list[bytes]) -> None:
        """Count a sighting of each key (a request wanted it): drives disk admission."""
        for k in keys:
            self.sightings.bump(k)

    def _read_lower(self, tier: ObjectTier, tid: bytes, key: bytes, tenant: bytes, out=None):
        """(header, CPU tensor) of a verified object, or None (a counted miss). ``out`` as
        in ``decode_object``: with it, the object is read into this thread's reused buffer."""
        tl = tenant_label(tid)
        if not tier.up:
            self.metrics.inc("misses", tier=tier.name, tenant=tl, reason="backend_down")
            return None
        try:
            got = self._open_lower(tier, tid, key, tenant, out)
        except OSError as e:
            self.failed(tier.name, "read", e)
            got = None
        except FetchProcError as e:
            self.failed(tier.name, "fetch_process", e)
            self.metrics.inc("misses", tier=tier.name, tenant=tl, reason="fetch_process")
            return None
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
        if got is None:
            reason = "absent" if tier.up else "backend_down"
            self.metrics.inc("misses", tier=tier.name, tenant=tl, reason=reason)
            return None
        h, t, nbytes = got
        if self._expired(tid, h.created):
            self.metrics.inc("misses", tier=tier.name, tenant=tl, reason="expired")
            with contextlib.suppress(OSError):
                if tier.delete(tid, key):
                    self._removed(tier.name, [(tid, key, "ttl")])
            return None
        self._known_tenants.setdefault(tid, tenant)
        self.metrics.inc("hits", tier=tier.name, tenant=tl)
        self.metrics.inc("bytes_out", nbytes, tier=tier.name, tenant=tl)
        return h, t

    def _open_lower(self, tier: ObjectTier, tid: bytes, key: bytes, tenant: bytes, out):
        """(header, CPU tensor, object bytes) of the object ``tier`` holds for ``key``,
        verified; None if it holds none. A disk tier's object is opened by a fetch process
        where there are some (``fetch_procs.py``; this thread's batch may hold it already),
        else on this thread."""
        expect = self._expect()
        procs = self._procs
        if procs is not None and out is not None and isinstance(tier, DiskTier):
            pending = getattr(self._local, "batch", None)
            if pending is not None:
                if pending[0] is tier and key in pending[1]:
                    batch = pending[1]
                    return tier.read_with(tid, key, lambda path, ro: batch.take(key, out))
                # else read here: this thread holds a process, and asking for another
                # could wait for itself
            elif procs.fits(self._block_bytes):
                return tier.read_with(
                    tid, key, lambda path, ro: procs.read(path, ro, key, tenant, expect, out)
                )
        blob = tier.get(tid, key, self._read_buffer() if out is not None else None)
        if blob is None:
            return None
        h, t = decode_object(blob, key, tenant, self.keyring, *expect, out)
        return h, t, len(blob)

    def _run_size(self) -> int:
        """Blocks a fetch job takes at once: a run for one fetch process request where the
        processes serve, else one."""
        if self._procs is not None and self._procs.fits(self._block_bytes):
            return min(BATCH, self._window)
        return 1

    def _expect(self) -> tuple:
        """What a stored block must be here: (dtype, shape, model fingerprint)."""
        return self.block_dtype, self.block_shape, self.config.model_fingerprint or None

    def _fetch_run(
        self, tid: bytes, keys: list[bytes], tenant: bytes, futs: list[Future], fetch=None
    ) -> None:
        """On a fetch thread: the blocks of ``keys`` as ``_fetch_lower`` gives them (or
        ``fetch((tid, key), tenant)``), each into its future (``futs``, not yet running; a
        cancelled one is skipped), the first disk tier's objects of them opened by one
        request to a fetch process."""
        live = [(k, f) for k, f in zip(keys, futs) if f.set_running_or_notify_cancel()]
        batch = None
        try:
            tier = next((t for t in self.lower if isinstance(t, DiskTier)), None)
            if live and tier is not None and tier.up:
                ks = [k for k, _ in live]
                reads = [(p, tier.read_only, k, tenant) for p, k in zip(tier.paths(tid, ks), ks)]
                try:
                    batch = self._procs.read_many(reads, self._expect())
                except FetchProcError as e:  # counted; each block is then read on its own
                    self.failed(tier.name, "fetch_process", e)
            self._local.batch = (tier, batch) if batch is not None else None
            for k, f in live:
                try:
                    f.set_result(
                        fetch((tid, k), tenant) if fetch else self._fetch_lower(tid, k, tenant)
                    )
                except BaseException as e:
                    f.set_exception(e)
        except BaseException as e:  # never a future left unresolved: its load would hang
            log.exception("a run of fetches failed")
            for _, f in live:
                if not f.done():
                    f.set_exception(e)
        finally:
            self._local.batch = None
            if batch is not None:
                batch.close()

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
            return self.g2.view(got[0].index) if got[1] else None

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
                    t = self.g2.view(slot.index)  # pinned: the device copy can be async
                except Exception:
                    self.g2.release(slot)
                    slot = None
            if slot is not None:
                self.g2.mark_below(slot, tier.name)
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
        got = self._fetch_from(source, cached_tenant_id(tenant), key, tenant, time.perf_counter())
        if got is None:
            return None, "rejected"
        if got[1] is None:
            return None, "no_room"
        return got[1], "ok"

    def get(self, key: bytes, tenant: bytes) -> torch.Tensor | None:
        """One block as a new CPU tensor, from the fastest tier that holds a valid copy."""
        tid = cached_tenant_id(tenant)
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

    def lease(
        self, keys: list[bytes], tenant: bytes, timeout_s: float | None = None
    ) -> Lease | None:
        """Pin the leading G2 blocks of ``keys`` (``with store.lease(...) as l:``); they are not
        evicted until the lease is released or times out."""
        if self.leases is None:
            return None
        return self.leases.acquire(cached_tenant_id(tenant), keys, timeout_s)
