"""StoreConnector: what the engine calls to use the context store below G1; the one module of
the store the engine uses (the store imports nothing from the engine).

Scheduler side (planning a step, on the engine's thread; bookkeeping, no data moves):
    lookup(keys, tenant, num_computed_blocks, busy)  how many stored blocks to take
    load_plan(tenant, n_blocks)                      how many of those to recompute, load the rest
    load_seconds_per_block(tenant)                   the predicted load time per loaded block
    account_admission(tenant, num_store_blocks)      the request took them: count lost hits
    note_admitted(keys)                              a sighting of each block (disk admission)
    plan_queue(queue, block_compute_s)               the waiting requests: prefetch their prefixes
    prefetch(keys, tenant)                           bring stored blocks up to G2 now

Worker side (moving blocks between the engine's KV cache and the store):
    will_load(keys, tenant)                          the disks start reading a load about to start
    load(keys, tenant, block_ids, deadline)          copy stored blocks into the cache, in order
    load_layered(keys, tenant, block_ids)            land G2 blocks layer by layer under a forward
    observe_load_start(seconds)                      how late a split's load started
    save(keys, parent_keys, tenant, block_ids, ...)  hand blocks down from the cache to G2 and below
    writers_fence() / fence_writes(block_ids)        the engine orders each forward after the
                                                     write-backs of the blocks it overwrites

Both: ``drain_events`` (tier changes as KV events for the router), ``stats``, ``close``.

The engine's KV cache is one tensor ``[num_blocks, num_layers, 2, block_size, kvh, hd]``;
block ``i`` is ``kv_cache[i]``, contiguous, and is what the store keeps as one object.

``lookup`` decides load versus recompute from measured numbers: each tier's load bandwidth
(EWMA of observed loads and prefetches, from a probe at start: a copy for G2, a cold read of
a few objects for the disk tiers, ``probe.py``) and
the engine's measured prefill speed (``prefill_tokens_per_s``, set by the engine). A stored
prefix is used as a split (``load_plan.plan_blocks``: recompute its first blocks while the
later ones load), so even a tier slower than recomputing pays; ``lookup`` offers the prefix
length whose predicted time to first token is lowest, and none where using it is not
predicted faster than recomputing (times ``max_load_ratio``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch

from kvgrid.events import KVEvent
from kvgrid.stats import ewma
from kvgrid.store.landing import LayerLanding, land_layers
from kvgrid.store.load_plan import LoadDeadline, LoadPlan, plan_blocks
from kvgrid.store.probe import probe_tier
from kvgrid.store.store import ContextStore
from kvgrid.store.write import HELD

log = logging.getLogger(__name__)
_PER_OP_S = {"G2": 0.0, "G3": 2e-4, "G4": 5e-4}  # fixed cost per block (syscalls, round trips)
LOAD_START_HALF_LIFE_S = 1.0  # see StoreConnector.load_start_delay


class EngineThreadTime:
    """Seconds the engine's thread spends in the store, per call kind (save: write-back;
    lookup: admission; load_submit; prefetch; note_admitted), and calls of each: what the
    store costs the thread that also launches every forward. Two clock reads a call."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: defaultdict[str, int] = defaultdict(int)

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] += seconds
        self.calls[kind] += 1

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {k: {"s": self.seconds[k], "calls": self.calls[k]} for k in sorted(self.seconds)}


