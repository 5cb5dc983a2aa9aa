"""Tiers: hard capacity, quotas, TTL, warm restart, leases, admission, back-pressure.

Each tier-generic test runs on G2 (host memory), G3 (a directory), G4 on a shared
filesystem path and G4 on a real Redis server."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import torch

from kvgrid import keys
from kvgrid.store import ContextStore, StoreConfig, TenantPolicy
from kvgrid.store.crypto import KeyRing
from kvgrid.store.disk_tier import DiskTier
from kvgrid.store.object import tenant_id

SCOPE = keys.KVScope("test-model", "bfloat16")
A = keys.tenant_scope(b"server-secret", "tenant-a")
B = keys.tenant_scope(b"server-secret", "tenant-b")
SHAPE = (2, 2, 16, 2, 8)
BLOCK_BYTES = 2 * 2 * 16 * 2 * 8 * 2  # bf16
OBJ = 2300  # upper bound of one stored object (block + header), random bf16 does not shrink
KR = KeyRing({1: os.urandom(32)})
KINDS = ("G2", "G3", "G4-fs", "G4-redis")


def block(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def chain(tenant: bytes, n: int, start: int = 0) -> list[bytes]:
    return keys.block_keys(list(range(start, start + 16 * n)), SCOPE.with_tenant(tenant), 16)


@pytest.fixture
def make_store(tmp_path, request):
    """make_store(kind, capacity, **config) -> a store whose only tier is `kind`."""
    made = []

    def make(kind: str, capacity: int = 1 << 20, **kw) -> ContextStore:
        cfg = dict(g2_bytes=0, admit_after={"G2": 1, "G3": 1, "G4": 1}, sweep_interval_s=0)
        if kind == "G2":
            cfg["g2_bytes"] = capacity
        elif kind == "G3":
            cfg.update(g3_dir=tmp_path / "g3", g3_bytes=capacity)
        elif kind == "G4-fs":
            cfg.update(g4_dir=tmp_path / "g4", g4_bytes=capacity)
        else:
            url = request.getfixturevalue("redis_server")
            cfg.update(g4_redis=url, g4_bytes=capacity, g4_prefix=f"t{uuid.uuid4().hex[:8]}:")
        cfg.update(kw)
        s = ContextStore(StoreConfig(**cfg), keyring=KR)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def tier_of(store: ContextStore):
    return store.g2 if store.g2 is not None else store.lower[0]


def real_usage(store: ContextStore) -> int:
    """Bytes actually held, measured outside the tier's own accounting."""
    t = tier_of(store)
    if t is store.g2:
        return 0 if t.pool is None else t.pool.nbytes  # the slab is all G2 ever allocates
    if isinstance(t, DiskTier):
        return sum(
            os.path.getsize(os.path.join(d, f))
            for sub in ("objects", "tmp")
            for d, _, files in os.walk(t.root / sub)
            for f in files
        )
    r = redis.Redis.from_url(t.url)
    return sum(r.strlen(k) for k in r.scan_iter(match=t.prefix + "obj:*"))


@pytest.mark.parametrize("kind", KINDS)
def test_fill_to_twice_capacity_never_exceeds_it(make_store, kind):
    cap = 10 * OBJ
    store = make_store(kind, cap)
    ks = chain(A, 20)
    for i, k in enumerate(ks):
        store.put(k, None, A, block(i), 16)
        store.flush()
        assert tier_of(store).used() <= cap
        assert real_usage(store) <= cap
    name = tier_of(store).name
    assert store.metrics.total("evictions", tier=name, reason="capacity") > 0
    held = [t is not None for t in (store.contains([k], A)[0] for k in ks)]
    assert held[-1] and not held[0]  # LRU: the newest stayed, the oldest went
    assert 5 <= sum(held) <= 10  # the low watermark leaves headroom, never more than fits
    removed = [e for e in store.drain_events() if type(e).__name__ == "BlockRemoved"]
    assert len(removed) == 20 - sum(held)


@pytest.mark.parametrize("kind", KINDS)
def test_tenant_quota(make_store, kind):
    quota = 3 * OBJ if kind != "G2" else 3 * BLOCK_BYTES
    tname = "G2" if kind == "G2" else kind[:2]
    store = make_store(kind, 40 * OBJ, tenants={A: TenantPolicy(quota_bytes={tname: quota})})
    ka, kb = chain(A, 8), chain(B, 4)
    for i, k in enumerate(kb):
        store.put(k, None, B, block(100 + i), 16)
    for i, k in enumerate(ka):
        store.put(k, None, A, block(i), 16)
        store.flush()
        assert tier_of(store).used(tenant_id(A)) <= quota
    assert all(t is not None for t in store.contains(kb, B))  # B untouched by A's quota
    assert store.contains(ka[-1:], A)[0] is not None
    assert sum(store.contains([k], A)[0] is not None for k in ka) == 3
    assert store.metrics.total("evictions", reason="quota") == 5


