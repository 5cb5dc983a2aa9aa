"""G1 -> G2 write-back copies that land later (asynchronous on CUDA): readers wait for them,
pending slots are never evicted or refilled, a failed copy is a dropped entry, never data.

On the CPU a fake copier stands in for the CUDA side stream: its copies land only when
their event is synchronised after the test opens a gate, so a reader that did not wait
would read the slab's old bytes. The CUDA tests run the real side stream."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

import pytest
import torch

from kvgrid import keys
from kvgrid.store import ContextStore, StoreConfig, StoreConnector
from kvgrid.store.crypto import KeyRing
from kvgrid.store.host_pool import HostPool
from kvgrid.store.object import tenant_id
from kvgrid.store.transfer import CudaCopier, ReadEvents

SCOPE = keys.KVScope("test-model", "bfloat16")
A = keys.tenant_scope(b"server-secret", "tenant-a")
KR = KeyRing({1: os.urandom(32)})
BS = 16
SHAPE = (2, 2, BS, 2, 8)
BLOCK_BYTES = 2 * 2 * BS * 2 * 8 * 2


def blocks(n: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *SHAPE), generator=g).to(torch.bfloat16).to(device)


def chain(n: int, start: int = 0) -> list[bytes]:
    return keys.block_keys(list(range(start, start + BS * n)), SCOPE.with_tenant(A), BS)


class FakeEvent:
    """A copy batch that lands when synchronised after ``gate`` opens (or fails)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pairs = [(d, s.clone()) for d, s in pairs]  # the source is read at issue
        self.gate = threading.Event()
        self.fail = False
        self.waits = 0
        self._lock = threading.Lock()

    def synchronize(self) -> None:
        with self._lock:
            self.waits += 1
        assert self.gate.wait(10), "test never opened the gate"
        if self.fail:
            raise RuntimeError("copy failed on the device")
        with self._lock:
            for d, s in self.pairs:
                d.copy_(s)
            self.pairs = []


class FakeCopier:
    def __init__(self, fail_at_issue: bool = False) -> None:
        self.events: list[FakeEvent] = []
        self.fail_at_issue = fail_at_issue
        self.synchronized = 0

    def accepts(self, src: torch.Tensor, dst: torch.Tensor) -> bool:
        return True

    def copy(self, pairs):
        if self.fail_at_issue:
            raise RuntimeError("launch failed")
        ev = FakeEvent(pairs)
        self.events.append(ev)
        return ev

    def fence(self, device, ptrs=None) -> None:
        pass

    def synchronize(self, device) -> None:
        self.synchronized += 1

    def open(self, fail: bool = False) -> None:
        for ev in self.events:
            ev.fail = fail
            ev.gate.set()


def make(tmp_path, copier, g2_bytes: int = 1 << 20, **kw) -> ContextStore:
    cfg = dict(g2_bytes=g2_bytes, sweep_interval_s=0, admit_after={"G2": 1, "G3": 1, "G4": 1})
    cfg.update(kw)
    store = ContextStore(StoreConfig(**cfg), keyring=KR, copier=copier)
    store.configure_blocks(SHAPE, torch.bfloat16)
    store.g2.pool.zero_()  # a reader that does not wait sees zeros, never the block
    return store


def in_thread(fn):
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()), daemon=True)
    t.start()
    return t, out


def test_readers_wait_for_a_pending_write_back(tmp_path):
    cp = FakeCopier()
    store = make(tmp_path, cp, g3_dir=tmp_path / "g3")
    src = blocks(4)
    ks = chain(4)
    n = store.put_many(ks, [None, *ks[:-1]], A, list(src), BS)
    assert n == 4 and len(cp.events) == 1  # one batch, one event
    assert store.contains(ks, A) == ["G2"] * 4  # shown at once: lookups need not wait
    assert store.g2.pinned_count() == 4  # held by the copy (and the queued G3 writes)
    t, got = in_thread(lambda: store.get(ks[2], A))
    dst = torch.zeros_like(src)
    t2, loaded = in_thread(lambda: store.load_into(ks, A, list(dst)))
    time.sleep(0.2)
    assert t.is_alive() and t2.is_alive(), "a reader did not wait for the copy"
    assert (store.g2.pool == 0).all()  # nothing has landed yet
    cp.open()
    t.join(5)
    t2.join(5)
    assert torch.equal(got["r"], src[2])
    assert loaded["r"] == ["G2"] * 4 and torch.equal(dst, src)
    assert store.flush(10)
    assert store.g2.pinned_count() == 0
    # the background G3 writes read the slots after the copy too: the objects are exact
    store.g2.clear()
    for i, k in enumerate(ks):
        assert torch.equal(store.get(k, A), src[i])
    c = store.stats()["counters"]
    assert c["writebacks"] == {"mode=async": 4}
    store.close()


