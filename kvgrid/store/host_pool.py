"""G2: a host-memory pool of fixed-size block slots (pinned when CUDA is available).

One slab tensor ``[num_slots, *block_shape]`` is allocated once, at the first block; the
slot count is capacity // block bytes, so usage can never exceed capacity. LRU eviction
with high/low watermarks skips pinned slots (pins are leases held by readers and by
background writes still reading a slot) and takes first the blocks a lower tier also holds
(evicting those loses nothing), then those no lower tier is waiting for, and last those
waiting for the write-down, the worst prospects first. A block no lower tier holds goes
before one that a lower tier holds if it was last used more than half a pool's worth of
uses earlier: blocks seen once, never admitted below, would otherwise outlive every reused
block the disk also holds. Entries are named by (tenant id, block key). A write that finds
every slot pinned may wait for one to be released (``reserve(wait_s=...)``): a block
leaving G1 then waits for room instead of being dropped; before it takes the place of a
block waiting for the write-down it waits up to ``spare_s`` for a write in flight to finish
(a written block goes first).

Each of the three eviction classes is its own LRU index (``mark_below`` and
``mark_queued`` move a block between them), so an eviction costs what it evicts: a full
G2 whose blocks all wait for a slow disk answers each write-back at once, instead of
scanning every slot under the lock for each block leaving G1.

G2 lives inside the worker process, next to G1, so it holds the raw block bytes: it is not
encrypted or checksummed (that happens when a block leaves the process for G3/G4).

A slot is filled in two steps: ``reserve`` takes it (pinned, invisible to every reader),
the caller copies into it, then ``commit`` shows it, either ready or with the event of an
asynchronous copy still in flight (``Slot.ready``; readers ``transfer.wait_ready`` first,
and the slot stays pinned until ``settle``). A fill that fails is ``abort``ed: readers
never see a half-filled slot.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from kvgrid.store.tier import watermark_target
from kvgrid.store.transfer import host_copy


@dataclass(eq=False)  # identity: lists of slots are searched by the slot itself
class Slot:
    index: int
    created: float
    token_count: int
    parent_key: bytes | None
    pins: int = 0
    # lower tiers known to hold this block (written there, or promoted from there): a
    # write-back of a block already below G2 is then skipped without asking the tier
    below: set[str] = field(default_factory=set)
    # reuse prospects the engine gave it (sightings plus hint): ranks it for the write-down
    prospect: float = 0.0
    # waiting for the write-down: given up last, the worst prospects first
    queued_below: bool = False
    # FILLING until committed; then the event of a copy still landing, or None once ready
    ready: Any = None
    name: tuple[bytes, bytes] | None = None  # (tenant id, key)
    dead: bool = False  # unlisted while pinned: its index is freed by the last release
    rank: int = 1  # the eviction class it is listed in (HostPool.classes)
    used: int = 0  # HostPool.uses when it was added or last used


FILLING = object()


class HostPool:
    name = "G2"
    backend = "memory"

    def __init__(
        self,
        capacity: int,
        high: float = 0.95,
        low: float = 0.85,
        pin_memory: bool | None = None,
    ) -> None:
        self.capacity_bytes = int(capacity)
        self.high, self.low = high, low
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.pool: torch.Tensor | None = None
        self._views: list[torch.Tensor | None] = []  # per slot index: ``view``
        self.slot_bytes = 0
        self.num_slots = 0
        self.entries: OrderedDict[tuple[bytes, bytes], Slot] = OrderedDict()  # LRU first
        # the eviction classes, each LRU first: held below, plain, waiting for the write-down
        self.classes: tuple[OrderedDict, ...] = (OrderedDict(), OrderedDict(), OrderedDict())
        self.uses = 0  # blocks added or used so far: the clock of ``Slot.used``
        self.free: list[int] = []
        self.per_tenant: dict[bytes, int] = {}
        self.lock = threading.RLock()
        self.released = threading.Condition(self.lock)  # a slot's last pin went, or it was freed

    up = True  # in-process memory is never unreachable

    @property
    def capacity(self) -> int:
        return self.num_slots * self.slot_bytes

    def configure(self, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Allocate the slab for blocks of this shape (once). False if it cannot hold them."""
        with self.lock:
            if self.pool is not None:
                return tuple(self.pool.shape[1:]) == tuple(shape) and self.pool.dtype == dtype
            slot = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            n = self.capacity_bytes // slot if slot else 0
            if n == 0:
                return False
            self.pool = torch.empty((n, *shape), dtype=dtype, pin_memory=self.pin_memory)
            self._views = [None] * n
            self.slot_bytes, self.num_slots = slot, n
            self.free = list(range(n - 1, -1, -1))
            return True

    def view(self, index: int) -> torch.Tensor:
        """Slot ``index``'s block in the slab. Each slot is viewed once, at its first use:
        indexing the slab is a torch call (a GIL handoff on the engine's thread, per block
        at every hand-down), and viewing them all at the start would cost a large pool of
        small blocks seconds."""
        v = self._views[index]
        if v is None:
            v = self._views[index] = self.pool[index]
        return v

    def used(self, tid: bytes | None = None) -> int:
        with self.lock:
            n = len(self.entries) if tid is None else self.per_tenant.get(tid, 0)
            return n * self.slot_bytes

    def pinned_count(self) -> int:
        with self.lock:
            return sum(1 for s in self.entries.values() if s.pins)

    def _list(self, k: tuple[bytes, bytes], s: Slot) -> None:
        s.rank = 0 if s.below else 2 if s.queued_below else 1
        self.classes[s.rank][k] = s

    def _touch(self, k: tuple[bytes, bytes], s: Slot) -> None:
        self.uses += 1
        s.used = self.uses
        self.entries.move_to_end(k)
        self.classes[s.rank].move_to_end(k)

    def _unlist(self, k: tuple[bytes, bytes]) -> Slot:
        s = self.entries.pop(k)
        del self.classes[s.rank][k]
        self.per_tenant[k[0]] -= 1
        return s

    def _reclass(self, s: Slot, change) -> None:
        """Apply ``change`` to a slot's eviction state, moving it to its new class (last
        used there) if it is listed."""
        with self.lock:
            listed = not s.dead and self.entries.get(s.name) is s
            if listed:
                del self.classes[s.rank][s.name]
            change(s)
            if listed:
                self._list(s.name, s)

    def mark_below(self, slot: Slot, tier: str) -> None:
        """A lower tier holds the block now: it is evicted first."""
        self._reclass(slot, lambda s: s.below.add(tier))

    def mark_queued(self, slot: Slot, queued: bool) -> None:
        """The block waits for the write-down (given up last), or no longer does."""
        self._reclass(slot, lambda s: setattr(s, "queued_below", queued))

    def _drop(self, k: tuple[bytes, bytes]) -> None:
        self.free.append(self._unlist(k).index)

    def _evict(
        self, target_slots: int, tid: bytes | None, reason: str, out: list, spare: bool = False
    ) -> None:
        need = (len(self.entries) if tid is None else self.per_tenant.get(tid, 0)) - target_slots
        if need <= 0:
            return

        # what a lower tier also holds goes first unless what none holds is much older, each
        # least recently used first; then (unless spared) the write-down's worst candidates
        def evictable(entries):
            return ((k, s) for k, s in entries if not s.pins and tid in (None, k[0]))

        below, plain = evictable(self.classes[0].items()), evictable(self.classes[1].items())
        b, p = next(below, None), next(plain, None)
        victims: list[tuple[bytes, bytes]] = []
        stale = self.num_slots // 2  # uses: beyond this a block kept in G2 alone goes first
        while len(victims) < need and (b or p):
            if b is not None and (p is None or p[1].used + stale >= b[1].used):
                victims.append(b[0])
                b = next(below, None)
            else:
                victims.append(p[0])
                p = next(plain, None)
        if len(victims) < need and not spare:  # stable: LRU among equal prospects
            waiting = sorted(evictable(self.classes[2].items()), key=lambda e: e[1].prospect)
            victims += [k for k, _ in waiting[: need - len(victims)]]
        for k in victims:  # after the walks: a drop changes the dicts they walk
            self._drop(k)
            out.append((k[0], k[1], reason))

    def reserve(
        self,
        tid: bytes,
        key: bytes,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        parent_key: bytes | None,
        token_count: int,
        quota: int | None = None,
        created: float | None = None,
        wait_s: float = 0.0,
        spare_s: float = 0.0,
    ) -> tuple[Slot | None, bool, list]:
        """A pinned slot for a block of ``shape`` and ``dtype``: (slot, new, evicted). A new
        slot is for the caller to fill, then ``commit`` (or ``abort``); an existing one is
        ready to read once ``wait_ready``. (None, False, ...) while another fill of the key
        is under way; (None, True, ...) when there is no room, after waiting up to
        ``wait_s`` for a pinned slot to be let go. Blocks waiting for the write-down are
        spared for up to ``spare_s`` of that (a write finishing frees a block to evict)."""
        evicted: list = []
        start = time.monotonic()
        end = start + wait_s
        with self.lock:
            while True:
                spare = time.monotonic() - start < min(spare_s, wait_s)
                got = self._reserve(tid, key, shape, dtype, parent_key, token_count, quota,
                                    created, evicted, spare)  # fmt: skip
                left = end - time.monotonic()
                if got is not None or left <= 0:
                    break
                if spare:  # a write in flight may free a block: back-pressure, not a loss
                    left = min(left, start + spare_s - time.monotonic())
                self.released.wait(max(left, 0.0))  # every slot pinned (or spared)
        return got if got is not None else (None, True, evicted)

    def _reserve(
        self, tid, key, shape, dtype, parent_key, token_count, quota, created, evicted, spare
    ):
        """``reserve`` under the lock; None when every slot is pinned or spared (the caller
        may wait)."""
        if not self.configure(tuple(shape), dtype):
            return None, True, evicted
        k = (tid, key)
        s = self.entries.get(k)
        if s is not None:
            if s.ready is FILLING:
                return None, False, evicted
            self._touch(k, s)
            s.pins += 1
            return s, False, evicted
        if quota is not None:
            allowed = quota // self.slot_bytes
            if allowed < 1:
                return None, True, evicted
            self._evict(allowed - 1, tid, "quota", evicted)
            if self.per_tenant.get(tid, 0) >= allowed:
                return None, True, evicted
        used = len(self.entries) * self.slot_bytes
        target = watermark_target(self.capacity, self.high, self.low, used, self.slot_bytes)
        if target is not None:
            self._evict(target // self.slot_bytes, None, "capacity", evicted, spare=True)
            if not self.free and not spare:
                # of the write-down's candidates, a few: a scan per block would cost more
                # than the copy on a large G2, and each one given up is a lost write
                n = max(1, self.num_slots // 64)
                self._evict(len(self.entries) - n, None, "capacity", evicted)
        if not self.free:
            return None  # every slot pinned
        idx = self.free.pop()
        t = time.time() if created is None else created
        # pinned: nobody may take the slot while it is being filled
        self.uses += 1
        s = Slot(idx, t, token_count, parent_key, pins=1, ready=FILLING, name=k, used=self.uses)
        self.entries[k] = s
        self._list(k, s)
        self.per_tenant[tid] = self.per_tenant.get(tid, 0) + 1
        return s, True, evicted

    def fill(self, slot: Slot, block: torch.Tensor) -> None:
        """Copy ``block`` into a reserved slot and commit it (still pinned); a failed copy
        aborts the slot and raises."""
        try:
            host_copy(self.view(slot.index), block)
        except Exception:
            self.abort([slot])
            raise
        self.commit([slot])

    def commit(self, slots: list[Slot], event: Any = None) -> None:
        """Show filled slots to readers (still pinned by the fill). With ``event`` (an
        asynchronous copy in flight) readers wait on it, and the fill's pin is held until
        ``settle``, so the slot cannot be evicted and refilled under the copy."""
        with self.lock:
            for s in slots:
                s.ready = event

    def settle(self, slots: list[Slot]) -> None:
        """The copy of committed slots has landed: they are ready, and unpinned."""
        with self.lock:
            for s in slots:
                s.ready = None
                self._unpin(s)

    def abort(self, slots: list[Slot]) -> None:
        """Fills that failed (or copies that did): the entries go at once; each index is
        freed when its last pin (the fill's, readers') is released."""
        with self.lock:
            for s in slots:
                if not s.dead and self.entries.get(s.name) is s:
                    self._unlist(s.name)
                s.dead = True
                self._unpin(s)

    def retire(self, slots: list[Slot]) -> None:
        """Never hand these slots' indices out again (a copy into them may still be running
        on a device that can no longer tell): one pin that is never released."""
        with self.lock:
            for s in slots:
                s.pins += 1

    def _unpin(self, s: Slot) -> None:
        s.pins -= 1
        if s.pins == 0:
            if s.dead:
                self.free.append(s.index)
            self.released.notify_all()

    def _committed(self, k: tuple[bytes, bytes]) -> Slot | None:
        """The slot of a key, unless it is still being filled (under the lock)."""
        s = self.entries.get(k)
        return None if s is None or s.ready is FILLING else s

    def acquire(self, tid: bytes, key: bytes) -> tuple[Slot, torch.Tensor] | None:
        """Pin a slot for reading; the caller must ``release`` it."""
        with self.lock:
            s = self._committed((tid, key))
            if s is None:
                return None
            self._touch((tid, key), s)
            s.pins += 1
            return s, self.view(s.index)

    def acquire_run(self, tid: bytes, keys: list[bytes]) -> list[Slot]:
        """Pin the slots of the leading run of ``keys`` held here, under one lock (a long
        prefix is hundreds of blocks); the caller must ``release`` each."""
        out: list[Slot] = []
        with self.lock:
            for key in keys:
                s = self._committed((tid, key))
                if s is None:
                    break
                self._touch((tid, key), s)
                s.pins += 1
                out.append(s)
        return out

    def release(self, slot: Slot) -> None:
        with self.lock:
            self._unpin(slot)

    def release_run(self, slots: list[Slot]) -> None:
        """``release`` each of ``slots`` (an ``acquire_run``'s, say), under one lock."""
        with self.lock:
            for slot in slots:
                self._unpin(slot)

    def touch_many(self, tid: bytes, keys: list[bytes], prospects: list[float]) -> list[bool]:
        """Whether each key has a committed slot; those that do count as used now, their
        reuse prospect raised to at least ``prospects[i]`` (what ``reserve`` and ``release``
        of a held key do, under one lock for all)."""
        out = []
        with self.lock:
            for key, p in zip(keys, prospects):
                s = self._committed((tid, key))
                if s is not None:
                    self._touch((tid, key), s)
                    s.prospect = max(s.prospect, p)
                out.append(s is not None)
        return out

    def peek(self, tid: bytes, key: bytes) -> Slot | None:
        """The committed slot of a key (not pinned: for lookups, not for reading)."""
        with self.lock:
            return self._committed((tid, key))

    def peek_many(self, tid: bytes, keys: list[bytes]) -> list[Slot | None]:
        """``peek`` of each key, under one lock."""
        with self.lock:
            return [self._committed((tid, k)) for k in keys]

    def delete(self, tid: bytes, key: bytes) -> bool:
        with self.lock:
            s = self.entries.get((tid, key))
            if s is None or s.pins:
                return False
            self._drop((tid, key))
            return True

    def items(self) -> list[tuple[bytes, bytes, Slot]]:
        with self.lock:
            return [(t, k, s) for (t, k), s in self.entries.items()]

    def clear(self, tid: bytes | None = None) -> int:
        with self.lock:
            ks = [k for k, s in self.entries.items() if not s.pins and tid in (None, k[0])]
            for k in ks:
                self._drop(k)
            return len(ks)