def _engine_timed(kind: str):
    def wrap(fn):
        @functools.wraps(fn)
        def timed(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(self, *a, **kw)
            finally:
                self.engine_time.add(kind, time.perf_counter() - t0)

        return timed

    return wrap


class BlockViews(Sequence):
    """``kv_cache[block_ids[i]]`` for each ``i``, made on first use. Most hand-downs of a
    store with a disk tier find every block already stored below and need no view of it;
    each view is a torch call that gives up the GIL on the engine's thread."""

    def __init__(self, kv_cache: torch.Tensor, block_ids: list[int]) -> None:
        self.kv_cache, self.block_ids = kv_cache, block_ids
        self._made: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.block_ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        t = self._made.get(i)
        if t is None:
            t = self._made[i] = self.kv_cache[self.block_ids[i]]
        return t


class StoreConnector:
    def __init__(
        self,
        store: ContextStore,
        kv_cache: torch.Tensor,
        block_size: int,
        prefill_tokens_per_s: float | None = None,
    ) -> None:
        if kv_cache.dim() < 2 or kv_cache.shape[0] < 1:
            raise ValueError(f"kv_cache must be [num_blocks, ...], got {tuple(kv_cache.shape)}")
        if not kv_cache[0].is_contiguous():
            raise ValueError("each kv_cache block must be contiguous (block-major layout)")
        self.store = store
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.prefill_tokens_per_s = prefill_tokens_per_s
        # how late a split's load starts after it is planned (EWMA; KVLoader waits for the
        # launch of the step that computes the first part): its load side is that much longer
        self.load_start_s = 0.0
        self._load_start_at = 0.0  # time.monotonic() of its last observation
        self.block_bytes = kv_cache[0].nbytes
        store.configure_blocks(tuple(kv_cache.shape[1:]), kv_cache.dtype)
        self._seed = dict(store.config.seed_bytes_per_s)
        # measured at start (probe.py), then by every load and prefetch
        self.probed: dict[str, float] = {}
        if store.g2 is not None:
            self.probed["G2"] = self._probe_g2()
        if store.config.probe_tiers:
            for t in store.lower:
                bw = probe_tier(store, t, store.config.load_workers)
                if bw:
                    self.probed[t.name] = bw
        self._seed.update(self.probed)
        for tier, bw in self.probed.items():  # the first figure loads and prefetches refine
            store.bandwidth.setdefault(tier, bw)
        self._last_plan: dict = {}  # tenant -> the LoadPlan of its last lookup
        self._last_rest: dict = {}  # tenant -> (keys, tiers) its last lookup looked at
        self._lock = threading.Lock()
        self.loaded_blocks = 0
        self.saved_blocks = 0
        self.saved_bytes = 0
        self.engine_time = EngineThreadTime()
        self.writers_fenced = False  # the engine fences each forward's blocks (writers_fence)
        # StoreConfig.write_through, resolved once an engine attaches the store
        self.write_through = store.config.write_through

    def _probe_g2(self) -> float:
        """Speed of bringing G2 blocks into the cache (scratch blocks, not the engine's),
        through the path loads take: layer by layer where loads land that way, which on a
        GPU also compiles the landing kernel now rather than at the first load, mid-step."""
        n = 2
        cache = self.kv_cache
        pinned = self.store.g2.pin_memory
        src = torch.zeros((n, *cache.shape[1:]), dtype=cache.dtype, pin_memory=pinned)
        dst = torch.empty_like(src, device=cache.device)
        layered = pinned or not dst.is_cuda
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            if layered:
                land_layers(src, list(range(n)), dst, list(range(n))).synchronize()
            else:
                dst.copy_(src, non_blocking=dst.is_cuda)
                if dst.is_cuda:
                    torch.cuda.synchronize(dst.device)
            best = min(best, time.perf_counter() - t0)
        return n * self.block_bytes / max(best, 1e-9)

    @property
    def tier_bytes_per_s(self) -> dict[str, float]:
        """Load bandwidth per tier (measured where loads happened, else the seed)."""
        out = {t.name: self._seed.get(t.name, 1e8) for t in self.store._tiers()}
        out.update(self.store.bandwidth)
        return out

    def block_load_seconds(self, tier: str) -> float:
        measured = self.store.bandwidth.get(tier)
        if measured:  # measured over whole loads: per-block costs are already in it
            return self.block_bytes / measured
        bw = self._seed.get(tier) or 1e8
        return self.block_bytes / bw + _PER_OP_S.get(tier, 0.0)

    # ---- the engine's calls -------------------------------------------------------------

    @_engine_timed("lookup")
    def lookup(
        self,
        keys: list[bytes],
        tenant: bytes,
        num_computed_blocks: int,
        busy: bool = False,
        slack_s: float = 0.0,
    ) -> int:
        """How many of ``keys[num_computed_blocks:]`` (leading, consecutive) to take from the
        store; ``load_plan`` then says how many of those to recompute while the rest load.
        ``busy``: other requests wait for the GPU: load as much as keeps this request no
        slower than recomputing (``plan_blocks``); otherwise its first token as soon as can
        be. ``slack_s``: the request waits this long anyway before it can compute (parked
        while the batch is full): a load that lands within it costs it nothing, so a tier
        slower than recomputing pays too."""
        rest = keys[num_computed_blocks:]
        with self._lock:
            self._last_rest[tenant] = (rest, [None] * len(rest))
        if not rest:
            return 0
        try:
            tiers = self.store.contains(rest, tenant, leading=False)
        except Exception as e:  # a store problem is a miss, never the engine's problem
            self.store.failed("store", "lookup", repr(e))
            return 0
        with self._lock:
            self._last_rest[tenant] = (rest, tiers)
        stored = next((i for i, t in enumerate(tiers) if t is None), len(tiers))
        if not stored:
            return 0
        per_tier = {t: self.block_load_seconds(t) for t in set(tiers[:stored])}
        load = [per_tier[t] for t in tiers[:stored]]
        speed = self.prefill_tokens_per_s
        if not speed:  # prefill speed not measured yet: load what is there, no deadline
            n, plan = stored, LoadPlan(0, stored, sum(load), None)
        else:
            # Candidates end where the tier changes (within a run the per-block cost is flat,
            # so the best cut is at a run's end); stored blocks past the cut are recomputed
            # after the load, like the rest of the prompt.
            recompute = self.block_size / speed
            ratio = self.store.config.max_load_ratio
            n, plan, best = 0, None, None
            for m in range(1, stored + 1):
                if m < stored and tiers[m] == tiers[m - 1]:
                    continue
                cand = plan_blocks(
                    load[:m],
                    self.block_size,
                    speed,
                    start_s=self.load_start_delay() - slack_s,
                    busy=busy,
                )
                ttft = cand.expected_s + (stored - m) * recompute
                if cand.expected_s >= ratio * m * recompute or ttft >= stored * recompute:
                    continue
                # busy: the most blocks loaded among the plans no slower than recomputing
                rank = (-cand.load_blocks, ttft) if busy else (ttft, 0)
                if best is None or rank < best:
                    n, plan, best = m, cand, rank
        with self._lock:
            self._last_plan[tenant] = plan
        return n

    def resolve_write_through(self, g1_blocks: int) -> bool:
        """Whether blocks are written through (``StoreConfig.write_through``); auto: where
        G2 holds at least what G1 (``g1_blocks`` it can cache) does. A smaller G2 gives up
        written-through blocks long before G1 evicts them."""
        wt = self.store.config.write_through
        if wt is None:
            g2 = self.store.g2
            wt = g2 is not None and g2.capacity_bytes >= g1_blocks * self.block_bytes
        self.write_through = wt
        return wt

    def observe_load_start(self, seconds: float) -> None:
        """A split's load started ``seconds`` after it was submitted (called by the loader)."""
        self.load_start_s = ewma(self.load_start_delay(), seconds, 0.5)
        self._load_start_at = time.monotonic()

    def load_start_delay(self) -> float:
        """The expected start delay of a split's load: the last figures, fading (half-life
        ``LOAD_START_HALF_LIFE_S``) while no split runs. A delay is the step in flight at
        the time (a burst of long prefills makes it long); held for good, it would make
        every later plan recompute, and with no split left to measure it never heals."""
        age = time.monotonic() - self._load_start_at
        return self.load_start_s * 0.5 ** (age / LOAD_START_HALF_LIFE_S)

    @_engine_timed("note_admitted")
    def note_admitted(self, keys: list[bytes]) -> None:
        """A request that wants these blocks was admitted: one sighting each, G1 hits
        included (a block hot in G1 is exactly the one worth keeping on disk)."""
        try:
            self.store.note_seen(keys)
        except Exception:  # a store problem is never the engine's problem
            log.exception("context store: counting sightings failed")

    def account_admission(self, tenant: bytes, num_store_blocks: int) -> None:
        """The request of the last ``lookup`` was admitted taking the ``num_store_blocks``
        it offered: the blocks after those that were once stored are lost hits, counted by
        reason (``BlockLedger.account_misses``)."""
        with self._lock:
            rest, tiers = self._last_rest.pop(tenant, ((), ()))
        try:
            self.store.ledger.account_misses(
                list(rest[num_store_blocks:]), list(tiers[num_store_blocks:])
            )
        except Exception:
            log.exception("context store: counting lost hits failed")

    def load_plan(self, tenant: bytes, n_blocks: int):
        """The split ``lookup`` chose for the ``n_blocks`` it offered (a ``LoadPlan``)."""
        with self._lock:
            plan = self._last_plan.get(tenant)
        if plan is None or plan.compute_blocks + plan.load_blocks != n_blocks:
            return LoadPlan(0, n_blocks)
        return plan

    def load_seconds_per_block(self, tenant: bytes) -> float | None:
        """Estimated load time per loaded block of the prefix the last ``lookup`` offered."""
        with self._lock:
            plan = self._last_plan.get(tenant)
        if plan is None or not plan.load_blocks or plan.load_s is None:
            return None
        return plan.load_s / plan.load_blocks

    def will_load(self, keys: list[bytes], tenant: bytes) -> None:
        """Let the disk tiers start reading a load that will start shortly."""
        try:
            self.store.will_load(keys, tenant)
        except Exception:  # only a hint
            log.exception("context store: readahead hint failed")

    def load(
        self,
        keys: list[bytes],
        tenant: bytes,
        block_ids: list[int],
        deadline: float | LoadDeadline | None = None,
    ) -> int:
        """Copy stored blocks into ``kv_cache[block_ids[i]]``; how many leading blocks landed
        (by ``deadline``, a time.monotonic() or a ``LoadDeadline``, if given)."""
        if len(keys) != len(block_ids):
            raise ValueError(f"{len(keys)} keys for {len(block_ids)} block ids")
        try:
            dsts = [self.kv_cache[b] for b in block_ids]
            served = self.store.load_into(keys, tenant, dsts, deadline)
        except Exception as e:  # recomputed instead; counted and logged, never silent
            self.store.failed("store", "load", repr(e))
            return 0
        self.loaded_blocks += len(served)
        return len(served)

    def load_layered(
        self, keys: list[bytes], tenant: bytes, block_ids: list[int]
    ) -> LayerLanding | None:
        """Start landing stored blocks in ``kv_cache[block_ids]`` layer by layer when all of
        them are in G2 (None otherwise, nothing started): the forward waits per layer."""
        if len(keys) != len(block_ids):
            raise ValueError(f"{len(keys)} keys for {len(block_ids)} block ids")
        try:
            landing = self.store.load_layered(keys, tenant, self.kv_cache, block_ids)
        except Exception:
            log.exception("context store: layered load failed; loading block by block")
            return None
        if landing is not None:
            self.loaded_blocks += len(keys)
        return landing

    def fence_writes(self, block_ids: Iterable[int]) -> None:
        """The engine is about to overwrite ``kv_cache[block_ids]`` (the blocks its next
        forward writes): its current stream waits for the write-backs still reading them.
        An engine that calls this before every forward turns on ``writers_fence``: then
        write-backs run beside its other work instead of holding up its next step."""
        copier = self.store.copier
        if copier is None or not self.kv_cache.is_cuda or copier.idle(self.kv_cache.device):
            return
        base, step = self.kv_cache.data_ptr(), self.block_bytes
        copier.fence(self.kv_cache.device, [base + b * step for b in block_ids])

    def writers_fence(self) -> bool:
        """Let write-backs stop ordering the engine's stream after them: the engine calls
        ``fence_writes`` before each forward from now on (``writers_fenced``). Whether it
        applies (a GPU cache with a copier)."""
        copier = self.store.copier
        if copier is None or not self.kv_cache.is_cuda:
            return False
        copier.writers_fence = self.writers_fenced = True
        return True

    @_engine_timed("save")
    def save(
        self,
        keys: list[bytes],
        parent_keys: list[bytes | None],
        tenant: bytes,
        block_ids: list[int],
        hints: list[float] | None = None,
        settle: bool = False,
        positions: list[int] | None = None,
        through: bool = False,
    ) -> list[bool]:
        """Hand blocks down from G1; per block, whether the store now holds it (in G2, or
        already below). On a GPU the copies are only issued: the current stream waits for
        them on the device, so whatever it runs next (a forward, a load into the same
        blocks) comes after they have been read, and the host does not wait. ``hints``,
        ``positions``: reuse prospects and chain positions per block (``put_blocks``);
        ``settle``: at shutdown; ``through``: written through, the blocks stay in G1 (no
        waiting for G2 room: their eviction hands them down again)."""
        if not (len(keys) == len(parent_keys) == len(block_ids)):
            raise ValueError("save() needs as many keys, parent keys and block ids")
        blocks = BlockViews(self.kv_cache, block_ids)
        # the engine waits for G2 room no longer than recomputing these blocks would take:
        # a longer wait costs the GPU more than losing them
        speed = self.prefill_tokens_per_s
        max_wait = None if settle or not speed else len(keys) * self.block_size / speed
        try:
            out = self.store.put_blocks(
                keys,
                parent_keys,
                tenant,
                blocks,
                self.block_size,
                hints,
                settle,
                positions,
                through=through,
                max_wait_s=max_wait,
            )
        except Exception:
            log.exception("store write-back failed")
            return [False] * len(keys)
        n = sum(o not in ("copy_failed", "error") for o in out)
        self.saved_blocks += n
        self.saved_bytes += n * self.block_bytes
        return [o in HELD for o in out]

    @_engine_timed("prefetch")
    def prefetch(self, keys: list[bytes], tenant: bytes) -> bool:
        """Start bringing stored blocks up to G2 (e.g. when a request is queued)."""
        return self.store.prefetch(keys, tenant)

    @_engine_timed("prefetch")
    def plan_queue(self, queue: list, block_compute_s: float | None) -> None:
        """The engine's waiting requests (``prefetch.Queued``, in order) and the GPU's time
        per block: the store plans their prefixes' way up (``PrefetchPlanner``)."""
        if self.store.prefetcher is not None:
            self.store.prefetcher.publish(queue, block_compute_s)

    def drain_events(self) -> list[KVEvent]:
        return self.store.drain_events()

    def stats(self) -> dict:
        out = self.store.stats()
        out["tier_bytes_per_s"] = self.tier_bytes_per_s
        out["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        out["loaded_blocks"] = self.loaded_blocks
        out["saved_blocks"] = self.saved_blocks
        out["saved_bytes"] = self.saved_bytes
        out["engine_thread"] = self.engine_time.snapshot()
        return out

    def close(self) -> None:
        self.store.close()