def test_host_blocks_are_copied_synchronously(tmp_path):
    store = make(tmp_path, None)  # the default copier: none on a CPU, CUDA's on a GPU
    src = blocks(3)
    ks = chain(3)
    assert store.put_many(ks, [None, *ks[:-1]], A, list(src), BS) == 3
    assert store.g2.pinned_count() == 0
    assert all(s.ready is None for _, _, s in store.g2.items())
    assert torch.equal(store.get(ks[1], A), src[1])
    assert store.stats()["counters"]["writebacks"] == {"mode=sync": 3}
    store.close()


def test_pending_slots_are_neither_evicted_nor_refilled(tmp_path):
    cp = FakeCopier()
    store = make(tmp_path, cp, g2_bytes=4 * BLOCK_BYTES)
    first, later = blocks(4, seed=1), blocks(3, seed=2)
    k1, k2 = chain(4), chain(3, start=1000)
    assert store.put_many(k1, [None] * 4, A, list(first), BS) == 4
    # G2 is full of pending slots: new blocks are dropped, not written over them
    store.put_many(k2, [None] * 3, A, list(later), BS)
    assert store.contains(k2, A) == [None] * 3
    assert store.stats()["counters"]["writes_dropped"] == {"reason=full,tier=G2": 3}
    assert store.g2.delete(tenant_id(A), k1[0]) is False and store.g2.clear() == 0
    cp.open()
    assert store.flush(10)
    for i, k in enumerate(k1):
        assert torch.equal(store.get(k, A), first[i])
    # landed: ordinary LRU slots again
    store.put_many(k2, [None] * 3, A, list(later), BS)
    cp.open()
    assert store.flush(10)
    assert store.contains(k2, A) == ["G2"] * 3
    store.close()


def test_a_failed_copy_drops_its_entries_and_frees_their_slots(tmp_path):
    cp = FakeCopier()
    store = make(tmp_path, cp, g2_bytes=4 * BLOCK_BYTES)
    ks = chain(3)
    store.put_many(ks, [None] * 3, A, list(blocks(3)), BS)
    store.drain_events()
    held = store.g2.acquire(tenant_id(A), ks[0])  # a reader that got in before the failure
    assert held is not None
    t, got = in_thread(lambda: store.get(ks[1], A))
    cp.open(fail=True)
    t.join(5)
    assert got["r"] is None  # a miss, not the slab's bytes and not an exception
    assert store.flush(10)
    assert store.contains(ks, A) == [None] * 3
    assert len(store.g2.free) == 3  # the reader still pins its slot's index
    store.g2.release(held[0])
    assert len(store.g2.free) == 4 and store.g2.used() == 0
    c = store.stats()["counters"]
    assert c["writes_dropped"] == {"reason=copy_failed,tier=G2": 3}
    removed = [e for e in store.drain_events() if type(e).__name__ == "BlockRemoved"]
    assert sorted(k for e in removed for k in e.keys) == sorted(ks)
    store.close()


def test_a_copy_that_fails_to_issue_shows_nothing(tmp_path):
    cp = FakeCopier(fail_at_issue=True)
    store = make(tmp_path, cp, g2_bytes=4 * BLOCK_BYTES)
    ks = chain(2)
    assert store.put_many(ks, [None] * 2, A, list(blocks(2)), BS) == 0
    assert cp.synchronized == 1  # copies already issued had to finish before reuse
    assert store.contains(ks, A) == [None, None]
    assert len(store.g2.free) == 4 and store.g2.pinned_count() == 0
    assert not [e for e in store.drain_events() if type(e).__name__ == "BlockStored"]
    store.close()


def test_a_slot_being_filled_is_invisible():
    pool = HostPool(4 * BLOCK_BYTES)
    b = blocks(1)[0]
    tid, key = b"t" * 16, b"k" * 32
    slot, new, _ = pool.reserve(tid, key, b.shape, b.dtype, None, BS)
    assert new and slot.pins == 1
    assert pool.acquire(tid, key) is None and pool.peek(tid, key) is None
    assert pool.acquire_run(tid, [key]) == []
    another = pool.reserve(tid, key, b.shape, b.dtype, None, BS)
    assert another[:2] == (None, False)  # a second fill of the key is told no
    pool.fill(slot, b)
    got = pool.acquire(tid, key)
    assert got is not None and torch.equal(got[1], b)
    pool.release(got[0])
    pool.release(slot)
    assert pool.pinned_count() == 0


