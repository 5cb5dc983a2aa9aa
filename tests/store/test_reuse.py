"""Reuse at system level, in the store: where blocks handed down from G1 go and why a lookup
misses one (ledger, metrics), back-pressure into G2, the ranked write-down and the shutdown
write-down, tier bandwidth probes, and the queue-level plans (prefetch deadlines, splits
under load)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from kvgrid import keys
from kvgrid.store import ContextStore, StoreConfig, StoreConnector
from kvgrid.store.crypto import KeyRing
from kvgrid.store.disk_tier import DiskTier
from kvgrid.store.load_plan import GUARANTEE_MARGIN, plan_blocks
from kvgrid.store.object import tenant_id
from kvgrid.store.prefetch import Queued, plan_fetches

SCOPE = keys.KVScope("test-model", "bfloat16")
A = keys.tenant_scope(b"server-secret", "tenant-a")
SHAPE = (2, 2, 16, 2, 8)
BLOCK_BYTES = 2 * 2 * 16 * 2 * 8 * 2  # bf16
KR = KeyRing({1: os.urandom(32)})


def block(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def chain(n: int, start: int = 0) -> list[bytes]:
    return keys.block_keys(list(range(start, start + 16 * n)), SCOPE.with_tenant(A), 16)


def make(tmp_path, registry=None, tiers=None, **kw) -> ContextStore:
    cfg = dict(g2_bytes=4 * BLOCK_BYTES, sweep_interval_s=0, g2_wait_s=0.0)
    cfg.update(kw)
    return ContextStore(StoreConfig(**cfg), registry=registry, keyring=KR, tiers=tiers)


# ---- where blocks go, and why a lookup misses one --------------------------------------


def test_lost_hits_are_counted_by_reason_and_exported(tmp_path):
    reg = CollectorRegistry()
    store = make(tmp_path, registry=reg, g3_dir=tmp_path / "g3", admit_after={"G3": 2},
                 high_watermark=1.0, low_watermark=1.0)  # fmt: skip
    ks = chain(6)
    outs = store.put_blocks(ks, [None, *ks[:-1]], A, [block(i) for i in range(6)], 16)
    assert outs == ["g2"] * 6  # in G2; seen once, so not admitted to the disk
    store.flush()
    # G2 holds 4 (each new block evicted the oldest): blocks 0-1 are gone, 2-5 stay
    where = store.contains(ks, A, leading=False)
    assert where[:2] == [None, None] and where[2:] == ["G2"] * 4
    got = store.ledger.account_misses(ks, where)
    assert got == {"evicted_g2_not_admitted": 2, "behind_miss": 4}
    sample = reg.get_sample_value
    assert sample("kvgrid_store_lost_hits_total", {"reason": "evicted_g2_not_admitted"}) == 2
    assert sample("kvgrid_store_g1_writebacks_total", {"outcome": "g2"}) == 6
    assert sample("kvgrid_store_writedown_total", {"tier": "G3", "outcome": "not_admitted"}) == 6
    # the same blocks, still stored, recomputed by the plan: counted as such
    assert store.ledger.account_misses(ks[2:], where[2:]) == {"not_loaded_plan": 4}
    # never handed down: not a lost hit
    assert store.ledger.account_misses(chain(2, start=999), [None, None]) == {}
    assert store.stats()["counters"]["lost_hits"]["reason=behind_miss"] == 4
    store.close()


@pytest.mark.parametrize("wait_s", [1.0, 0.0])
def test_a_full_g2_applies_back_pressure_instead_of_dropping(tmp_path, wait_s):
    """Every G2 slot is pinned by a reader; a block handed down waits for one to be let go
    (``g2_wait_s``); without the wait it is dropped (so the test fails without the mechanism)."""
    store = make(tmp_path, g2_bytes=2 * BLOCK_BYTES, g2_wait_s=wait_s, high_watermark=1.0)
    held = chain(2, start=100)
    for i, k in enumerate(held):
        store.put(k, None, A, block(i), 16)
    lease = store.lease(held, A)
    assert len(lease) == 2
    threading.Timer(0.2, lease.release).start()
    t0 = time.monotonic()
    out = store.put_blocks(chain(1), [None], A, [block(9)], 16)
    waited = time.monotonic() - t0
    if wait_s:
        assert out == ["g2"] and 0.15 < waited < 1.0
        assert store.contains(chain(1), A) == ["G2"]
        assert store.metrics.total("writes_dropped") == 0
        assert store.metrics.total("backpressure_s") > 0.1
    else:
        assert out == ["dropped_full"] and waited < 0.15
        assert store.metrics.total("writes_dropped", reason="full") == 1
        assert store.ledger.fate(chain(1)[0]) == "dropped:dropped_full"
        assert store.ledger.account_misses(chain(1), [None]) == {"not_written_dropped_full": 1}
    store.close()


def test_a_block_safe_below_is_handed_down_without_a_g2_copy(tmp_path):
    """G2 lacks a block the disk holds: handing it down again copies nothing and takes no
    G2 slot (G2 is full of blocks still waiting for the disk, which would be given up)."""
    store = make(tmp_path, g2_bytes=2 * BLOCK_BYTES, g3_dir=tmp_path / "g3", high_watermark=1.0)
    safe = chain(1, start=50)
    store.put(safe[0], None, A, block(0), 16)
    assert store.flush()
    store.g2.clear()
    g3 = store.tier("G3")
    gate = threading.Event()
    inner = g3.stage
    g3.stage = lambda *a, **kw: (gate.wait(10), inner(*a, **kw))[1]  # the disk is busy
    waiting = chain(2, start=100)
    for i, k in enumerate(waiting):
        store.put(k, None, A, block(i + 1), 16)
    copies = store.metrics.total("writebacks")
    assert store.put_blocks(safe, [None], A, [block(0)], 16) == ["already_stored"]
    assert store.metrics.total("writebacks") == copies  # no copy into G2
    assert store.contains(waiting, A) == ["G2", "G2"]
    assert store.g2.peek(tenant_id(A), safe[0]) is None
    assert store.metrics.total("g1_writebacks", outcome="already_stored") == 1
    assert store.ledger.fate(safe[0]) != "in:G2"
    gate.set()
    assert store.flush()
    store.close()


def test_a_hand_down_asks_a_shared_tier_nothing(tmp_path):
    """A shared directory (G4) is not asked on the engine's thread whether it holds the
    blocks handed down: a block this process wrote there is known to be safe below; one
    that another server wrote is copied into G2, and the write-down then finds it below."""
    store = make(tmp_path, g2_bytes=4 * BLOCK_BYTES, g4_dir=tmp_path / "g4",
                 admit_after={"G2": 1, "G4": 1})  # fmt: skip
    g4 = store.tier("G4")
    assert not g4.sole
    ours, theirs = chain(1, start=50), chain(1, start=60)
    store.put(ours[0], None, A, block(0), 16)
    assert store.flush()
    other = DiskTier(tmp_path / "g4", 1 << 24, "G4")  # another server on the same path
    other.put(tenant_id(A), theirs[0], g4.get(tenant_id(A), ours[0]))
    store.g2.clear()
    asked, here = [], threading.get_ident()
    inner = g4.created_many

    def created_many(tid, ks):  # the write-down's threads ask it, the hand-down's must not
        if threading.get_ident() == here:
            asked.append(len(ks))
        return inner(tid, ks)

    g4.created_many = created_many
    assert store.put_blocks(ours + theirs, [None, None], A, [block(0), block(1)], 16) == [
        "already_stored",
        "g2",
    ]
    assert not asked  # the engine's thread asked the shared directory nothing
    assert store.flush()
    assert store.metrics.total("writedown", tier="G4", outcome="already_below") == 1
    assert store.metrics.total("writedown", tier="G4", outcome="written") == 1  # ours, once
    store.close()


def test_a_block_written_through_waits_for_no_g2_room(tmp_path):
    """Written through (still in G1), a block finds every G2 slot pinned: it is deferred at
    once, with no back-pressure and no drop counted, and goes no further; handed down again
    at eviction it waits for room as any other."""
    store = make(tmp_path, g2_bytes=2 * BLOCK_BYTES, g2_wait_s=1.0, high_watermark=1.0)
    held = chain(2, start=100)
    for i, k in enumerate(held):
        store.put(k, None, A, block(i), 16)
    lease = store.lease(held, A)
    t0 = time.monotonic()
    out = store.put_blocks(chain(1), [None], A, [block(9)], 16, through=True)
    assert out == ["deferred"] and time.monotonic() - t0 < 0.1
    assert store.metrics.total("g1_writebacks", outcome="deferred") == 1
    assert store.metrics.total("writes_dropped") == 0 and store.ledger.fate(chain(1)[0]) is None
    threading.Timer(0.2, lease.release).start()
    assert store.put_blocks(chain(1), [None], A, [block(9)], 16) == ["g2"]  # at eviction
    store.close()


# ---- write-down to the disk tiers ------------------------------------------------------


class GatedDisk(DiskTier):
    """A directory tier whose writes wait for a gate, recording the order they happen in."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.order: list[bytes] = []

    def stage(self, tid, key, blob, quota=None):
        assert self.gate.wait(10)
        self.order.append(key)
        return super().stage(tid, key, blob, quota)


