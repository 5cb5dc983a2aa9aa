"""Scheduler: continuous batching under a token budget, with chunked prefill and preemption.

Each step spends at most `max_num_batched_tokens` new tokens. Running requests come first,
decodes before prefill chunks, so inter-token latency stays steady while long prompts are
cut into chunks; waiting requests are then admitted first-come first-served while free
blocks allow. When a running request needs a block and none is free, the most recently
admitted request is preempted: its blocks are released (full ones stay in the prefix cache)
and it is recomputed later, usually from those cached blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvgrid.engine.block_manager import BlockManager
from kvgrid.engine.config import EngineConfig
from kvgrid.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from kvgrid.store.connector import StoreConnector


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
        self.bm.free_seq(seq)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # decodes first, then unfinished prefills, in admission order
        order = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        for seq in order:
            if seq.status != SequenceStatus.RUNNING or budget == 0:
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
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

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            bs = self.bm.block_size
            # the last token is always computed: its logits choose the next token
            hit_keys = seq.block_keys((seq.num_tokens - 1) // bs)
            g1_hits = self.bm.match_prefix(hit_keys)
            n_store = 0
            if self.connector is not None and self.bm.enable_prefix_caching:
                n_store = self.connector.lookup(hit_keys, seq.tenant, len(g1_hits))
            cached_blocks = len(g1_hits) + n_store
            n = min(seq.num_tokens - cached_blocks * bs, budget)
            new_blocks = self.bm.blocks_needed(cached_blocks * bs + n) - len(g1_hits)
            if new_blocks > self.bm.num_free_blocks - self.bm.num_revived(g1_hits):
                break  # head-of-line: admit in arrival order only
            self.waiting.popleft()
            self.bm.take_cached(seq, g1_hits)
            fresh = self.bm.allocate(seq, new_blocks)
            loaded = 0
            if n_store:
                self._flush_evictions()  # the store reads evicted blocks before we overwrite them
                keys = hit_keys[len(g1_hits) : cached_blocks]
                loaded = self.connector.load(keys, seq.tenant, fresh[:n_store])
                self.store_loaded_tokens += loaded * bs
            computed = (len(g1_hits) + loaded) * bs
            self.bm.commit_full_blocks(seq, hit_keys[: len(g1_hits) + loaded])
            seq.num_computed_tokens = computed
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = min(computed, seq.num_prompt_tokens)
            n = min(seq.num_tokens - computed, budget)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return budget

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
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