class Unwalkable(OrderedDict):
    def __iter__(self):
        raise AssertionError("walked every entry of G2")

    items = values = keys = __iter__


TID = b"t" * 16


def g2_put(pool: HostPool, slots: dict, i: int, **reserve_kw) -> list[int]:
    """Add block ``i`` (named ``bytes([i]) * 32``) to a bare G2; the blocks it evicted."""
    b = blocks(1)[0]
    slot, new, evicted = pool.reserve(TID, bytes([i]) * 32, b.shape, b.dtype, None, BS,
                                      **reserve_kw)  # fmt: skip
    assert new and slot is not None
    pool.fill(slot, b)
    pool.release(slot)
    slots[i] = slot
    return [k[0] for _, k, _ in evicted]


def g2_use(pool: HostPool, i: int) -> None:
    pool.release(pool.acquire(TID, bytes([i]) * 32)[0])


def test_g2_evicts_by_class_and_never_walks_the_pool_to_do_it():
    """A lower tier's blocks go first, then the plain ones, each least recently used
    first, then (unless spared) those waiting for the write-down, the worst prospects
    first. Each class is its own LRU index, so a full G2 whose blocks all wait for the
    write-down answers a reservation without walking its entries: a walk per block leaving
    G1 stalled a busy server's engine thread once a slow disk filled G2."""
    pool = HostPool(6 * BLOCK_BYTES, high=1.0, low=1.0, pin_memory=False)
    pool.entries = Unwalkable()
    slots: dict[int, object] = {}
    for i in range(6):
        assert g2_put(pool, slots, i) == []
    for i, prospect in ((0, 2.0), (1, 1.0)):
        pool.mark_queued(slots[i], True)
        slots[i].prospect = prospect
    pool.mark_below(slots[4], "G3")
    pool.mark_below(slots[2], "G3")
    g2_use(pool, 4)  # 4 used after 2
    assert [g2_put(pool, slots, i) for i in (6, 7, 8, 9)] == [[2], [4], [3], [5]]

    def queue(i: int) -> None:
        pool.mark_queued(slots[i], True)
        slots[i].prospect = 5.0

    for i in (6, 7, 8, 9):  # the whole pool now waits for the write-down
        queue(i)
    t0 = time.perf_counter()
    assert g2_put(pool, slots, 10, wait_s=0.05, spare_s=0.05) == [1]  # spared, then the worst
    assert time.perf_counter() - t0 >= 0.04
    queue(10)
    assert g2_put(pool, slots, 11) == [0]
    queue(11)
    pool.mark_queued(slots[6], False)  # a writer took it: plain again, before the rest
    assert g2_put(pool, slots, 1) == [6]


def test_g2_keeps_no_block_seen_once_over_reused_blocks_the_disk_also_holds():
    """A lower tier's blocks go first, but not whatever their age: a block G2 alone holds
    that has gone unused for half a pool's worth of uses goes before them. Otherwise one-off
    prompts of long ago, never admitted below, outlive every reused block G3 also holds,
    and a busy server loads those from the disk instead of from memory."""
    pool = HostPool(8 * BLOCK_BYTES, high=1.0, low=1.0, pin_memory=False)
    slots: dict[int, object] = {}
    for i in range(8):  # 0 and 1 seen once; 2..7 reused, and written below
        g2_put(pool, slots, i)
    for i in range(2, 8):
        pool.mark_below(slots[i], "G3")
    assert g2_put(pool, slots, 8) == [2]  # 0 and 1 not stale yet: what the disk holds goes
    for i in range(3, 8):  # 3..7 used again: 0 and 1 now lie 9 uses back, over 8 / 2
        g2_use(pool, i)
    assert [g2_put(pool, slots, i) for i in (9, 10, 11)] == [[0], [1], [3]]


