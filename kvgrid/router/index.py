"""KVIndex: which worker holds which block, in which tier, built from numbered KV events.

Pure data structure, no I/O: the live router and the fleet simulator drive it the same way.

Layout, chosen for update speed: one dict per tier mapping a block key to a bitmask of the
workers that hold it (each worker owns one bit), plus per worker the set of its keys per
tier so a lost worker's blocks can be dropped. An overlap query walks the prompt's keys once,
AND-ing masks, so its cost grows with the prompt, not with the fleet.

Consistency: each worker numbers its event batches 1, 2, 3, ... A batch that skips a
number, or a load report announcing a later number than the index has seen, marks the
worker *stale*: its batches are buffered until a snapshot (all its keys per tier, with the
sequence number they reflect) replaces its entries, then the buffered batches newer than the
snapshot are replayed. A worker is stale from registration until its first snapshot, since
the index cannot know what it missed before subscribing.

Tier G4 is the shared tier: a key stored there by any worker is reachable by every worker.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from kvgrid.events import TIERS, AllCleared, BlockRemoved, BlockStored, EventBatch

TIER_INDEX = {t: i for i, t in enumerate(TIERS)}
SHARED_TIER = TIER_INDEX["G4"]
# Bounds the memory a stale worker can pin while its snapshot is on the way.
MAX_PENDING_BATCHES = 10_000


@dataclass
class WorkerEntry:
    """The index's record of one worker. Read-only outside the index."""

    bit: int
    keys: list[set[bytes]] = field(default_factory=lambda: [set() for _ in TIERS])
    seq: int = 0
    stale: bool = True
    pending: list[EventBatch] = field(default_factory=list)
    overflowed: bool = False

    def num_blocks(self) -> int:
        k = self.keys
        return len(k[0]) + len(k[1]) + len(k[2]) + len(k[3])


@dataclass(slots=True)  # one per matching worker per decision: cheap to build and free
class Overlap:
    """Leading blocks of a prompt that one worker can serve without recomputing them.

    ``by_tier[i]`` counts, within the matched prefix, the blocks whose best copy is in tier
    TIERS[i]; ``predicted`` counts blocks known only from the router's recent decisions.
    """

    blocks: int = 0
    by_tier: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    predicted: int = 0


