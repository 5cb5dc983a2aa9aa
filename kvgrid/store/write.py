"""The write path of ``ContextStore``: blocks handed down from G1 land in G2 (from a GPU on
the copier's side stream, from host memory at once), then are offered to the ranked write-down
for the tiers below (``writedown.py``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from kvgrid.events import BlockRemoved, BlockStored
from kvgrid.store.host_pool import Slot
from kvgrid.store.metrics import tenant_label
from kvgrid.store.object import cached_tenant_id
from kvgrid.store.transfer import CopyEvent, host_copy
from kvgrid.store.writedown import Candidate

log = logging.getLogger(__name__)

HELD = ("g2", "already_stored")  # the outcomes of a block the store now holds


class WritePath:
    """Write-backs of ``ContextStore`` (mixed into it, ``store.py``)."""

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
        blocks: Sequence[torch.Tensor],
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
        blocks: Sequence[torch.Tensor],
        token_count: int,
        hints: list[float] | None = None,
        settle: bool = False,
        positions: list[int] | None = None,
        through: bool = False,
        max_wait_s: float | None = None,
    ) -> list[str]:
        """Store blocks handed down from G1; per block, its outcome: ``g2`` (now in G2),
        ``already_stored`` (G2 holds it, or every lower tier up does: nothing is copied),
        ``queued_below`` (no G2 copy: queued for the disk tiers), ``dropped_full``,
        ``not_admitted``, ``outranked``, ``copy_failed``, ``error``, or
        ``deferred``: ``through`` (written through, still in G1) where G2 has no free slot
        at once; such a block waits for nothing and goes no further, G1's eviction hands it
        down again (with back-pressure).

        Host blocks are read before this returns. GPU blocks are copied into G2 on the
        copier's stream: the caller's current stream waits for those copies on the device,
        so its later kernels cannot overwrite the blocks before they are read, and the
        caller may reuse them at once. With every G2 slot pinned, the caller waits up to
        ``g2_wait_s`` (at most ``max_wait_s``, what the blocks are worth) for one
        (back-pressure) before a block is dropped, and before it gives up a block waiting
        for the write-down, up to ``g2_spare_s`` (at most one block's share of
        ``max_wait_s``) for a write to finish. Disk and network
        writes go through the ranked write-down (``hints``: the engine's reuse prospects
        per block, added to its sightings; ``positions``: each block's place in its chain,
        a prefix's head going first); ``settle`` (shutdown) waives disk admission."""
        if not (len(keys) == len(parent_keys) == len(blocks)):
            raise ValueError("put_many() needs as many keys, parent keys and blocks")
        if not keys:
            return []
        if self.block_shape is None:
            self.configure_blocks(tuple(blocks[0].shape), blocks[0].dtype)
        tid = cached_tenant_id(tenant)
        self._known_tenants.setdefault(tid, tenant)
        hints = hints or [0.0] * len(keys)
        score = [self.sightings.bump(k, at_least=1) + h for k, h in zip(keys, hints)]
        out = ["not_admitted"] * len(keys)
        below = self._safe_below(tid, keys)
        for i in below:
            out[i] = "already_stored"
        if self.g2 is not None:
            wait_s = 0.0 if through else self.config.g2_wait_s
            spare_s = min(wait_s, self.config.g2_spare_s)
            if max_wait_s is not None:
                wait_s = min(wait_s, max_wait_s)
                # sparing a waiting block saves one block: worth one block's share, no more
                spare_s = min(spare_s, max_wait_s / len(keys))
            self._g2_put_many(
                tid, keys, parent_keys, blocks, token_count, score, out, through, wait_s, spare_s
            )
        held = [i for i, o in enumerate(out) if i not in below and o in HELD]
        # the blocks G2 holds (or that were safe below) are accounted first: the loop below
        # finds those that the batch's own later blocks pushed out of G2 (``left_tier``)
        self.ledger.handed_down([(keys[i], out[i]) for i in (*below, *held)])
        g2_out = list(out)
        # the G2 slots of the blocks it holds, peeked once: after a batch's own later blocks
        # may have pushed earlier ones out (``left_tier``); and a block every admitted lower
        # tier already holds (most hand-downs, written through and evicted) needs no pin
        slots = dict(zip(held, self.g2.peek_many(tid, [keys[i] for i in held]))) if held else {}
        later: list[tuple[bytes, str]] = []
        for i, key in enumerate(keys):
            if i in below:
                continue
            in_g2 = i in slots
            if through and not in_g2:
                out[i] = "deferred"
                later.append((key, "deferred"))
                continue
            try:
                depth = positions[i] if positions else 0
                o = self._offer_below(
                    tid, key, parent_keys[i], tenant, blocks[i], token_count, score[i], settle,
                    in_g2, depth, slots.get(i),
                )  # fmt: skip
            except Exception:
                log.exception("store write-back failed")
                o = "error"
            if in_g2:
                if o == "already_stored":
                    out[i] = o
                if slots[i] is None:  # its own batch filled G2 past it
                    self.ledger.left_tier(key, "G2")
                continue
            # G2 did not take it: what the lower tiers did says where it went, unless they
            # did not take it either (then G2's reason: full, or a failed copy)
            if o in ("queued_below", "already_stored") or g2_out[i] == "not_admitted":
                out[i] = o
            later.append((key, out[i]))
        self.ledger.handed_down(later)
        return out

    def _safe_below(self, tid: bytes, keys: list[bytes]) -> set[int]:
        """The blocks G2 lacks that every lower tier up already holds: a hand-down leaves
        them there. Copying one into G2 would cost the engine's thread and the bus, and the
        place of a block that is not safe yet (a full G2 evicts for it); its way back up is
        a load or a prefetch from below. A shared tier is not asked (a stat per block on
        the engine's thread): what this process wrote or found there counts, and a block
        another server wrote is copied (the write-down then finds it below)."""
        tiers = [t for t in self.lower if t.up]
        if not tiers:
            return set()
        idx = [i for i, k in enumerate(keys) if self.g2 is None or self.g2.peek(tid, k) is None]
        now = time.time()
        for t in tiers:
            if not idx:
                break
            held = self._held_in(t, tid, keys, idx, now, known=True)
            if held is None:
                return set()
            idx = [i for i, h in zip(idx, held) if h]
        return set(idx)

    def _g2_put_many(
        self, tid, keys, parent_keys, blocks, token_count, score, out, through, wait_s, spare_s
    ) -> None:
        """The G2 part of ``put_blocks``: new slots are reserved, filled (one asynchronous
        batch for device blocks), then shown; ``out[i]`` says what became of each. A batch
        larger than what G2 has free fills what it reserved before it waits for more, all of
        it within ``wait_s`` (``through``: written through, still in G1, no wait), and
        ``spare_s`` of it sparing the write-down's waiting blocks."""
        quota = self._g2_quota(tid)
        fills: list[tuple[int, Slot]] = []
        sync: list[tuple[int, Slot]] = []
        now = time.monotonic()
        wait_end = now + wait_s
        spare_end = now + spare_s
        # one question for the call: its blocks share a device (asking costs a driver call)
        dev = blocks[0].device
        pool = self.g2.pool
        copies = self.copier is not None and pool is not None
        copies = copies and self.copier.accepts(blocks[0], pool)
        admit = self.config.admit_after.get("G2", 1)
        todo = [i for i in range(len(keys)) if score[i] >= admit and out[i] != "already_stored"]
        # what G2 holds already (a written-through block G1 now evicts, say) is only touched:
        # one lock for the lot, where a slot reserved and let go costs two for each
        held = self.g2.touch_many(tid, [keys[i] for i in todo], [score[i] for i in todo])
        for i, h in zip(todo, held):
            if h:
                out[i] = "already_stored"
                continue
            key = keys[i]
            b = blocks[i]
            got = None
            if (fills or sync) and not self.g2.free:
                # G2 is full: what it can give up may be this batch's own slots, still
                # being filled; filled, they need not be waited for
                self._g2_fill(tid, keys, parent_keys, blocks, token_count, fills, sync, out)
                fills, sync = [], []
            for _ in range(2):
                now = time.monotonic()
                got = self._g2_reserve(tid, key, b.shape, b.dtype, parent_keys[i], token_count,
                                       quota, wait_s=max(0.0, wait_end - now),
                                       spare_s=max(0.0, spare_end - now),
                                       count_drop=not through)  # fmt: skip
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
            elif copies and b.device == dev:
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
            view = self.g2.view
            try:
                ev = self.copier.copy([(view(s.index), blocks[i]) for i, s in fills])
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
        for i, _ in shown:
            out[i] = "g2"
            self._emit(BlockStored((keys[i],), parent_keys[i], "G2", token_count))
        if shown:
            nbytes = sum(blocks[i].nbytes for i, _ in shown)
            self.metrics.inc("bytes_in", nbytes, tier="G2", tenant=tenant_label(tid))

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
        self, tid, key, parent_key, tenant, block, token_count, score, settle, in_g2, depth=0,
        slot: Slot | None = None,
    ) -> str:  # fmt: skip
        """Offer one block to the write-down for the disk tiers (by its G2 slot when G2
        holds it, else with a host copy of its own); the outcome for a block G2 lacks.
        ``slot``: its G2 slot as last seen, if known: where every admitted tier already
        holds the block, nothing is pinned (a tier once holding a block stays in
        ``Slot.below``)."""
        admit = self.config.admit_after
        targets = [t for t in self.lower if t.up and (settle or score >= admit.get(t.name, 1))]
        for t in self.lower:
            if t.up and t not in targets:
                self.metrics.inc("writedown", tier=t.name, outcome="not_admitted")
        if slot is not None and targets and all(t.name in slot.below for t in targets):
            return "already_stored"
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
        c = Candidate(
            tid, key, parent_key, tenant, token_count, score, targets, None, None, None, depth
        )
        wait = self.config.io_block_s if not settle else 60.0
        if got is not None:
            c.slot, c.src = got  # pinned until written or skipped
        elif wait == 0 and not self.writes.takes(score, depth):
            self.writes.refuse(c)  # not copied off the device only to be skipped
            return "outranked"
        else:
            c.src, c.copied = self._off_device(block)
        return "queued_below" if self.writes.offer(c, wait_s=wait) else "outranked"

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
