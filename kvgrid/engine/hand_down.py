"""What the scheduler hands down to the context store (mixed into ``Scheduler``): blocks G1
evicts, blocks written through as prefill names them, the blocks the next step may evict
(cleaned a step ahead), a preempted request's computed blocks, and at shutdown all of G1."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvgrid.engine.scheduler import SchedulerOutput
    from kvgrid.engine.sequence import Sequence


class HandDown:
    """Hand-downs of ``Scheduler`` (its block manager ``bm``, ``connector``, ``running``,
    ``waiting``; ``_ahead``: block id -> the name it was cleaned ahead under)."""

    def _keep_below(self, seq: Sequence) -> None:
        """A request is preempted: what it has computed is kept. Its full blocks are named
        now (with asynchronous scheduling the last step's are not yet) and handed to the
        store, so they are safe below G1 and G1 gives them up first, before other requests'
        blocks that nothing else holds. A request whose prefix is still landing from the
        store keeps only what the engine named already."""
        if seq.load_future is None and seq.kv_landing is None and self.bm.enable_prefix_caching:
            full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.bm.block_size
            self.bm.commit_full_blocks(seq, seq.block_keys(full))
        if self.connector is not None:
            self._save(self.bm.named_blocks(seq))

    def offload_cached(self) -> int:
        """Write every cached G1 block to the store, then what G2 holds to the disk tiers
        within their capacity (at shutdown: G1 and G2 die with the process, the disk tiers
        do not; disk admission is waived so a restart finds it all). Returns how many G1
        blocks were offered."""
        if self.connector is None:
            return 0
        self._flush_evictions()
        blocks = self.bm.cached_blocks()
        step = max(1, self.connector.store.config.io_queue)
        for i in range(0, len(blocks), step):
            self._save(blocks[i : i + step], settle=True)
            self.connector.store.flush()  # the write queue is bounded: let it drain
        self.connector.store.settle()
        return len(blocks)

    def _flush_evictions(self) -> None:
        evicted = self.bm.take_evictions()
        if evicted and self.connector is not None:
            self._save(evicted)
        if self.bm.record_commits:
            # write-through: blocks the last step named go below G1 now, before this step's
            # forward pass can overwrite any of them
            named = self.bm.take_commits()
            if named and self.connector is not None:
                self._save(named, through=True)

    def _clean_ahead(self, out: SchedulerOutput) -> None:
        """Without write-through, hand down now the blocks the next step may evict (the
        prompt tokens left, up to a step's budget, and a block of growth per running
        request): their copies run beside this step's forward, and the step that reuses
        the blocks neither copies them nor waits for the copies. They wait for no G2 room
        (if none is free now, their eviction hands them down)."""
        if self.connector is None or self.bm.record_commits or not self.bm.enable_prefix_caching:
            return
        budget, want = self.config.max_num_batched_tokens, 0
        now = {id(s.seq): s.num_tokens for s in out.scheduled}  # this step's, not computed yet
        for seq in itertools.chain(self.running, self.waiting):
            left = seq.num_tokens - seq.num_computed_tokens - now.get(id(seq), 0)
            want += left if left > 1 else 0
            if want >= budget:
                break
        n = -(-min(want, budget) // self.bm.block_size) + len(self.running)
        # once per block and name: one G2 had no room for waits for its eviction
        tried = self._ahead
        ahead = [e for e in self.bm.next_unsafe_evictions(n) if tried.get(e.block_id) != e.key]
        for e in ahead:
            tried[e.block_id] = e.key
        if ahead:
            self._save(ahead, through=True)

    def _save(self, named: list, settle: bool = False, through: bool = False) -> None:
        """Hand blocks down to the store; those still named in G1 (written through, kept at
        preemption) are then known to be safe below it. ``through``: written through, they
        wait for no G2 room (what G2 cannot take now goes down at eviction)."""
        by_tenant: dict[bytes, list] = {}
        for e in named:
            by_tenant.setdefault(e.tenant, []).append(e)
        for tenant, blocks in by_tenant.items():
            safe = self.connector.save(
                [b.key for b in blocks],
                [b.parent_key for b in blocks],
                tenant,
                [b.block_id for b in blocks],
                hints=[b.prospect for b in blocks],
                settle=settle,
                positions=[b.position for b in blocks],
                through=through,
            )
            self.bm.mark_below([b for b, ok in zip(blocks, safe) if ok])
