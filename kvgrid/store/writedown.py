"""WriteDown: what goes from G2 to the disk tiers (G3, G4), best reuse prospects first.

A disk writes slower than a busy GPU hands blocks down, so not everything may go. Every
block offered becomes a candidate ranked by its reuse prospects: its sightings, plus the
engine's hint that it belongs to a context that was already reused (a conversation's
history beats a one-off prompt); among equals, the one nearest its chain's head (a block is
worth something only with the blocks before it), then the one waiting longest. Writer
threads take the best candidate.

A candidate that G2 holds waits in G2 itself, unpinned and unbounded (G2's size bounds it):
the writers work through G2's backlog whenever the disk has bandwidth to spare, and G2
gives up first what a lower tier holds, then what is not waiting, and only then the
worst-ranked waiting candidate (after a bounded wait for a write to finish,
``HostPool.reserve``); a block being written is pinned. A candidate with a host copy of its
own (G2 did not take it) holds memory: at most ``max_in_flight`` of those wait or are
written; when they fill the bound (after waiting ``block_s`` for room) the worst one,
perhaps the newcomer, is skipped. Every skip is counted with its reason
(``kvgrid_store_writedown{tier, outcome}``) and noted in the block ledger.

A writer takes a batch of the best candidates (up to ``batch``, fewer while the queue is
short, so that all writers have work): each is encoded and staged in turn (a temp file,
not yet synced), then the tier commits the batch (sync, rename, one directory flush), so a
disk flushes once per batch, not once per object. Each writer encodes into a buffer of its
own (no fresh pages per object) and tells the codec what its tier writes per second
(measured on every batch), so a block is compressed only where that is faster than writing
the bytes it would save (``codec.pays``).

At shutdown ``settle`` takes what G2 holds that no lower tier has, ranks it, and writes as
much as each tier can hold (admission waived: a restarted engine finds it at once, without
a second sighting).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvgrid import keys as kvkeys
from kvgrid.events import BlockStored
from kvgrid.stats import ewma
from kvgrid.store.disk_tier import DiskTier
from kvgrid.store.fetch_procs import BATCH, FetchProcError
from kvgrid.store.host_pool import FILLING, Slot
from kvgrid.store.metrics import tenant_label
from kvgrid.store.object import encode_object, max_object_len
from kvgrid.store.tier import PutResult, Staged
from kvgrid.store.transfer import CopyEvent, wait_ready
from kvgrid.store.workqueue import WorkerThreads

if TYPE_CHECKING:
    from kvgrid.store.store import ContextStore

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: the queue removes a candidate by itself
class Candidate:
    tid: bytes
    key: bytes
    parent_key: bytes | None
    tenant: bytes
    token_count: int
    score: float  # reuse prospects: sightings plus the engine's hint
    targets: list  # the lower tiers it is admitted to
    src: torch.Tensor | None  # its G2 slot's bytes, or a host copy of its own
    slot: Slot | None = None  # its G2 slot, pinned while it is written
    copied: CopyEvent | None = None  # the device copy into ``src`` still landing
    depth: int = 0  # its place in its chain: a prefix is worth something only from its head
    seq: int = field(default=0)
    in_g2: bool = False  # waits in G2 (unpinned), not in a host copy of its own

    @property
    def rank(self) -> tuple[float, int, int]:
        """Higher is written sooner: prospects, then nearer its chain's head (a block is
        useful only with those before it), then the longest waiting (a closed loop of
        conversations wants back first what it handed down first)."""
        return (self.score, -self.depth, -self.seq)


class WriteDown(WorkerThreads):
    """The ranked write-down (the module's docstring); ``drain`` waits until every candidate
    has been written or skipped."""

    def __init__(
        self, store: ContextStore, max_in_flight: int, workers: int, block_s: float, batch: int
    ):
        self.store = store
        self.max_in_flight, self.block_s, self.batch = max_in_flight, block_s, max(1, batch)
        self.queued: list[Candidate] = []  # scanned linearly: G2's backlog at most
        self.waiting: dict[tuple[bytes, bytes], Candidate] = {}  # the ones G2 holds
        self.cv = threading.Condition()
        self.running = 0
        self.running_own = 0  # of those, candidates with a host copy of their own
        self.max_seen = 0
        self.dropped = self.done = self.failed = 0
        self.closed = False
        self._seq = 0
        self._local = threading.local()
        # bytes/s one writer puts into each tier (write, fsync, rename): the codec's yardstick
        self.write_rate: dict[str, float] = {}
        self.threads = [
            threading.Thread(target=self._run, name=f"kvgrid-store-write-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self.threads:
            t.start()

    @property
    def in_flight(self) -> int:
        return len(self.queued) + self.running

    def _held(self) -> int:
        """Candidates holding memory of their own: waiting with a host copy, or running."""
        return len(self.queued) - len(self.waiting) + self.running_own

    def offer(self, c: Candidate, wait_s: float | None = None) -> bool:
        """Queue ``c``; False if it was skipped (outranked, or the queue is closed). A
        candidate in G2 (``c.slot``, pinned by the caller) waits there unpinned, never
        skipped here. With a host copy of its own and the bound full, waits up to ``wait_s``
        (default ``block_s``) for room, then skips the worst-ranked such candidate
        (``Candidate.rank``), which may be ``c`` itself."""
        wait_s = self.block_s if wait_s is None else wait_s
        if c.slot is not None:
            return self._offer_in_g2(c)
        with self.cv:
            self._seq += 1
            c.seq = self._seq
            if wait_s > 0:
                end = time.monotonic() + wait_s
                while self._held() >= self.max_in_flight and not self.closed:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self.cv.wait(left)
            out = c if self.closed else None
            if out is None and self._held() >= self.max_in_flight:
                own = [q for q in self.queued if not q.in_g2]
                worst = min(own, key=lambda q: q.rank, default=None)
                out = c if worst is None or worst.rank >= c.rank else worst
                if out is worst:
                    self.queued.remove(worst)
            if out is not c:
                self._enqueue(c)
            if out is not None:
                self.dropped += 1
        if out is not None:
            self._skipped(out, "outranked")
        self.store.metrics.in_flight.set(self.in_flight)
        return out is not c

    def takes(self, score: float, depth: int) -> bool:
        """Whether a candidate with a host copy of its own would be queued now (room, or a
        worse-ranked one to skip for it): a block it would not take is not copied off the
        device only to be skipped."""
        with self.cv:
            if self.closed:
                return False
            if self._held() < self.max_in_flight:
                return True
            return any((q.score, -q.depth) < (score, -depth) for q in self.queued if not q.in_g2)

    def refuse(self, c: Candidate) -> None:
        """Skip a candidate ``takes`` turned away (counted as outranked)."""
        with self.cv:
            self.dropped += 1
        self._skipped(c, "outranked")

    def _offer_in_g2(self, c: Candidate) -> bool:
        g2, slot = self.store.g2, c.slot
        name = (c.tid, c.key)
        g2.mark_queued(slot, True)  # before it is queued: a writer's pick clears it
        with self.cv:
            if self.closed:
                self.dropped += 1
                skip = True
            else:
                skip = False
                self._seq += 1
                c.seq = self._seq
                had = self.waiting.get(name)
                if had is not None:  # offered again: one candidate, its best prospects
                    had.score = max(had.score, c.score)
                    had.targets += [t for t in c.targets if t not in had.targets]
                else:
                    c.in_g2, c.slot, c.src = True, None, None
                    self.waiting[name] = c
                    self._enqueue(c)
        if skip:
            g2.mark_queued(slot, False)
            self._skipped(c, "outranked")
            return False
        g2.release(slot)
        self.store.metrics.in_flight.set(self.in_flight)
        return True

    def _enqueue(self, c: Candidate) -> None:
        self.queued.append(c)
        self.max_seen = max(self.max_seen, self.in_flight)
        self.cv.notify()

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued for up to ``timeout_s``; what is left then is skipped
        (counted as ``shutdown``), and the writers stop."""
        self.drain(timeout_s)
        with self.cv:
            left, self.queued = self.queued, []
            self.waiting.clear()
            self.closed = True
            self.cv.notify_all()
        for c in left:
            self._skipped(c, "shutdown")
        for t in self.threads:
            t.join(timeout=1.0)

    def forget(self, tid: bytes, key: bytes) -> None:
        """G2 let go of a block before it was written: the worst-ranked of those waiting
        (G2 gives up the blocks below, and those not waiting, first)."""
        with self.cv:
            c = self.waiting.pop((tid, key), None)
            if c is None:
                return
            self.queued.remove(c)
            self.dropped += 1
            self.cv.notify_all()
        self._skipped(c, "outranked")

    def _skipped(self, c: Candidate, why: str) -> None:
        if c.slot is not None:
            self.store.g2.release(c.slot)
        m = self.store.metrics
        for t in c.targets:
            m.inc("writedown", tier=t.name, outcome=why)
            if why == "outranked":
                m.inc("writes_dropped", tier=t.name, reason="queue_full")
        self.store.ledger.skipped_below(c.key, why)

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.queued and not self.closed:
                    self.cv.wait()
                if not self.queued:
                    return
                # a batch shares its tier's flushes; a short queue is shared among writers
                n = min(self.batch, -(-len(self.queued) // len(self.threads)))
                batch = []
                for _ in range(n):
                    c = max(self.queued, key=lambda q: q.rank)
                    self.queued.remove(c)
                    if c.in_g2:
                        self.waiting.pop((c.tid, c.key), None)
                    batch.append(c)
                own = sum(not c.in_g2 for c in batch)
                self.running += len(batch)
                self.running_own += own
            try:
                self._write(batch)
                ok = True
            except Exception:
                log.exception("store write-down failed")
                ok = False
            with self.cv:
                self.running -= len(batch)
                self.running_own -= own
                self.done += ok * len(batch)
                self.failed += (not ok) * len(batch)
                self.cv.notify_all()

    def _write(self, batch: list[Candidate]) -> None:
        """Write a batch of candidates to their tiers (on a writer thread): each is encoded
        and staged at once (runs of them by a write process, where there are some), then
        each tier commits the batch (one flush of its directory)."""
        store = self.store
        staged: dict = {}  # tier -> [(candidate, Staged, seconds staging)]
        run: list[tuple[Candidate, list]] = []  # pinned, for a write process
        try:
            for c in batch:
                if c.in_g2:
                    got = store.g2.acquire(c.tid, c.key)
                    if got is None:  # G2 let it go between the pick and the pin
                        self._skipped(c, "outranked")
                        continue
                    c.slot, c.src = got
                    store.g2.mark_queued(c.slot, False)
                try:
                    todo = self._todo(c)
                    if todo and self._by_proc(c, todo):
                        run.append((c, todo))
                    elif todo:
                        self._stage(c, todo, staged)
                finally:  # its bytes are in the tier's hands now: G2 may let go of it
                    if not run or run[-1][0] is not c:
                        self._let_go(c)
                if len(run) == BATCH:
                    self._stage_run(run, staged)
                    run = []
            if run:
                self._stage_run(run, staged)
                run = []
        finally:  # what was staged is committed (or fails cleanly) whatever came after
            for c, _ in run:
                self._let_go(c)
            for t, items in staged.items():
                self._commit(t, items)

    def _let_go(self, c: Candidate) -> None:
        if c.slot is not None:
            self.store.g2.release(c.slot)
            c.slot = None

    def _todo(self, c: Candidate) -> list:
        """The tiers ``c`` is still to be written to (its bytes landed first)."""
        store = self.store
        targets = c.targets
        if c.slot is not None:
            wait_ready([c.slot])
            targets = [t for t in targets if t.name not in c.slot.below]
        elif c.copied is not None:
            c.copied.synchronize()
        todo = []
        for t in targets:
            with contextlib.suppress(OSError):
                if t.created_many(c.tid, [c.key])[0] is None:
                    todo.append(t)
                    continue
            store.metrics.inc("writedown", tier=t.name, outcome="already_below")
        for t in c.targets:
            if t not in targets:
                store.metrics.inc("writedown", tier=t.name, outcome="already_below")
        return todo

    def _by_proc(self, c: Candidate, todo: list) -> bool:
        """Whether a write process is to write ``c`` (only disk tiers take its files)."""
        procs = self.store.write_procs
        return (
            procs is not None
            and all(isinstance(t, DiskTier) for t in todo)
            and procs.fits(c.src.nbytes)
        )

    def _encoding(self, tiers) -> tuple:
        """How a block for ``tiers`` is encoded: the codec's settings, and the fastest of
        their measured write rates (None until each has one: ``codec.pays``)."""
        cfg = self.store.config
        rates = [self.write_rate.get(t.name) for t in tiers]
        rate = None if None in rates else max(rates)
        return (cfg.codec, cfg.compression_level, cfg.lossy_max_rel_error,
                cfg.model_fingerprint, kvkeys.KV_LAYOUT_VERSION, rate)  # fmt: skip

    def _stage(self, c: Candidate, todo: list, staged: dict) -> None:
        store = self.store
        codec, level, lossy, fingerprint, layout, rate = self._encoding(todo)
        blob = encode_object(c.src, c.key, c.parent_key, c.tenant, c.token_count,
                             store.keyring, codec, level, lossy, fingerprint, layout,
                             out=self._buffer(c.src.nbytes), write_bytes_per_s=rate)  # fmt: skip
        pol = store._policy(c.tid)
        for t in todo:
            t0 = time.perf_counter()
            try:  # the buffer is written out (or the put done) before the next encode
                st = t.stage(c.tid, c.key, blob, pol.quota_bytes.get(t.name))
            except OSError as e:
                log.warning("%s write failed: %s", t.name, e)
                st = Staged(c.tid, c.key, len(blob), PutResult(False, reason="error"))
            staged.setdefault(t, []).append((c, st, time.perf_counter() - t0))

    def _stage_run(self, run: list[tuple[Candidate, list]], staged: dict) -> None:
        """Encode and write a run of pinned candidates in a write process, each into a temp
        file per tier, then stage those (``DiskTier.adopt_many``); they are let go of once
        their bytes are in their files. A process that fails leaves the run to this
        thread (counted as ``errors{tier=write, op=write_process}``)."""
        store = self.store
        items = [
            (c.key, c.parent_key, c.tenant, c.token_count, [(t.tmp_path(), t.fsync) for t in todo])
            for c, todo in run
        ]
        tiers = {t for _, todo in run for t in todo}
        try:
            replies = store.write_procs.write_many(
                items, [c.src for c, _ in run], self._encoding(tiers)
            )
        except FetchProcError as e:
            store.failed("write", "write_process", e)
            for c, todo in run:
                try:
                    self._stage(c, todo, staged)
                finally:
                    self._let_go(c)
            return
        per_tier: dict = {}  # tier -> [(candidate, (tid, key, path, size, quota), error, s)]
        for (c, todo), item, (_, size, files) in zip(run, items, replies):
            self._let_go(c)
            quota = store._policy(c.tid).quota_bytes
            for t, (tmp, _), (err, dt) in zip(todo, item[4], files):
                w = (c.tid, c.key, tmp, size, quota.get(t.name))
                per_tier.setdefault(t, []).append((c, w, OSError(*err) if err else None, dt))
        for t, rows in per_tier.items():  # one ledger update per tier for the run
            adopted = t.adopt_many([r[1] for r in rows], [r[2] for r in rows])
            staged.setdefault(t, []).extend((r[0], st, r[3]) for r, st in zip(rows, adopted))

    def _commit(self, t, items: list) -> None:
        store = self.store
        t0 = time.perf_counter()
        try:
            results = t.commit([st for _, st, _ in items])
        except OSError as e:
            log.warning("%s write failed: %s", t.name, e)
            results = [PutResult(False, reason="error") for _ in items]
        spent = time.perf_counter() - t0 + sum(dt for _, _, dt in items)
        done = sum(st.size for (_, st, _), res in zip(items, results) if res.stored)
        if done:
            self.observe_write(t.name, done, spent)
        for (c, st, _), res in zip(items, results):
            store._removed(t.name, res.evicted)
            if res.stored:
                store.metrics.inc("bytes_in", st.size, tier=t.name, tenant=tenant_label(c.tid))
                store.metrics.inc("writedown", tier=t.name, outcome="written")
                store._emit(BlockStored((c.key,), c.parent_key, t.name, c.token_count))
                store.ledger.stored(c.key, t.name)
                slot = store.g2.peek(c.tid, c.key) if store.g2 is not None else None
                if slot is not None:
                    store.g2.mark_below(slot, t.name)
            else:
                reason = res.reason or "error"
                store.metrics.inc("writes_dropped", tier=t.name, reason=reason)
                store.metrics.inc("writedown", tier=t.name, outcome=reason)

    def _buffer(self, raw_len: int) -> bytearray:
        """This writer's object buffer: fresh pages per 8 MiB object cost more than its
        encryption."""
        buf = getattr(self._local, "buf", None)
        need = max_object_len(raw_len)
        if buf is None or len(buf) < need:
            buf = self._local.buf = bytearray(need)
        return buf

    def observe_write(self, tier: str, nbytes: int, seconds: float) -> None:
        """One writer put ``nbytes`` into ``tier`` in ``seconds`` (moving average)."""
        rate = nbytes / max(seconds, 1e-9)
        self.write_rate[tier] = ewma(self.write_rate.get(tier), rate, 0.2)

    def settle(self, timeout_s: float = 120.0) -> int:
        """At shutdown: G2's blocks that no lower tier holds go down, the best prospects
        first (then the most recently used), up to what each tier holds at its high
        watermark; the rest are counted as ``over_capacity``. Waits for the writes; returns
        how many blocks were offered."""
        store = self.store
        if store.g2 is None or not store.lower:
            return 0
        items = [(t, k, s) for t, k, s in store.g2.items() if s.ready is not FILLING]
        order = sorted(
            range(len(items)), key=lambda i: (items[i][2].prospect, i), reverse=True
        )  # items are in LRU order: a higher index is more recently used
        budget = {t.name: int(t.capacity * store.config.high_watermark) for t in store.lower}
        per_block = store.g2.slot_bytes + 512  # an object: the block (KV rarely shrinks), a header
        end = time.monotonic() + timeout_s
        offered = 0
        for i in order:
            tid, key, slot = items[i]
            targets = []
            for t in store.lower:
                if t.name in slot.below or not t.up:
                    continue
                if budget[t.name] < per_block:
                    store.metrics.inc("writedown", tier=t.name, outcome="over_capacity")
                    continue
                budget[t.name] -= per_block
                targets.append(t)
            tenant = store._known_tenants.get(tid)
            got = store.g2.acquire(tid, key) if targets and tenant is not None else None
            if got is None:
                continue
            c = Candidate(tid, key, slot.parent_key, tenant, slot.token_count, slot.prospect,
                          targets, got[1], got[0])  # fmt: skip
            if self.offer(c, wait_s=max(0.0, end - time.monotonic())):
                offered += 1
        self.drain(max(0.0, end - time.monotonic()))
        return offered