def test_connector_save_counts_and_loads_through_the_copier(tmp_path):
    cp = FakeCopier()
    store = make(tmp_path, cp)
    kv = blocks(8, seed=3)
    conn = StoreConnector(store, kv, BS)
    ks = chain(3)
    snap = kv[[1, 4, 6]].clone()
    conn.save(ks, [None, *ks[:-1]], A, [1, 4, 6])
    assert conn.saved_blocks == 3
    kv[[1, 4, 6]] = 0  # the engine reuses the blocks at once (the copy read them at issue)
    cp.open()
    assert conn.load(ks, A, [0, 2, 3]) == 3
    assert torch.equal(kv[[0, 2, 3]], snap)
    store.close()


def test_a_hand_down_of_blocks_g2_holds_only_touches_them(tmp_path):
    """A block G1 hands down that G2 holds already (written through when it was computed)
    is only touched: it counts as used, its prospect rises, nothing is reserved, copied or
    pinned, and the outcomes are counted once per kind. A hand-down is hundreds of blocks
    on the engine's thread, and on a store that writes through most of them are such."""
    cp = FakeCopier()
    store = make(tmp_path, cp)
    conn = StoreConnector(store, blocks(8, seed=4), BS)
    ks = chain(4)
    conn.save(ks, [None, *ks[:-1]], A, [0, 1, 2, 3])
    cp.open()
    assert store.flush(10)  # landed: the fills' pins are let go
    tid = tenant_id(A)
    reserved = []
    inner = store.g2.reserve
    store.g2.reserve = lambda t, key, *a, **kw: reserved.append(key) or inner(t, key, *a, **kw)
    held = [ks[0], ks[1]]
    assert conn.save(held, [None, ks[0]], A, [0, 1], hints=[5.0, 5.0]) == [True, True]
    assert reserved == [] and len(cp.events) == 1  # no slot reserved, nothing copied
    assert list(store.g2.entries)[-2:] == [(tid, ks[0]), (tid, ks[1])]  # used last
    for k in held:
        slot = store.g2.peek(tid, k)
        assert slot.pins == 0 and slot.prospect >= 5.0
    assert store.metrics.summary()["g1_writebacks"] == {
        "outcome=already_stored": 2,
        "outcome=g2": 4,
    }
    store.close()


def handed_down_and_written_down(tmp_path):
    """A store with G3 whose four blocks (a chain) G1 handed down and the disk now holds."""
    cp = FakeCopier()
    store = make(tmp_path, cp, g3_dir=tmp_path / "g3")
    conn = StoreConnector(store, blocks(8, seed=5), BS)
    ks = chain(4)
    conn.save(ks, [None, *ks[:-1]], A, [0, 1, 2, 3])
    cp.open()
    assert store.flush(10)
    return store, conn, ks


def test_a_hand_down_of_blocks_every_lower_tier_holds_pins_nothing(tmp_path):
    """A block G2 holds that the disk tiers hold too (written through, then written down)
    is handed down again at each eviction from G1: it is not offered to the write-down, and
    its G2 slot is not pinned to find that out (most hand-downs of a store with a disk
    tier, each on the engine's thread)."""
    store, conn, ks = handed_down_and_written_down(tmp_path)
    assert store.contains(ks, A) == ["G2"] * 4
    tid = tenant_id(A)
    assert all(store.g2.peek(tid, k).below == {"G3"} for k in ks)
    pinned = []
    inner = store.g2.acquire
    store.g2.acquire = lambda t, key: pinned.append(key) or inner(t, key)
    assert conn.save(ks[:2], [None, ks[0]], A, [0, 1]) == [True, True]
    assert pinned == [] and store.writes.in_flight == 0
    assert store.metrics.summary()["g1_writebacks"]["outcome=already_stored"] == 2
    store.close()


def test_a_hand_down_of_blocks_only_the_disk_holds_makes_no_view_per_block(tmp_path):
    """Blocks G2 lacks and every lower tier holds (most hand-downs of a store with a disk
    tier) are left where they are with no view of them made but the one that tells their
    device: each view is a torch call on the engine's thread, which gives up the GIL."""

    class CountingCache:
        def __init__(self, t: torch.Tensor) -> None:
            self.t, self.views = t, 0

        def __getitem__(self, i):
            self.views += 1
            return self.t[i]

    store, conn, ks = handed_down_and_written_down(tmp_path)
    store.g2.clear()
    assert store.contains(ks, A) == ["G3"] * 4
    conn.kv_cache = CountingCache(conn.kv_cache)
    assert conn.save(ks, [None, *ks[:-1]], A, [4, 5, 6, 7]) == [True] * 4
    assert conn.kv_cache.views <= 1  # was one per block
    assert store.metrics.summary()["g1_writebacks"]["outcome=already_stored"] == 4
    store.close()


