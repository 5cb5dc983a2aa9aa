"""The load path of ``ContextStore``: stored blocks copied into the engine's cache (block by
block, or layer by layer from G2), with the blocks below G2 fetched a window ahead on the fetch
threads and the disk told to read ahead; prefetches into G2."""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

import torch

from kvgrid.store.disk_tier import DiskTier
from kvgrid.store.host_pool import Slot
from kvgrid.store.landing import LayerLanding, land_layers
from kvgrid.store.load_plan import LoadDeadline
from kvgrid.store.metrics import tenant_label
from kvgrid.store.object import cached_tenant_id
from kvgrid.store.transfer import copy_run, wait_ready

if TYPE_CHECKING:
    from kvgrid.store.store import ContextStore

log = logging.getLogger(__name__)


class LoadPath:
    """Loads and prefetches of ``ContextStore`` (mixed into it, ``store.py``)."""

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
        tid = cached_tenant_id(tenant)
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

        batch = self._run_size()  # runs of blocks to a fetch process in one request

        def refill() -> None:
            # keep the window full, in key order (the copies consume in key order)
            while missing and len(futs) + min(batch, len(missing)) <= self._window:
                run = [missing.popleft() for _ in range(min(batch, len(missing)))]
                if len(run) == 1:
                    i = run[0]
                    futs[i] = self._fetchers.submit(self._fetch_lower, tid, keys[i], tenant)
                    continue
                fs = [Future() for _ in run]
                self._fetchers.submit(self._fetch_run, tid, [keys[i] for i in run], tenant, fs)
                futs.update(zip(run, fs))
            ahead.hint(len(ahead.keys) - len(missing))

        served: list[str] = []
        nbytes: dict[str, int] = {}
        absent = 0  # G2 misses, counted once for the load (a metric's lock per block adds up)
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
                    absent += self.g2 is not None
                    try:
                        r = ctl.wait(futs[i])
                        del futs[i]
                    except FutureTimeout:
                        # not ready in time: recomputing the rest now beats waiting longer
                        r = None
                        ctl.stopped = "deadline"
                        lower = self.lower[0].name if self.lower else "G2"
                        self.metrics.inc("misses", tier=lower, tenant=tl, reason="deadline")
                    if r is None:
                        ctl.stopped = ctl.stopped or "missing"
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
            if absent:
                self.metrics.inc("misses", absent, tier="G2", tenant=tl, reason="absent")
        self._account_load(tl, served.count("G2"), nbytes, time.perf_counter() - t_start, n)
        return served

    def _drop_fetch(self, fut: Future) -> None:
        """Let go of a fetch nobody will use (a load that stopped early)."""
        if fut.cancel():
            return

        def release(f: Future) -> None:
            r = None if f.cancelled() or f.exception() is not None else f.result()
            if r is not None and r[1] is not None:
                self.g2.release(r[1])

        fut.add_done_callback(release)

    def will_load(self, keys: list[bytes], tenant: bytes) -> None:
        """A load of these blocks is about to start: the disk tiers start reading the first
        of those below G2 now (kernel readahead, from the hint thread: no GIL-bound work),
        while the load itself waits for the engine to launch a step (``kv_loader``)."""
        tid = cached_tenant_id(tenant)
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
        tid = cached_tenant_id(tenant)
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

    def prefetch(self, keys: list[bytes], tenant: bytes) -> bool:
        """Bring the leading stored blocks up into G2 in the background. False if dropped."""
        if self.g2 is None:
            return False
        tid = cached_tenant_id(tenant)

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


# blocks a readahead hint gathers: a hint per block woke the hint thread for each (GIL
# handoffs that the engine's thread pays for), for a window that moved by one block
HINT_BATCH = 4


class ReadAhead:
    """Readahead for one load below G2: the tiers are told about the next ``window`` blocks
    beyond those handed to the fetch threads, so a disk keeps reading while those threads
    verify, decrypt and decode (each thread alone leaves the disk idle meanwhile: cold zstd
    loads reached 77% of a plain read of the same files with as many threads)."""

    def __init__(self, store: ContextStore, tid: bytes, keys: list[bytes]) -> None:
        self.store, self.tid, self.keys = store, tid, keys
        self._hinted = 0
        # blocks a hint gathers: the readahead stays at least 3/4 of a window ahead of the
        # fetch threads
        self._gather = max(1, min(HINT_BATCH, store._window // 4))

    def hint(self, submitted: int) -> None:
        """``submitted``: how many of ``keys`` (in order) the fetch threads have been given."""
        upto = min(len(self.keys), submitted + self.store._window)
        if upto <= self._hinted or (upto < len(self.keys) and upto - self._hinted < self._gather):
            return
        batch, self._hinted = self.keys[self._hinted : upto], upto
        procs = self.store._procs
        for tier in self.store.lower:
            if not tier.up:
                continue
            # through the readahead process, there is no thread to wake here
            if not (
                procs is not None
                and isinstance(tier, DiskTier)
                and procs.hint(tier.paths(self.tid, batch))
            ):
                self.store._hints.submit(tier.will_need, self.tid, batch)
