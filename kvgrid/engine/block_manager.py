"""BlockManager: the paged KV pool in device memory (G1) and its prefix cache.

Full blocks are named by their chained key (kvgrid.keys) and shared between sequences by
reference count. A block whose count drops to zero keeps its key and contents and waits in
an LRU free list: a later request with the same prefix revives it. Allocation takes, in
order: a block that holds nothing reusable, then the least recently freed of those a copy
below G1 already keeps safe (the context store has it: evicting it loses nothing and costs
no write-back), then the least recently freed of the rest. When a keyed block is reused for
other data its key is dropped; that moment is the eviction the context store hooks into
(write-back below G1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kvgrid.engine.sequence import Sequence
from kvgrid.events import AllCleared, BlockRemoved, BlockStored, KVEvent


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: bytes | None = None
    parent_key: bytes | None = None
    tenant: bytes = b""  # whose data it is: the store encrypts with that tenant's key
    below: bool = False  # the context store holds a copy: evicting it loses nothing
    position: int = 0  # its index in the chain of blocks its key ends
    prospect: float = 0.0  # reuse prospects handed to the store with it


@dataclass(frozen=True)
class EvictedBlock:
    block_id: int
    key: bytes
    parent_key: bytes | None
    tenant: bytes
    prospect: float = 0.0
    position: int = 0


# Called with the keyed blocks about to be overwritten, before their new owner's forward pass
# writes them, so the hook may still read their contents.
EvictionHook = Callable[[list[EvictedBlock]], None]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.free_below: OrderedDict[int, None] = OrderedDict()  # keyed, stored below, free
        self.cached: dict[bytes, int] = {}
        self.events: list[KVEvent] = []
        self.pending_evictions: list[EvictedBlock] = []
        # write-through to the context store: blocks named since the last take_commits()
        self.record_commits = False
        self.pending_commits: list[EvictedBlock] = []

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / max(1, len(self.blocks))

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix matching ---------------------------------------------------------------

    def match_prefix(self, block_keys: list[bytes]) -> list[int]:
        """Block ids of the leading keys present in G1 (no references taken)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key in block_keys:
            bid = self.cached.get(key)
            if bid is None:
                break
            hits.append(bid)
        return hits

    def num_revived(self, block_ids: list[int]) -> int:
        """How many of these cached blocks currently sit in the free list."""
        return sum(1 for b in block_ids if self.blocks[b].ref_count == 0)

    # ---- allocation --------------------------------------------------------------------

    def take_cached(self, seq: Sequence, block_ids: list[int]) -> None:
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
                self.free_below.pop(bid, None)
            block.ref_count += 1
            seq.block_table.append(bid)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free)

    def allocate(self, seq: Sequence, num_blocks: int) -> list[int]:
        if num_blocks > len(self.free):
            raise RuntimeError("allocate called without enough free blocks")
        new = []
        for _ in range(num_blocks):
            bid = next(iter(self.free))
            if self.blocks[bid].key is not None and self.free_below:
                bid, _ = self.free_below.popitem(last=False)  # safe below: nothing is lost
            del self.free[bid]
            self.free_below.pop(bid, None)
            block = self.blocks[bid]
            if block.key is not None:
                self._drop_key(block)
            block.ref_count = 1
            seq.block_table.append(bid)
            new.append(bid)
        return new

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s table to hold `num_tokens`; False (nothing taken) if blocks run out."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        self.allocate(seq, need)
        return True

    def free_seq(self, seq: Sequence) -> None:
        # Release tail blocks first so that, in LRU order, a prefix outlives its continuations.
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
                if block.key is None:
                    # unkeyed blocks hold nothing reusable: hand them out before cached ones
                    self.free.move_to_end(bid, last=False)
                elif block.below:
                    self.free_below[bid] = None
        seq.block_table = []
        seq.num_committed_blocks = 0

    # ---- caching -----------------------------------------------------------------------

    def commit_full_blocks(self, seq: Sequence, block_keys: list[bytes]) -> None:
        """Name the blocks of `seq` that are now full, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        run: list[bytes] = []  # consecutive newly named keys: one BlockStored event each run
        for i in range(seq.num_committed_blocks, len(block_keys)):
            key = block_keys[i]
            block = self.blocks[seq.block_table[i]]
            # already named (a shared hit), or the same content computed twice at once: keep one
            if block.key is not None or key in self.cached:
                self._emit_stored(run, block_keys)
                continue
            block.key, block.parent_key = key, (block_keys[i - 1] if i else None)
            block.tenant = seq.tenant
            block.below = seq.stored_from <= i < seq.stored_to
            block.prospect = seq.prospect
            block.position = i
            self.cached[key] = block.block_id
            if self.record_commits and not block.below:
                self.pending_commits.append(self._named(block))
            run.append(key)
        self._emit_stored(run, block_keys)
        seq.num_committed_blocks = max(seq.num_committed_blocks, len(block_keys))

    def _emit_stored(self, run: list[bytes], block_keys: list[bytes]) -> None:
        if run:
            parent = self.blocks[self.cached[run[0]]].parent_key
            self.events.append(BlockStored(tuple(run), parent, "G1", len(run) * self.block_size))
            run.clear()

    @staticmethod
    def _named(block: Block) -> EvictedBlock:
        return EvictedBlock(block.block_id, block.key, block.parent_key, block.tenant,
                            block.prospect, block.position)  # fmt: skip

    def _drop_key(self, block: Block) -> None:
        del self.cached[block.key]
        self.pending_evictions.append(self._named(block))
        self.events.append(BlockRemoved((block.key,), "G1"))
        block.key = block.parent_key = None
        block.below = False

    def mark_below(self, named: list[EvictedBlock]) -> None:
        """The store now holds these blocks (those that still hold that key): when G1 needs
        room they go first."""
        for e in named:
            block = self.blocks[e.block_id]
            if block.key != e.key or block.below:
                continue
            block.below = True
            if block.ref_count == 0:
                self.free_below[e.block_id] = None

    def next_unsafe_evictions(self, n: int) -> list[EvictedBlock]:
        """The free named blocks no copy below G1 keeps that the next ``n`` allocations
        would evict (after the unnamed ones and those safe below, which go first)."""
        clean = len(self.free_below)
        out: list[EvictedBlock] = []
        for scanned, bid in enumerate(self.free):
            if clean + len(out) >= n or scanned >= 4 * n:
                break
            block = self.blocks[bid]
            if block.key is None:
                clean += 1
            elif not block.below:
                out.append(self._named(block))
        return out

    def named_blocks(self, seq: Sequence) -> list[EvictedBlock]:
        """``seq``'s named blocks that no copy below G1 keeps yet."""
        out = []
        for bid in seq.block_table[: seq.num_committed_blocks]:
            block = self.blocks[bid]
            if block.key is not None and not block.below:
                out.append(self._named(block))
        return out

    def cached_blocks(self) -> list[EvictedBlock]:
        """Every keyed block, in the order they were named (write-back candidates; nothing
        is dropped from G1)."""
        return [self._named(self.blocks[bid]) for bid in self.cached.values()]

    def take_evictions(self) -> list[EvictedBlock]:
        out, self.pending_evictions = self.pending_evictions, []
        return out

    def take_commits(self) -> list[EvictedBlock]:
        """Blocks named since the last call that still hold that name (write-through)."""
        out, self.pending_commits = self.pending_commits, []
        return [c for c in out if self.blocks[c.block_id].key == c.key]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block that no request holds; False if some are in use."""
        if any(b.ref_count for b in self.blocks):
            return False
        for block in self.blocks:
            block.key = block.parent_key = None
            block.below = False
        self.cached.clear()
        self.free_below.clear()
        self.events.append(AllCleared("G1"))
        return True

    def drain_events(self) -> list[KVEvent]:
        out, self.events = self.events, []
        return out