@pytest.mark.parametrize("kind", KINDS)
def test_ttl_expired_objects_are_never_served_then_swept(make_store, kind):
    store = make_store(kind, tenants={A: TenantPolicy(ttl_s=0.3)})
    ka, kb = chain(A, 2), chain(B, 2)
    for i, (a, b) in enumerate(zip(ka, kb)):
        store.put(a, None, A, block(i), 16)
        store.put(b, None, B, block(i), 16)
    store.flush()
    assert None not in store.contains(ka, A)
    time.sleep(0.35)
    # not swept yet, and still never served
    assert store.contains(ka, A) == [None, None]
    assert store.get(ka[0], A) is None
    assert store.metrics.total("misses", reason="expired") == 1
    assert torch.equal(store.get(kb[1], B), block(1))  # B has no TTL
    assert store.sweep() == 1  # ka[0] was already deleted when it was read
    assert tier_of(store).used(tenant_id(A)) == 0
    assert store.metrics.total("evictions", reason="ttl") == 2


@pytest.mark.parametrize("kind", ["G3", "G4-fs"])
def test_warm_restart_hits_everything_without_rewriting(make_store, kind, tmp_path):
    store = make_store(kind)
    ks = chain(A, 12)
    for i, k in enumerate(ks):
        store.put(k, ks[i - 1] if i else None, A, block(i), 16)
    store.flush()
    store.close()
    root = tmp_path / ("g3" if kind == "G3" else "g4") / "objects"

    def snapshot():
        out = {}
        for d, _, files in os.walk(root):
            for f in files:
                p = os.path.join(d, f)
                st = os.stat(p)
                out[p] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(Path(p).read_bytes()).digest())
        return out

    before = snapshot()
    assert len(before) == 12
    again = make_store(kind, g2_bytes=1 << 20)  # a fresh process's view: empty G2
    assert again.rebuilt[kind[:2]] == 12
    stored = [e for e in again.drain_events() if type(e).__name__ == "BlockStored"]
    assert {e.keys[0] for e in stored} == set(ks)
    assert {e.parent_key for e in stored} == {None, *ks[:-1]}
    assert again.contains(ks, A) == [kind[:2]] * 12
    for i, k in enumerate(ks):
        assert torch.equal(again.get(k, A), block(i))
    assert again.metrics.total("hits", tier=kind[:2]) == 12
    assert snapshot() == before  # same files, same inodes, same mtimes, same bytes
    assert again.metrics.total("bytes_in", tier=kind[:2]) == 0


def test_leases_pin_blocks_and_are_always_released(make_store):
    store = make_store("G2", 10 * BLOCK_BYTES, lease_timeout_s=5.0)
    pinned = chain(A, 4)
    for i, k in enumerate(pinned):
        store.put(k, None, A, block(i), 16)
    with pytest.raises(RuntimeError), store.lease(pinned, A) as lease:
        assert len(lease) == 4
        assert store.stats()["pinned_blocks"] == 4
        for i, k in enumerate(chain(A, 30, start=10_000)):
            store.put(k, None, A, block(i), 16)
        assert store.contains(pinned, A) == ["G2"] * 4  # pinned: survived 3x capacity
        raise RuntimeError("the holder fails")  # released anyway
    assert store.stats()["pinned_blocks"] == 0 and store.stats()["leases"] == 0
    for i, k in enumerate(chain(A, 30, start=20_000)):
        store.put(k, None, A, block(i), 16)
    assert store.contains(pinned, A) == [None] * 4
    # a holder that never releases: the lease times out
    again = chain(A, 2, start=50_000)
    for i, k in enumerate(again):
        store.put(k, None, A, block(i), 16)
    forgotten = store.lease(again, A, timeout_s=0.05)
    assert len(forgotten) == 2
    time.sleep(0.1)
    store.put(chain(A, 1, start=60_000)[0], None, A, block(0), 16)  # reaps expired leases
    assert store.leases.expired == 1 and store.stats()["pinned_blocks"] == 0