class SlowDisk(DiskTier):
    """A directory tier that takes ``delay`` seconds per write."""

    def __init__(self, *a, delay: float = 0.05, **kw):
        super().__init__(*a, **kw)
        self.delay = delay

    def stage(self, tid, key, blob, quota=None):
        time.sleep(self.delay)
        return super().stage(tid, key, blob, quota)


def _until_writing(store: ContextStore) -> None:
    end = time.monotonic() + 10

    def writing() -> bool:
        return bool(store.g2.pinned_count() if store.g2 is not None else store.writes.running)

    while not writing():
        assert time.monotonic() < end, "the writer never took the block"
        time.sleep(0.01)


# (hint, position): a reused context's head, its tail, a one-off prompt, ...
OFFERS = [(0.0, 0), (1.0, 5), (1.0, 1), (0.0, 3), (1.0, 0), (0.0, 9)]


def _offer_ranked(store: ContextStore, disk: GatedDisk) -> tuple[bytes, list[bytes]]:
    first = chain(1, start=5000)
    store.put_blocks(first, [None], A, [block(0)], 16)  # taken by the one writer, stalled
    _until_writing(store)
    ks = chain(6)
    for k, (hint, pos) in zip(ks, OFFERS):
        store.put_blocks([k], [None], A, [block(1)], 16, hints=[hint], positions=[pos])
    return first[0], ks