# ---- CUDA: the real side stream ---------------------------------------------------------


def test_a_write_below_g2_without_a_g2_copy_goes_through_the_copier(tmp_path):
    """A block no G2 slot holds (no G2 here) is copied off the device for its G3 write on
    the copier's stream: a synchronous copy on the caller's thread would, from a GPU, make
    the engine's thread wait for the step in flight."""
    cp = FakeCopier()
    cfg = StoreConfig(g2_bytes=0, g3_dir=tmp_path / "g3", sweep_interval_s=0,
                      admit_after={"G2": 1, "G3": 1, "G4": 1})  # fmt: skip
    store = ContextStore(cfg, keyring=KR, copier=cp)
    src = blocks(2)
    ks = chain(2)
    assert store.put_many(ks, [None, ks[0]], A, list(src), BS) == 2
    assert len(cp.events) == 2  # issued, not landed
    time.sleep(0.1)
    assert store.contains(ks, A) == [None, None]  # the writes wait for their copies
    cp.open()
    assert store.flush(10)
    for i, k in enumerate(ks):
        assert torch.equal(store.get(k, A), src[i])
    store.close()


class _Ev:
    def __init__(self, done: bool = False) -> None:
        self.done = done

    def query(self) -> bool:
        return self.done


def test_a_load_fences_only_on_the_write_backs_of_its_own_blocks(monkeypatch):
    """Copies run in order on one stream, so a block's latest write-back event covers its
    earlier ones; write-backs of other blocks issued later must not delay a load."""
    dev = torch.device("cuda", 0)
    r = ReadEvents()
    a, b, c = _Ev(), _Ev(), _Ev()
    r.note(dev, [100, 200], a)
    r.note(dev, [300], b)
    r.note(dev, [100], c)
    assert r.latest(dev, [200]) is a
    assert r.latest(dev, [200, 300]) is b
    assert r.latest(dev, [100, 200]) is c
    assert r.latest(dev, [400]) is None
    assert r.latest(torch.device("cuda", 1), [100]) is None
    # landed copies are forgotten once the map grows (they need no wait)
    monkeypatch.setattr(ReadEvents, "_PRUNE_AT", 2)
    a.done = True
    r.note(dev, [500], _Ev())
    assert r.latest(dev, [200]) is None and r.latest(dev, [100]) is c


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SPIN = 200_000_000  # torch.cuda._sleep cycles: ~0.1 s, so the copies are still pending


def _gpu_store(tmp_path, **kw) -> ContextStore:
    cfg = dict(g2_bytes=1 << 22, sweep_interval_s=0, admit_after={"G2": 1, "G3": 1, "G4": 1})
    cfg.update(kw)
    return ContextStore(StoreConfig(**cfg), keyring=KR)


@cuda
def test_cuda_write_back_is_exact_while_the_engine_overwrites_the_blocks(tmp_path):
    store = _gpu_store(tmp_path, g3_dir=tmp_path / "g3")
    kv = torch.zeros((16, *SHAPE), dtype=torch.bfloat16, device="cuda")
    conn = StoreConnector(store, kv, BS)
    assert store.g2.pin_memory
    ids = [3, 4, 5, 9, 12]  # adjacent and not: merged and single copies
    ks = chain(len(ids))
    want = blocks(len(ids), seed=5, device="cuda")
    # the "forward" that writes the KV runs late: the copy must wait for it
    torch.cuda._sleep(SPIN)
    kv[ids] = want
    t0 = time.perf_counter()
    conn.save(ks, [None, *ks[:-1]], A, ids)
    issue_s = time.perf_counter() - t0
    assert any(s.ready is not None for _, _, s in store.g2.items()), "copy already landed?"
    # the engine overwrites the blocks right away: ordered after the copies
    kv[ids] = -1
    # a loader on another stream reads the pending slots into other G1 blocks
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        served = store.load_into(ks, A, [kv[i] for i in (0, 1, 2, 6, 7)])
    assert served == ["G2"] * len(ids)
    torch.cuda.synchronize()
    assert torch.equal(kv[[0, 1, 2, 6, 7]], want)
    assert store.flush(30)
    for i, k in enumerate(ks):
        assert torch.equal(store.get(k, A), want[i].cpu())
    # and from G3 (the background write waited for the copy)
    store.g2.clear()
    for i, k in enumerate(ks):
        assert torch.equal(store.get(k, A), want[i].cpu())
    assert issue_s < 0.05, f"save() waited for the copy ({issue_s:.3f}s)"
    store.close()


