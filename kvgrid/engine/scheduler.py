"""Scheduler: continuous batching under a token budget, with chunked prefill and preemption.

Each step spends at most `max_num_batched_tokens` new tokens. Running requests come first,
decodes before prefill chunks, so inter-token latency stays steady while long prompts are
cut into chunks; waiting requests are then admitted first-come first-served while free
blocks allow. When a running request needs a block and none is free, the most recently
admitted request is preempted: its blocks are released (full ones stay in the prefix cache)
and it is recomputed later, usually from those cached blocks.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvgrid.engine.block_manager import BlockManager
from kvgrid.engine.config import EngineConfig
from kvgrid.engine.kv_loader import KVLoader, plan_split
from kvgrid.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from kvgrid.store.connector import StoreConnector

log = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed for it this step


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        connector: StoreConnector | None = None,
    ):
        self.config = config
        self.bm = block_manager
        self.connector = connector
        self.loader: KVLoader | None = None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.store_loaded_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # decodes first, then unfinished prefills, in admission order
        order = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        for seq in order:
            if seq.status != SequenceStatus.RUNNING or budget == 0:
                continue
            if seq.load_future is not None:
                self._try_finish_load(seq)
            n = min(self._compute_limit(seq) - seq.num_computed_tokens, budget)
            if n <= 0:
                continue  # waiting for its blocks to arrive from the store
            while not self.bm.ensure_slots(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        if not out.preempted:
            budget = self._admit(out, budget)
        self._flush_evictions()
        return out

    @staticmethod
    def _compute_limit(seq: Sequence) -> int:
        """Tokens that may be computed now: up to a pending load's first block, else all."""
        if seq.load_future is not None:
            return seq.load_start_block * seq.block_size
        return seq.num_tokens

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        bs = self.bm.block_size
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # the last token is always computed: its logits choose the next token
            hit_keys = seq.block_keys((seq.num_tokens - 1) // bs)
            g1_hits = self.bm.match_prefix(hit_keys)
            g = len(g1_hits)
            n_store = 0
            if self.loader is not None and self.bm.enable_prefix_caching:
                n_store = self.connector.lookup(hit_keys, seq.tenant, g)
            n = min(seq.num_tokens - (g + n_store) * bs, budget)
            new_blocks = self.bm.blocks_needed((g + n_store) * bs + n) - g
            if new_blocks > self.bm.num_free_blocks - self.bm.num_revived(g1_hits):
                break  # head-of-line: admit in arrival order only
            self.waiting.popleft()
            self.bm.take_cached(seq, g1_hits)
            fresh = self.bm.allocate(seq, new_blocks)
            seq.num_computed_tokens = g * bs
            if n_store:
                self._start_load(seq, hit_keys, g, n_store, fresh)
            elif seq.num_cached_tokens is None:
                seq.num_cached_tokens = min(g * bs, seq.num_prompt_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(self._compute_limit(seq) - seq.num_computed_tokens, budget)
            if n > 0:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        return budget

    # ---- loads from the context store -----------------------------------------------------

    def _start_load(self, seq: Sequence, hit_keys, g: int, n_store: int, fresh: list[int]):
        plan = plan_split(
            n_store,
            self.bm.block_size,
            self.connector.prefill_tokens_per_s,
            self.connector.load_seconds_per_block(seq.tenant),
        )
        self._flush_evictions()  # the store reads evicted blocks before the load overwrites them
        first = g + plan.compute_blocks
        seq.load_start_block, seq.load_count = first, plan.load_blocks
        seq.load_future = self.loader.submit(
            hit_keys[first : g + n_store], seq.tenant, fresh[plan.compute_blocks : n_store]
        )
        seq.num_cached_tokens_g1 = g * self.bm.block_size

    def _try_finish_load(self, seq: Sequence) -> None:
        # the recomputed part must be done, and the loaded part landed
        if seq.num_computed_tokens < self._compute_limit(seq) or not seq.load_future.done():
            return
        try:
            loaded = seq.load_future.result()
        except Exception:
            log.exception("loading %d blocks from the store failed", seq.load_count)
            loaded = 0
        seq.load_future = None
        if seq.status != SequenceStatus.RUNNING:
            return
        bs = self.bm.block_size
        seq.num_computed_tokens = (seq.load_start_block + loaded) * bs
        self.bm.commit_full_blocks(seq, seq.block_keys(seq.load_start_block + loaded))
        self.store_loaded_tokens += loaded * bs
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = min(
                seq.num_cached_tokens_g1 + loaded * bs, seq.num_prompt_tokens
            )

    def _release(self, seq: Sequence) -> None:
        if seq.load_future is not None:
            # a load still writing into these blocks must land before they are handed out
            seq.load_future.cancel() or seq.load_future.exception()
            seq.load_future = None
        self.bm.free_seq(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]

    def _flush_evictions(self) -> None:
        evicted = self.bm.take_evictions()
        if not evicted or self.connector is None:
            return
        by_tenant: dict[bytes, list] = {}
        for e in evicted:
            by_tenant.setdefault(e.tenant, []).append(e)
        for tenant, blocks in by_tenant.items():
            self.connector.save(
                [b.key for b in blocks],
                [b.parent_key for b in blocks],
                tenant,
                [b.block_id for b in blocks],
            )