def test_write_down_writes_g2s_backlog_best_prospects_first(tmp_path):
    """Blocks G2 holds wait there for the writers, whatever io_queue says: all are written,
    in rank order (prospects, then the head of a chain first, then the oldest)."""
    disk = GatedDisk(tmp_path / "g3", 1 << 24, "G3")
    store = make(tmp_path, g2_bytes=64 * BLOCK_BYTES, tiers=[disk], io_workers=1, io_queue=4)
    first, ks = _offer_ranked(store, disk)
    assert store.writes.max_seen == 7 and store.g2.pinned_count() == 1  # the one being written
    disk.gate.set()
    assert store.flush(10)
    assert disk.order == [first, ks[4], ks[2], ks[1], ks[0], ks[3], ks[5]]
    assert store.metrics.total("writedown", outcome="outranked") == 0
    assert store.metrics.total("writedown", outcome="written") == 7
    assert store.g2.pinned_count() == 0
    store.close()


def test_write_down_of_host_copies_is_bounded_and_skips_the_worst(tmp_path):
    """Without G2 each candidate holds a host copy of its own: at most io_queue of them; the
    worst-ranked are skipped and counted."""
    disk = GatedDisk(tmp_path / "g3", 1 << 24, "G3")
    store = make(tmp_path, g2_bytes=0, tiers=[disk], io_workers=1, io_queue=4)
    first, ks = _offer_ranked(store, disk)
    assert store.writes.max_seen == 4
    disk.gate.set()
    assert store.flush(10)
    # 3 queue places behind the stalled write: the best three, in rank order
    assert disk.order == [first, ks[4], ks[2], ks[1]]
    assert store.metrics.total("writedown", outcome="outranked") == 3
    assert store.metrics.total("writedown", outcome="written") == 4
    for k in (ks[0], ks[3], ks[5]):
        assert store.ledger.fate(k) == "dropped:outranked"
    store.close()