class KVIndex:
    def __init__(self) -> None:
        self._tiers: list[dict[bytes, int]] = [{} for _ in TIERS]
        self._workers: dict[str, WorkerEntry] = {}
        self._bit_owner: dict[int, str] = {}
        self._free_bits: list[int] = []
        self._everyone = 0  # bits of all registered workers, kept as workers come and go
        self.events_applied = 0
        self.resyncs = 0

    # ---- workers -------------------------------------------------------------------------

    def add_worker(self, worker_id: str) -> None:
        if worker_id in self._workers:
            return
        bit = self._free_bits.pop() if self._free_bits else len(self._bit_owner)
        self._workers[worker_id] = WorkerEntry(bit)
        self._bit_owner[bit] = worker_id
        self._everyone |= 1 << bit

    def remove_worker(self, worker_id: str) -> None:
        """Forget a lost worker and every block it held."""
        entry = self._workers.pop(worker_id, None)
        if entry is None:
            return
        self._clear(entry, range(len(TIERS)))
        del self._bit_owner[entry.bit]
        self._free_bits.append(entry.bit)
        self._everyone &= ~(1 << entry.bit)

    def reset_worker(self, worker_id: str) -> None:
        """A new life of the worker (restart): drop its blocks, wait for a snapshot."""
        self.remove_worker(worker_id)
        self.add_worker(worker_id)

    @property
    def workers(self) -> list[str]:
        return list(self._workers)

    def has_worker(self, worker_id: str) -> bool:
        return worker_id in self._workers

    def is_stale(self, worker_id: str) -> bool:
        return self._workers[worker_id].stale

    def seq(self, worker_id: str) -> int:
        return self._workers[worker_id].seq

    def bit(self, worker_id: str) -> int:
        return self._workers[worker_id].bit

    def entry(self, worker_id: str) -> WorkerEntry:
        """The worker's entry (bit, staleness, keys) in one lookup, for callers that read
        several of them per worker on a hot path (routing). Do not modify it."""
        return self._workers[worker_id]

    def num_blocks(self, worker_id: str, tier: str | None = None) -> int:
        if tier is not None:
            return len(self._workers[worker_id].keys[TIER_INDEX[tier]])
        return self._workers[worker_id].num_blocks()

    def worker_keys(self, worker_id: str, tier: str) -> set[bytes]:
        return set(self._workers[worker_id].keys[TIER_INDEX[tier]])

    # ---- updates -------------------------------------------------------------------------

    def apply_batch(self, batch: EventBatch) -> str:
        """Apply one batch; returns "ok", "duplicate", "gap" (now stale), "buffered" or
        "unknown" (no such worker). After "gap" the caller must fetch a snapshot."""
        entry = self._workers.get(batch.worker_id)
        if entry is None:
            return "unknown"
        if entry.stale:
            if len(entry.pending) < MAX_PENDING_BATCHES:
                entry.pending.append(batch)
            else:
                entry.overflowed = True
            return "buffered"
        if batch.seq <= entry.seq:
            return "duplicate"
        if batch.seq != entry.seq + 1:
            entry.stale = True
            entry.pending = [batch]
            return "gap"
        self._apply_events(entry, batch.events)
        entry.seq = batch.seq
        return "ok"

    def note_seq(self, worker_id: str, seq: int) -> bool:
        """A heartbeat says the worker has published up to ``seq``. Returns True if that
        reveals lost batches (the worker is now stale)."""
        entry = self._workers.get(worker_id)
        if entry is None or entry.stale or seq <= entry.seq:
            return False
        entry.stale = True
        entry.pending = []
        return True

    def apply_snapshot(self, worker_id: str, seq: int, tiers: dict[str, Iterable[bytes]]) -> str:
        """Replace a worker's entries with its snapshot taken at event ``seq``, then replay the
        batches buffered meanwhile. Returns "ok", or "gap" if those batches still miss one."""
        entry = self._workers.get(worker_id)
        if entry is None:
            return "unknown"
        self._clear(entry, range(len(TIERS)))
        bit = 1 << entry.bit
        for tier, keys in tiers.items():
            ti = TIER_INDEX[tier]
            d, own = self._tiers[ti], entry.keys[ti]
            for k in keys:
                d[k] = d.get(k, 0) | bit
                own.add(k)
        pending = sorted(entry.pending, key=lambda b: b.seq)
        entry.pending, entry.seq, entry.stale = [], seq, False
        self.resyncs += 1
        if entry.overflowed:
            entry.overflowed = False
            if pending and pending[0].seq > seq + 1:
                entry.stale = True
                return "gap"
        for b in pending:
            if self.apply_batch(b) == "gap":
                return "gap"
        return "ok"

    def _apply_events(self, entry: WorkerEntry, events: Sequence) -> None:
        bit = 1 << entry.bit
        clear = ~bit
        for ev in events:
            if isinstance(ev, BlockStored):
                ti = TIER_INDEX[ev.tier]
                d = self._tiers[ti]
                get = d.get
                for k in ev.keys:
                    d[k] = get(k, 0) | bit
                entry.keys[ti].update(ev.keys)
            elif isinstance(ev, BlockRemoved):
                ti = TIER_INDEX[ev.tier]
                d, own = self._tiers[ti], entry.keys[ti]
                for k in ev.keys:
                    if k in own:
                        own.discard(k)
                        m = d[k] & clear
                        if m:
                            d[k] = m
                        else:
                            del d[k]
            elif isinstance(ev, AllCleared):
                tiers = range(len(TIERS)) if ev.tier is None else (TIER_INDEX[ev.tier],)
                self._clear(entry, tiers)
            self.events_applied += 1

    def _clear(self, entry: WorkerEntry, tiers: Iterable[int]) -> None:
        mask = ~(1 << entry.bit)
        for ti in tiers:
            d = self._tiers[ti]
            for k in entry.keys[ti]:
                m = d[k] & mask
                if m:
                    d[k] = m
                else:
                    del d[k]
            entry.keys[ti] = set()

    # ---- queries -------------------------------------------------------------------------

    def holder_mask(self, key: bytes, predicted: dict[bytes, int] | None = None) -> int:
        """Bitmask of the workers holding ``key`` in any tier (or predicted to)."""
        g1, g2, g3, g4 = self._tiers
        m = g1.get(key, 0) | g2.get(key, 0) | g3.get(key, 0) | g4.get(key, 0)
        if predicted:
            m |= predicted.get(key, 0)
        return m

    def held_masks_deepest_first(
        self, keys: Sequence[bytes], predicted: dict[bytes, int] | None = None
    ) -> Iterator[int]:
        """``holder_mask`` of each of ``keys`` that anyone holds (or is predicted to), from
        the last key to the first. Most keys of a cold prompt are held by no one: those are
        skipped here, in one loop, rather than by a call per key."""
        g1, g2, g3, g4 = (d.get for d in self._tiers)
        pred = (predicted or {}).get
        for key in reversed(keys):
            m = g1(key, 0) | g2(key, 0) | g3(key, 0) | g4(key, 0) | pred(key, 0)
            if m:
                yield m

    def owners(self, mask: int) -> list[str]:
        owner = self._bit_owner
        return [owner[b] for b in _bits(mask) if b in owner]

    def sample_owners(self, mask: int, k: int, rng: random.Random) -> list[str]:
        """Up to ``k`` workers of ``mask``, chosen at random. A prefix held by hundreds of
        workers (a shared system prompt) is sampled by probing bits, not by listing them."""
        n = mask.bit_count()
        if n <= 4 * k:
            owners = self.owners(mask)
            return owners if len(owners) <= k else rng.sample(owners, k)
        owner, width, picked = self._bit_owner, mask.bit_length(), set()
        # One probe is rng.randrange(width), spelled out as the rejection sampling it does
        # (random.Random._randbelow: draw bit_length(width) bits until below width): the
        # same draws, hence the same picks, without two Python-level calls per probe
        # (probing is most of the simulator's candidate preselection).
        getrandbits, nbits = rng.getrandbits, width.bit_length()
        # at least 4k of the `width` bits are set: a few probes per pick (bounded, in case
        # most set bits belong to workers that have left)
        for _ in range(64 * k):
            b = getrandbits(nbits)
            while b >= width:
                b = getrandbits(nbits)
            if mask >> b & 1 and b in owner:
                picked.add(b)
                if len(picked) == k:
                    return [owner[b] for b in picked]
        owners = self.owners(mask)
        return owners if len(owners) <= k else rng.sample(owners, k)

    def holders(self, key: bytes, predicted: dict[bytes, int] | None = None) -> list[str]:
        """Workers holding ``key`` in any tier (or predicted to): one lookup per tier."""
        m = self.holder_mask(key, predicted)
        return self.owners(m) if m else []

    def overlap(
        self,
        keys: Sequence[bytes],
        predicted: dict[bytes, int] | None = None,
        exclude_mask: int = 0,
        within_mask: int | None = None,
    ) -> dict[str, Overlap]:
        """Per worker, the leading blocks of ``keys`` it holds (any tier, or the shared tier).

        ``predicted`` maps keys to worker bitmasks the router expects to hold them (its recent
        decisions); ``exclude_mask`` drops workers whose index entries are not to be trusted
        (stale) while still counting their predicted blocks; ``within_mask`` limits the answer
        (and the work) to those workers' bits. Workers with no match are absent.
        """
        g1, g2, g3, g4 = (d.get for d in self._tiers)
        pred = (predicted or {}).get
        everyone = self._everyone
        if within_mask is not None:
            everyone &= within_mask
        trusted = everyone & ~exclude_mask
        active = everyone
        # bit -> matched length (a worker that misses the first key matches nothing: it is
        # never listed, rather than listed with 0 and skipped)
        lengths: dict[int, int] = {}
        # per-worker counts of blocks not in G1, filled only where such blocks occur
        lower: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            m1 = g1(k, 0) & trusted
            mp = pred(k, 0) & everyone
            m2 = g2(k, 0) & trusted
            m3 = g3(k, 0) & trusted
            m = m1 | mp | m2 | m3
            if g4(k, 0) & trusted:
                m = everyone
            still = active & m
            if i:
                gone = active ^ still  # active & ~still: still is a subset of active
                while gone:
                    low = gone & -gone
                    lengths[low.bit_length() - 1] = i
                    gone ^= low
            active = still
            if not active:
                break
            rest = active & ~m1
            if rest:
                for b in _bits(rest):
                    row = lower.setdefault(b, [0, 0, 0, 0, 0])
                    if mp >> b & 1:
                        row[4] += 1
                    elif m2 >> b & 1:
                        row[1] += 1
                    elif m3 >> b & 1:
                        row[2] += 1
                    else:
                        row[3] += 1
        for b in _bits(active):  # matched every key
            lengths[b] = len(keys)
        out: dict[str, Overlap] = {}
        owner = self._bit_owner
        for b, n in lengths.items():
            if n == 0:  # no keys at all
                continue
            row = lower.get(b)
            if row is None:
                out[owner[b]] = Overlap(n, [n, 0, 0, 0], 0)
            else:
                g1n = n - row[1] - row[2] - row[3] - row[4]
                out[owner[b]] = Overlap(n, [g1n, row[1], row[2], row[3]], row[4])
        return out


def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low