def test_disk_admission_needs_a_second_sighting(make_store, tmp_path):
    store = make_store("G3", g2_bytes=1 << 20, admit_after={"G2": 1, "G3": 2})
    k = chain(A, 1)[0]
    store.put(k, None, A, block(0), 16)
    store.flush()
    assert store.tier("G3").created_many(tenant_id(A), [k]) == [None]
    store.note_seen([k])  # a request wanted it again
    store.put(k, None, A, block(0), 16)
    store.flush()
    assert store.tier("G3").created_many(tenant_id(A), [k])[0] is not None


class GatedTier(DiskTier):
    """A directory tier whose writes wait for a gate: a disk that has stalled."""

    gate = threading.Event()

    def stage(self, *a, **kw):
        assert self.gate.wait(10)
        return super().stage(*a, **kw)


@pytest.mark.parametrize("g2_bytes", [1 << 20, 0])
def test_back_pressure_bounds_in_flight_writes(tmp_path, g2_bytes):
    """A stalled disk never stalls the engine. What G2 holds waits there for the disk (all
    of it is written once the disk moves); blocks with host copies of their own (no G2) are
    bounded by io_queue, the rest skipped and counted."""
    GatedTier.gate.clear()
    cfg = StoreConfig(g2_bytes=g2_bytes, io_queue=4, io_workers=1, sweep_interval_s=0,
                      admit_after={"G2": 1, "G3": 1})  # fmt: skip
    store = ContextStore(cfg, keyring=KR, tiers=[GatedTier(tmp_path / "d", 1 << 20, "G3")])
    ks = chain(A, 30)
    copies = []
    off_device = store._off_device
    store._off_device = lambda b: (copies.append(1), off_device(b))[1]
    t0 = time.perf_counter()
    for i, k in enumerate(ks):
        store.put(k, None, A, block(i), 16)
        assert g2_bytes or store.writes.in_flight <= 4
    assert time.perf_counter() - t0 < 5  # the engine never waited on the stalled disk
    if g2_bytes:
        assert store.writes.max_seen == 30 and store.writes.dropped == 0
        assert store.contains(ks, A) == ["G2"] * 30  # G2 took every block
        assert store.g2.pinned_count() <= 1  # only the one the writer holds
    else:
        assert store.writes.max_seen == 4
        assert store.writes.dropped == 26
        assert store.metrics.total("writes_dropped", reason="queue_full") == 26
        # a block the full queue would skip is not copied off its device first
        assert len(copies) == 4
    GatedTier.gate.set()
    assert store.flush()
    written = sum(t is not None for t in store.tier("G3").created_many(tenant_id(A), ks))
    assert written == (30 if g2_bytes else 4)
    store.close()


def test_a_hand_down_spares_waiting_blocks_for_one_blocks_worth_of_its_wait(tmp_path):
    """G2 full of blocks waiting for a stalled disk: before it gives one up, a hand-down of
    20 blocks worth 1 s in all (their recompute) waits for a write to finish 1/20 s, not
    the configured 1 s: sparing one waiting block saves one block. Larger than G2, the batch
    then gives up its own earlier blocks, filled at once rather than waited for."""
    GatedTier.gate.clear()
    cfg = StoreConfig(g2_bytes=2 * block(0).nbytes, io_workers=1, g2_spare_s=1.0,
                      sweep_interval_s=0, admit_after={"G2": 1, "G3": 1})  # fmt: skip
    store = ContextStore(cfg, keyring=KR, tiers=[GatedTier(tmp_path / "d", 1 << 20, "G3")])
    ks = chain(A, 22)
    store.put(ks[0], None, A, block(0), 16)
    for _ in range(200):  # the writer takes it (pinned), then stalls on the disk
        if store.writes.running:
            break
        time.sleep(0.01)
    store.put(ks[1], None, A, block(1), 16)  # waits in G2 for the writer, unpinned
    t0 = time.perf_counter()
    store.put_blocks(ks[2:], [None] * 20, A, [block(i) for i in range(20)], 16, max_wait_s=1.0)
    assert 0.04 <= time.perf_counter() - t0 < 0.5
    GatedTier.gate.set()
    store.close()


def test_back_pressure_blocks_for_at_most_the_configured_time(tmp_path):
    GatedTier.gate.clear()
    cfg = StoreConfig(g2_bytes=0, io_queue=1, io_workers=1, io_block_s=0.2, sweep_interval_s=0,
                      admit_after={"G3": 1})  # fmt: skip
    store = ContextStore(cfg, keyring=KR, tiers=[GatedTier(tmp_path / "d", 1 << 20, "G3")])
    ks = chain(A, 2)
    store.put(ks[0], None, A, block(0), 16)
    t0 = time.perf_counter()
    store.put(ks[1], None, A, block(1), 16)  # queue full: waits 0.2 s, then drops
    waited = time.perf_counter() - t0
    assert 0.18 <= waited < 1.0
    assert store.writes.dropped == 1
    GatedTier.gate.set()
    store.close()