def test_a_full_g2_gives_up_the_worst_ranked_waiting_block_first(tmp_path):
    """G2 (4 slots) is full of blocks waiting for a stalled disk: it gives up the one-off
    prompts' blocks (counted, ledger says why) and keeps the reused contexts' for the disk."""
    disk = GatedDisk(tmp_path / "g3", 1 << 24, "G3")
    store = make(tmp_path, g2_bytes=4 * BLOCK_BYTES, tiers=[disk], io_workers=1,
                 high_watermark=1.0, low_watermark=1.0)  # fmt: skip
    first = chain(1, start=5000)
    store.put_blocks(first, [None], A, [block(0)], 16)  # being written: pinned
    _until_writing(store)
    ks = chain(5)
    hints = [1.0, 0.0, 1.0, 0.0, 1.0]  # reused, one-off, reused, one-off, reused
    for k, h in zip(ks, hints):
        assert store.put_blocks([k], [None], A, [block(2)], 16, hints=[h]) == ["g2"]
    assert store.contains(ks, A, leading=False) == ["G2", None, "G2", None, "G2"]
    assert store.metrics.total("writedown", outcome="outranked") == 2
    assert store.ledger.account_misses([ks[1]], [None]) == {"evicted_g2_outranked": 1}
    disk.gate.set()
    assert store.flush(10)
    assert disk.order == [first[0], ks[0], ks[2], ks[4]]
    store.close()


@pytest.mark.parametrize("spare_s", [5.0, 0.0])
def test_a_small_g2_under_write_pressure_loses_no_block_the_disk_had_room_for(tmp_path, spare_s):
    """A slow disk (50 ms a write), G2 of 4 slots, 10 blocks handed down back to back: G2
    waits for a write in flight to finish and gives up the written block, so every block
    reaches the disk. Without that wait (spare_s 0) it gives up blocks still waiting."""
    disk = SlowDisk(tmp_path / "g3", 1 << 24, "G3", delay=0.05)
    store = make(tmp_path, g2_bytes=4 * BLOCK_BYTES, tiers=[disk], io_workers=1, io_queue=1,
                 g2_wait_s=5.0, g2_spare_s=spare_s, high_watermark=1.0,
                 low_watermark=1.0)  # fmt: skip
    ks = chain(10)
    t0 = time.monotonic()
    for i, k in enumerate(ks):
        assert store.put_blocks([k], [None], A, [block(i)], 16) == ["g2"]
    assert store.flush(10)
    on_disk = {i.key for i in disk.list()}
    lost = store.metrics.total("writedown", outcome="outranked")
    if spare_s:
        assert on_disk == set(ks) and lost == 0
        assert store.metrics.total("backpressure_s") > 0.1
        assert time.monotonic() - t0 < 3.0
    else:
        assert lost > 0 and len(on_disk) == 10 - lost
    for i, k in enumerate(ks):
        if k in on_disk:
            store.g2.clear()
            assert torch.equal(store.get(k, A), block(i))
    store.close()


def test_shutdown_writes_g2_down_within_capacity_without_a_second_sighting(tmp_path):
    """At shutdown what G2 holds goes to the disk, best prospects first and no more than the
    disk holds; a restarted store finds it, though each block was seen once only."""
    obj = BLOCK_BYTES + 400  # one object: the block (random bf16 does not shrink), a header
    cap = int(4.5 * obj / 0.95)
    cfg = dict(g2_bytes=8 * BLOCK_BYTES, g3_dir=tmp_path / "g3", g3_bytes=cap,
               admit_after={"G3": 3}, high_watermark=1.0)  # fmt: skip
    store = make(tmp_path, **cfg)
    ks = chain(8)
    hints = [0, 0, 1, 1, 0, 1, 0, 1]
    store.put_blocks(ks, [None, *ks[:-1]], A, [block(i) for i in range(8)], 16, hints=hints)
    assert store.flush()
    g3 = store.tier("G3")
    assert not list(g3.list())  # seen once (reused or not): not admitted while serving
    assert store.settle() == 4  # as many as the disk holds at its high watermark
    assert store.metrics.total("writedown", outcome="over_capacity") == 4
    store.close()
    again = make(tmp_path, **cfg)
    where = again.contains(ks, A, leading=False)
    assert [i for i, t in enumerate(where) if t == "G3"] == [2, 3, 5, 7]  # the reused ones
    assert torch.equal(again.get(ks[7], A), block(7))
    again.close()