@cuda
def test_cuda_writers_fence_only_the_blocks_they_overwrite(tmp_path):
    """With ``writers_fence`` (an engine that fences each forward's blocks) a write-back no
    longer holds up the engine's stream: work on other blocks runs at once, and a writer
    of a saved block waits for its copy through ``fence_writes``; the store still gets the
    blocks as they were."""
    store = _gpu_store(tmp_path)
    kv = torch.zeros((16, *SHAPE), dtype=torch.bfloat16, device="cuda")
    conn = StoreConnector(store, kv, BS)
    assert conn.writers_fence()
    ids = [3, 4, 9]
    ks = chain(len(ids))
    want = blocks(len(ids), seed=8, device="cuda")
    kv[ids] = want
    torch.cuda.synchronize()
    side = torch.cuda.Stream()  # the copier's stream starts late: its copies stay pending
    with torch.cuda.stream(side):
        torch.cuda._sleep(SPIN)
    store.copier._streams[kv.device] = side
    conn.save(ks, [None, *ks[:-1]], A, ids)
    mark = torch.cuda.Event()
    kv[0] = 7  # another block: not ordered after the copies
    mark.record()
    mark.synchronize()
    assert not side.query(), "the engine's stream waited for a write-back"
    conn.fence_writes([4, 5])
    kv[ids] = -1  # block 4 is fenced; so are 3 and 9 (one copy stream: its latest event)
    torch.cuda.synchronize()
    for i, k in enumerate(ks):
        assert torch.equal(store.get(k, A), want[i].cpu())
    store.close()


@cuda
def test_cuda_layered_load_of_pending_slots_and_loads_into_just_evicted_blocks(tmp_path):
    from kvgrid.store.landing import LayerLanding

    store = _gpu_store(tmp_path)
    kv = torch.zeros((16, *SHAPE), dtype=torch.bfloat16, device="cuda")
    conn = StoreConnector(store, kv, BS)
    old, new = blocks(4, seed=6, device="cuda"), blocks(4, seed=7, device="cuda")
    k_old, k_new = chain(4), chain(4, start=5000)
    kv[8:12] = new
    conn.save(k_new, [None] * 4, A, [8, 9, 10, 11])
    torch.cuda.synchronize()
    assert store.flush(30)
    # evict blocks 0..3 (pending behind a slow stream), then load other blocks into them
    kv[0:4] = old
    torch.cuda._sleep(SPIN)
    conn.save(k_old, [None] * 4, A, [0, 1, 2, 3])
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        landing = store.load_layered(k_new, A, kv, [0, 1, 2, 3])
    assert isinstance(landing, LayerLanding)
    landing.synchronize()
    torch.cuda.synchronize()
    assert torch.equal(kv[0:4], new)
    assert store.flush(30)
    for i, k in enumerate(k_old):  # the write-back read them before the load landed
        assert torch.equal(store.get(k, A), old[i].cpu())
    # a layered load of slots still pending
    kv[12:16] = old
    torch.cuda._sleep(SPIN)
    k3 = chain(4, start=9000)
    conn.save(k3, [None] * 4, A, [12, 13, 14, 15])
    with torch.cuda.stream(side):
        landing = store.load_layered(k3, A, kv, [4, 5, 6, 7])
    landing.synchronize()
    assert torch.equal(kv[4:8], old)
    store.close()


@cuda
def test_cuda_fence_orders_after_the_given_blocks_write_backs():
    cp = CudaCopier()
    kv = torch.randn((4, 1 << 16), device="cuda")
    host = torch.empty((4, 1 << 16), pin_memory=True)
    ev_a = cp.copy([(host[0], kv[0]), (host[1], kv[1])])
    ev_b = cp.copy([(host[2], kv[2])])
    dev = kv.device
    assert cp._read.latest(dev, [kv[1].data_ptr()]) is ev_a
    assert cp._read.latest(dev, [kv[0].data_ptr(), kv[2].data_ptr()]) is ev_b
    assert cp._read.latest(dev, [kv[3].data_ptr()]) is None
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        cp.fence(dev, [kv[0].data_ptr()])
        kv[0].fill_(-1)  # after the write-back has read it
    torch.cuda.synchronize()
    assert not (host[0] == -1).any()