def count_stats(monkeypatch) -> list:
    """The paths this thread (the engine's, in the store) stats from now on; the store's
    own threads are not counted. monkeypatch.undo() stops it."""
    from kvgrid.store import disk_tier

    stats = []
    real = os.stat
    me = threading.get_ident()

    def counted(path, *a, **kw):
        if threading.get_ident() == me:
            stats.append(path)
        return real(path, *a, **kw)

    monkeypatch.setattr(disk_tier.os, "stat", counted)
    return stats


def test_a_disk_lookup_of_an_object_known_here_costs_no_stat(tmp_path, monkeypatch):
    """What a process wrote or found on its disk tier it looks up from memory; an object
    another process wrote is found by one stat; one another process deleted shows when its
    read misses. Objects are synced to the disk only with ``sync_writes``."""

    disk = DiskTier(tmp_path / "g3", 1 << 24, "G3")
    other = DiskTier(tmp_path / "g3", 1 << 24, "G3")  # another process on the same directory
    tid, ks = tenant_id(A), chain(A, 4)
    for k in ks[:3]:
        assert disk.put(tid, k, os.urandom(1000)).stored
    stats = count_stats(monkeypatch)
    assert None not in disk.created_many(tid, ks[:3]) and not stats
    assert other.put(tid, ks[3], os.urandom(1000)).stored
    stats.clear()
    assert disk.created_many(tid, ks)[3] is not None and len(stats) == 1
    assert disk.created_many(tid, ks) == disk.created_many(tid, ks) and len(stats) == 1
    assert other.delete(tid, ks[0])
    assert disk.created_many(tid, ks[:1]) != [None]  # not known yet...
    assert disk.get(tid, ks[0]) is None  # ...until its read misses
    assert disk.created_many(tid, ks[:1]) == [None]
    monkeypatch.undo()
    for sync in (False, True):
        cfg = StoreConfig(g2_bytes=0, g3_dir=tmp_path / "s", sweep_interval_s=0,
                          probe_tiers=False, sync_writes=sync)  # fmt: skip
        with ContextStore(cfg, keyring=KR) as store:
            assert store.tier("G3").fsync is sync


def test_the_owner_of_a_disk_tier_looks_up_from_memory_alone(tmp_path, monkeypatch):
    """A sole tier (G3: the worker's own folder) holds the directory's owner flock and
    answers every lookup from memory, hits and misses alike, with what it found at open and
    what it wrote since: no stat on the engine's thread. A second process on the same
    folder gets no ownership and stats; the next owner starts once the first has closed."""

    tid, ks = tenant_id(A), chain(A, 6)
    first = DiskTier(tmp_path / "g3", 1 << 24, "G3")
    assert not first.sole
    for k in ks[:2]:
        assert first.put(tid, k, os.urandom(1000)).stored
    first.close()
    stats = count_stats(monkeypatch)
    owner = DiskTier(tmp_path / "g3", 1 << 24, "G3", sole=True)
    assert owner.sole
    stats.clear()
    assert owner.put(tid, ks[2], os.urandom(1000)).stored
    stats.clear()
    found = owner.created_many(tid, ks)
    assert [c is not None for c in found] == [True, True, True, False, False, False]
    assert not stats  # neither the objects found at open nor the misses cost a stat
    guest = DiskTier(tmp_path / "g3", 1 << 24, "G3", sole=True)
    assert not guest.sole  # the owner holds the flock: the guest stats
    assert [c is not None for c in guest.created_many(tid, ks)][:3] == [True] * 3 and stats
    assert guest.delete(tid, ks[0])
    assert owner.get(tid, ks[0]) is None  # the owner learns of it when its read misses
    assert owner.created_many(tid, ks[:1]) == [None]
    guest.close()
    owner.close()
    assert DiskTier(tmp_path / "g3", 1 << 24, "G3", sole=True).sole
    monkeypatch.undo()
    # through the store: the engine thread's hand-downs and lookups stat nothing on G3
    cfg = StoreConfig(g2_bytes=1 << 20, g3_dir=tmp_path / "s", sweep_interval_s=0,
                      probe_tiers=False, admit_after={"G2": 1, "G3": 1})  # fmt: skip
    with ContextStore(cfg, keyring=KR) as store:
        assert store.tier("G3").sole
        stats = count_stats(monkeypatch)
        ks = chain(A, 4)
        assert store.contains(ks, A, leading=False) == [None] * 4
        for i, k in enumerate(ks):
            store.put(k, ks[i - 1] if i else None, A, block(i), 16)
        assert store.contains(ks, A, leading=False) == ["G2"] * 4
        assert not stats
        assert store.flush(10)  # the write-down (on its own threads) ends before close
    cfg = StoreConfig(g2_bytes=0, g4_dir=tmp_path / "shared", sweep_interval_s=0,
                      probe_tiers=False)  # fmt: skip
    with ContextStore(cfg, keyring=KR) as store:
        assert not store.tier("G4").sole  # a shared path has no owner