# ---- tier bandwidths: measured, not seeded ---------------------------------------------


@pytest.mark.parametrize("probe", [True, False])
def test_tier_bandwidth_is_probed_at_start(tmp_path, probe):
    # a seed no disk has: a block would take hours; only a measurement can replace it
    store = make(tmp_path, g3_dir=tmp_path / "g3", probe_tiers=probe,
                 seed_bytes_per_s={"G2": 10e9, "G3": 1.0})  # fmt: skip
    cache = torch.zeros((4, *SHAPE), dtype=torch.bfloat16)
    conn = StoreConnector(store, cache, 16)
    if probe:
        # a real measurement (tiny objects on a busy machine: slow, but nothing like 1 B/s)
        assert conn.probed["G3"] > 1e3 and conn.probed["G2"] > 1e3
        assert conn.block_load_seconds("G3") < 2.0
        assert store.bandwidth["G3"] == conn.probed["G3"]
        assert not list(store.tier("G3").list())  # the probe's objects are gone
    else:
        assert "G3" not in conn.probed and conn.block_load_seconds("G3") > 1000
    store.close()


# ---- queue-level plans -------------------------------------------------------------------


def test_prefetch_plan_meets_each_blocks_deadline_tier_by_tier():
    """Block j of a queued request is due when the GPU would compute it (start + j x 50 ms);
    the disk delivers one every 100 ms, shared by the whole queue in order."""
    now = 100.0
    q = [Queued(A, tuple(chain(6)), now), Queued(A, tuple(chain(4, start=64)), now + 1.0)]
    where = [["G3"] * 6, ["G2", "G3", None, "G3"]]
    plan, late = plan_fetches(q, where, {"G3": 0.1}, 0.05, now)
    # request 0: blocks 0 and 1 cannot make it (due at 0 and 50 ms); 2 lands at 100 ms (due
    # 100), 3 would land at 200 (due 150): late, 4 lands at 200 (due 200), 5 at 300 (due 250)
    # is late; request 1: its G2 block needs nothing, block 1 lands at 300 ms (due 1.05 s),
    # and nothing after the gap
    assert plan == [(0, 2), (0, 4), (1, 1)]
    assert late == 4
    # prefill speed not measured yet: no deadlines, everything stored below G2 comes up
    plan, late = plan_fetches(q, where, {"G3": 0.1}, None, now)
    assert plan == [(0, j) for j in range(6)] + [(1, 1)] and late == 0
    # a busy disk (400 ms of fetches in flight) moves every arrival later
    plan, _ = plan_fetches(q, where, {"G3": 0.1}, 0.05, now, {"G3": now + 0.4})
    assert plan == [(1, 1)]  # none of request 0 can arrive before the GPU reaches it


def test_a_plan_looks_up_requests_only_as_far_as_its_fetch_slots_reach():
    """The planner runs every few milliseconds: requests past the free fetch slots are not
    looked up (each lookup holds the GIL the engine's thread needs)."""
    now = 100.0
    q = [Queued(A, tuple(chain(4, start=64 * i)), now + i) for i in range(5)]
    located = []

    def where():
        for i in range(len(q)):
            located.append(i)
            yield ["G2", "G3", "G3", "G3"]

    plan, late = plan_fetches(q, where(), {"G3": 0.01}, None, now, limit=4)
    assert plan == [(0, 1), (0, 2), (0, 3), (1, 1)] and late == 0
    assert located == [0, 1]  # requests 2..4 were never looked up
    full, _ = plan_fetches(q, [["G2", "G3", "G3", "G3"]] * 5, {"G3": 0.01}, None, now)
    assert len(full) == 15  # without a limit, the whole queue


def test_a_leading_lookup_stops_asking_the_disk_at_the_first_gap(tmp_path):
    store = make(tmp_path, g2_bytes=8 * BLOCK_BYTES, g3_dir=tmp_path / "g3")
    ks = chain(40)
    for i, k in enumerate(ks[:3]):
        store.put(k, None, A, block(i), 16)
    assert store.flush()
    store.g2.clear()
    g3 = store.tier("G3")
    asked = []
    inner = g3.created_many
    g3.created_many = lambda tid, keys: asked.extend(keys) or inner(tid, keys)
    assert store.contains(ks, A) == ["G3"] * 3 + [None] * 37
    assert len(asked) == 8  # the first chunk holds the gap: the other 32 keys are not asked
    asked.clear()
    assert store.contains(ks, A, leading=False) == ["G3"] * 3 + [None] * 37
    assert len(asked) == 40
    store.close()


def test_under_load_a_split_loads_as_much_as_keeps_the_request_no_slower():
    """A tier twice as slow as recompute (20 vs 10 ms a block), 12 blocks: alone, the split
    that gives the first token soonest recomputes 8 while 4 load; with others waiting for
    the GPU, it loads as many as keep the request within its own recompute time."""
    load = [0.02] * 12
    alone = plan_blocks(load, 64, 6400.0, overhead_s=0.0)
    busy = plan_blocks(load, 64, 6400.0, overhead_s=0.0, busy=True)
    assert (alone.compute_blocks, alone.load_blocks) == (8, 4)
    assert busy.load_blocks > alone.load_blocks
    assert busy.expected_s <= GUARANTEE_MARGIN * 12 * 0.01 + 1e-9
    assert busy.expected_s > alone.expected_s  # slower than the soonest, not than recompute
    # a tier so slow that nothing fits within the request's own recompute time: no split
    # is offered as the busy plan (lookup then recomputes it all)
    slow = plan_blocks([1.0] * 12, 64, 6400.0, overhead_s=0.0, busy=True)
    assert slow.expected_s > 12 * 0.01


def test_queued_requests_blocks_come_up_and_stay_in_g2_until_admitted(tmp_path):
    store = make(tmp_path, g2_bytes=8 * BLOCK_BYTES, g3_dir=tmp_path / "g3")
    ks = chain(3)
    for i, k in enumerate(ks):
        store.put(k, None, A, block(i), 16)
    assert store.flush()
    store.g2.clear()
    assert store.contains(ks, A) == ["G3"] * 3
    store.prefetcher.publish([Queued(A, tuple(ks), time.monotonic() + 5.0)], 0.01)
    deadline = time.monotonic() + 5
    while store.metrics.total("prefetch", outcome="fetched") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
        store.prefetcher.publish([Queued(A, tuple(ks), time.monotonic() + 5.0)], 0.01)
    assert store.metrics.total("prefetch", outcome="fetched") == 3
    time.sleep(0.05)
    store.prefetcher.publish([Queued(A, tuple(ks), time.monotonic() + 5.0)], 0.01)
    time.sleep(0.1)
    # other blocks flood G2: the queued request's stay (pinned for it)
    for i, k in enumerate(chain(12, start=1000)):
        store.put(k, None, A, block(i), 16)
    assert store.contains(ks, A) == ["G2"] * 3
    assert store.bandwidth["G3"] > 0  # the prefetch measured the disk
    store.prefetcher.publish([], None)  # admitted: let go
    time.sleep(0.1)
    assert store.g2.pinned_count() == 0
    store.close()


def test_tenant_scoped_keys_of_the_ledger_never_cross(tmp_path):
    """The ledger is keyed by block key, which already binds the tenant: the same tokens of
    another tenant are another key, never explained by the first tenant's fate."""
    store = make(tmp_path)
    other = keys.block_keys(list(range(16)), SCOPE.with_tenant(b"b" * 32), 16)
    store.put_blocks(chain(1), [None], A, [block(0)], 16)
    assert store.ledger.fate(chain(1)[0]) == "in:G2"
    assert store.ledger.fate(other[0]) is None
    assert tenant_id(A) != tenant_id(b"b" * 32)
    store.close()