@pytest.mark.parametrize("batch", [8, 1])
def test_the_write_down_flushes_a_directory_once_per_batch(tmp_path, monkeypatch, batch):
    """Group commit: a writer stages a batch of objects (temp files, invisible) and the
    tier syncs and renames them, then flushes the directory once for the batch."""
    from kvgrid.store import disk_tier

    flushes = []
    real = disk_tier.fsync_dir
    monkeypatch.setattr(disk_tier, "fsync_dir", lambda d: (flushes.append(d), real(d)))
    disk = DiskTier(tmp_path / "g3", 1 << 24, "G3")
    tid = tenant_id(A)
    ks = chain(A, 8)
    staged = [disk.stage(tid, k, os.urandom(1000)) for k in ks]
    assert disk.created_many(tid, ks) == [None] * 8  # not visible before the commit
    assert all(r.stored for r in disk.commit(staged)) and len(flushes) == 1
    assert None not in disk.created_many(tid, ks)
    assert not list(disk.tmp.iterdir())
    # through the store: 16 blocks, one writer (stalled on the first), batches of ``batch``
    flushes.clear()
    GatedTier.gate.clear()
    cfg = StoreConfig(g2_bytes=1 << 20, io_workers=1, io_batch=batch, sweep_interval_s=0,
                      admit_after={"G2": 1, "G3": 1})  # fmt: skip
    store = ContextStore(cfg, keyring=KR, tiers=[GatedTier(tmp_path / "s3", 1 << 24, "G3")])
    ks = chain(A, 16, start=100)
    store.put_blocks(ks, [None] * 16, A, [block(i) for i in range(16)], 16)
    GatedTier.gate.set()
    assert store.flush(30)
    assert store.metrics.total("writedown", outcome="written") == 16
    assert len(flushes) == 16 if batch == 1 else len(flushes) <= 3  # stalled first, 8, rest
    store.g2.clear()
    assert all(torch.equal(store.get(k, A), block(i)) for i, k in enumerate(ks))
    store.close()


def test_a_disk_read_touches_an_object_only_when_its_last_use_is_older_than_the_resolution(
    tmp_path, monkeypatch
):
    """Reads keep the LRU order (atime) to ``TOUCH_AFTER_S``: an object used within that
    long is not touched again (a touch is a metadata write and a system call that gives up
    the GIL); one used longer ago moves to the front, so eviction still spares what is read."""
    from kvgrid.store import disk_io
    from kvgrid.store.tier import ReadBuffer

    disk = DiskTier(tmp_path / "g3", 10 * 1000, "G3")
    tid, ks = tenant_id(A), chain(A, 12)
    blobs = [os.urandom(1000) for _ in ks]
    for k, b in zip(ks[:8], blobs):
        assert disk.put(tid, k, b).stored
    utimes = []
    real = os.utime
    monkeypatch.setattr(disk_io.os, "utime", lambda *a, **kw: (utimes.append(a), real(*a, **kw)))
    buf = ReadBuffer()
    assert bytes(disk.get(tid, ks[0], buf)) == blobs[0] and disk.get(tid, ks[0]) == blobs[0]
    assert not utimes  # written just now: used within the resolution
    # every object last used long ago, the oldest first; reading the oldest brings it back
    now = time.time()
    for i, k in enumerate(ks[:8]):
        p = disk.path(tid, k)
        t = now - 3600 + i
        os.utime(p, (t, os.stat(p).st_mtime))
    utimes.clear()
    assert disk.get(tid, ks[0]) == blobs[0] and len(utimes) == 1
    assert disk.get(tid, ks[0]) == blobs[0] and len(utimes) == 1  # once per resolution
    assert os.stat(disk.path(tid, ks[0])).st_atime > now - 60
    for k in ks[8:]:  # past the high watermark: the least recently used go
        assert disk.put(tid, k, os.urandom(1000)).stored
    held = disk.created_many(tid, ks[:8])
    assert held[0] is not None and None in held[1:]
