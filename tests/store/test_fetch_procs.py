"""Fetch processes (``fetch_procs``): a disk tier's objects are read, verified and decoded
in helper processes; the engine's process keeps the bookkeeping, and a process's failure is
a counted miss, never a wrong block."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import torch

from kvgrid import keys
from kvgrid.store import ContextStore, StoreConfig
from kvgrid.store.fetch_procs import BATCH
from kvgrid.store.object import tenant_id
from kvgrid.store.prefetch import Queued
from kvgrid.store.proc_serve import _advise
from tests.support.store_blocks import BLOCK_BYTES, KR, SCOPE, SHAPE, A, block


def chain(n: int) -> list[bytes]:
    return keys.block_keys(list(range(16 * n)), SCOPE.with_tenant(A), 16)


def started_store(tmp_path, codec: str = "none", **kw) -> ContextStore:
    opts = {"fetch_procs": 1, "load_workers": 2, "admit_after": {"G2": 1, "G3": 1}, **kw}
    cfg = StoreConfig(g2_bytes=16 * BLOCK_BYTES, g3_dir=tmp_path / "g3", g3_bytes=1 << 24,
                      codec=codec, sweep_interval_s=0, **opts)  # fmt: skip
    store = ContextStore(cfg, keyring=KR)
    store.configure_blocks(SHAPE, torch.bfloat16)
    end = time.monotonic() + 90
    while not store._procs.fits(BLOCK_BYTES):
        assert time.monotonic() < end, "the fetch process did not start in 90 s"
        time.sleep(0.05)
    return store


def stored(store: ContextStore, n: int) -> list[bytes]:
    """``n`` blocks written down to G3, then dropped from G2."""
    ks = chain(n)
    for i, k in enumerate(ks):
        store.put(k, None, A, block(i), 16)
    assert store.flush()
    store.g2.clear()
    return ks


def no_reads_here(store: ContextStore, monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("read in the engine's process")

    monkeypatch.setattr(store.tier("G3"), "get", refuse)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_blocks_loaded_through_a_fetch_process_equal_those_stored(tmp_path, monkeypatch, codec):
    store = started_store(tmp_path, codec)
    try:
        ks = stored(store, 6)
        no_reads_here(store, monkeypatch)  # fails if the load reads in this process
        dst = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in ks]
        assert store.load_into(ks, A, dst) == ["G3"] * 6
        assert all(torch.equal(d, block(i)) for i, d in enumerate(dst))
        # promoted into G2 as from a read in this process, and counted the same way
        assert store.contains(ks, A) == ["G2"] * 6
        assert store.metrics.total("hits", tier="G3") == 6
        assert store.metrics.total("bytes_out", tier="G3") > 0
        assert torch.equal(store.get(ks[2], A), block(2))
    finally:
        store.close()


def test_a_damaged_or_missing_object_is_a_counted_miss_from_a_fetch_process(tmp_path, monkeypatch):
    store = started_store(tmp_path)
    try:
        ks = stored(store, 4)
        no_reads_here(store, monkeypatch)
        tier = store.tier("G3")
        path = tier.path(tenant_id(A), ks[1])
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x10
        path.write_bytes(bytes(data))
        dst = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in ks]
        assert store.load_into(ks, A, dst) == ["G3"]  # stops at the damaged block
        assert store.metrics.total("integrity_failures", tier="G3", kind="checksum") == 1
        assert not path.exists()  # damaged: dropped, as a read in this process drops it
        assert store.g2.peek(tenant_id(A), ks[1]) is None
        tier.path(tenant_id(A), ks[0]).unlink()
        store.g2.clear()
        assert store.load_into(ks, A, dst) == []
        assert store.metrics.total("misses", tier="G3", reason="absent") >= 1
        assert store.metrics.total("errors", tier="G3", op="read") == 0
        assert tier.up
    finally:
        store.close()


def kill(store: ContextStore) -> None:
    os.kill(store._procs.pids[0], signal.SIGKILL)
    store._procs._procs[0].popen.wait(10)


def test_a_fetch_process_that_dies_is_counted_and_started_again(tmp_path, monkeypatch):
    store = started_store(tmp_path)
    try:
        ks = stored(store, 3)
        no_reads_here(store, monkeypatch)
        dst = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in ks]
        kill(store)
        # a block read on its own: a miss, counted (not the disk's fault)
        assert store.load_into(ks[:1], A, dst[:1]) == []
        assert store.metrics.total("errors", tier="G3", op="fetch_process") == 1
        assert store.metrics.total("misses", tier="G3", reason="fetch_process") == 1
        assert store.tier("G3").up
        # the next read starts a new process and is served by it
        assert store.load_into(ks, A, dst) == ["G3"] * 3
        assert all(torch.equal(d, block(i)) for i, d in enumerate(dst))
        # a batch's process dies: counted, and its blocks are read one by one instead
        kill(store)
        store.g2.clear()
        dst = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in ks]
        assert store.load_into(ks, A, dst) == ["G3"] * 3
        assert all(torch.equal(d, block(i)) for i, d in enumerate(dst))
        assert store.metrics.total("errors", tier="G3", op="fetch_process") == 2
        assert store._procs.served >= 6
    finally:
        store.close()


def test_fetch_processes_that_cannot_start_leave_reads_in_this_process(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.executable", "/bin/false")  # exits at once: no "ready"
    cfg = StoreConfig(g2_bytes=16 * BLOCK_BYTES, g3_dir=tmp_path / "g3", g3_bytes=1 << 24,
                      codec="none", sweep_interval_s=0, admit_after={"G2": 1, "G3": 1},
                      fetch_procs=1)  # fmt: skip
    store = ContextStore(cfg, keyring=KR)
    try:
        store.configure_blocks(SHAPE, torch.bfloat16)
        assert not store._procs.fits(BLOCK_BYTES)  # starts them
        store._procs._procs[0].popen.wait(10)
        ks = stored(store, 2)
        dst = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in ks]
        assert store.load_into(ks, A, dst) == ["G3"] * 2
        assert all(torch.equal(d, block(i)) for i, d in enumerate(dst))
        assert store.metrics.total("errors", tier="fetch", op="start") == 1
    finally:
        store.close()


def test_a_load_sends_runs_of_blocks_and_its_readahead_to_the_processes(tmp_path, monkeypatch):
    store = started_store(tmp_path, load_workers=4)
    try:
        ks = stored(store, 12)
        no_reads_here(store, monkeypatch)
        submitted = []
        monkeypatch.setattr(store._hints, "submit", lambda *a: submitted.append(a))
        dst = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in ks]
        assert store.load_into(ks, A, dst) == ["G3"] * 12
        assert all(torch.equal(d, block(i)) for i, d in enumerate(dst))
        procs = store._procs
        assert procs.served == 12 and procs.requests == 12 // BATCH  # one request per run
        assert procs._hinter.sent >= 1 and not submitted  # no hint thread woken
    finally:
        store.close()


def test_a_runs_block_found_only_in_the_next_disk_tier_is_read_without_waiting(tmp_path):
    """One process, G3 and G4 on disk: a run's blocks that G3 lacks come from G4 while the
    run still holds the process (a second request for it would wait for itself)."""
    store = started_store(tmp_path, load_workers=2, g4_dir=tmp_path / "g4", g4_bytes=1 << 24,
                          admit_after={"G2": 1, "G3": 1, "G4": 1})  # fmt: skip
    try:
        ks = stored(store, 4)
        g3 = store.tier("G3")
        for k in ks[1:3]:
            g3.delete(tenant_id(A), k)
        assert store.contains(ks, A) == ["G3", "G4", "G4", "G3"]
        dst = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in ks]
        served = store.load_into(ks, A, dst, deadline=time.monotonic() + 20)
        assert served == ["G3", "G4", "G4", "G3"]  # not stopped at its deadline
        assert all(torch.equal(d, block(i)) for i, d in enumerate(dst))
    finally:
        store.close()


def test_a_load_stopped_early_lets_go_of_every_block_its_runs_fetched(tmp_path):
    store = started_store(tmp_path, load_workers=4)
    try:
        ks = stored(store, 12)
        dst = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in ks]
        served = store.load_into(ks, A, dst, deadline=time.monotonic())  # nothing waits
        assert len(served) < 12
        end = time.monotonic() + 10
        while store.g2.pinned_count() and time.monotonic() < end:
            time.sleep(0.02)
        assert store.g2.pinned_count() == 0
        assert len(store.load_into(ks, A, dst)) == 12  # and what was fetched serves
        assert all(torch.equal(d, block(i)) for i, d in enumerate(dst))
    finally:
        store.close()


def test_a_queued_requests_prefetch_goes_to_the_processes_in_runs(tmp_path, monkeypatch):
    store = started_store(tmp_path, load_workers=4)
    try:
        ks = stored(store, 8)  # G2's 16 slots: up to 8 pinned for the queue
        no_reads_here(store, monkeypatch)
        queued = [Queued(A, tuple(ks[:6]), 0.0), Queued(A, tuple(ks[6:]), 0.0)]
        store.prefetcher.publish(queued, None)
        assert store.flush()
        assert store.contains(ks, A) == ["G2"] * 8  # up in G2 before admission
        # a run never spans two requests: 4 + 2, then 2
        assert store._procs.served == 8 and store._procs.requests == 3
        dst = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in ks]
        assert store.load_into(ks, A, dst) == ["G2"] * 8
        assert all(torch.equal(d, block(i)) for i, d in enumerate(dst))
    finally:
        store.close()


def test_the_readahead_process_advises_each_file_that_exists(tmp_path, monkeypatch):
    files = [tmp_path / f"{i}.kvo" for i in range(3)]
    for f in files[:2]:
        f.write_bytes(b"x" * 10)
    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, o, n, a: advised.append(os.fstat(fd)))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.send("\0".join(map(str, files)).encode())
    ours.send(str(files[0]).encode())
    ours.close()
    _advise(theirs)  # returns when the socket closes
    assert len(advised) == 3  # two files, then the first again; the missing one skipped
    theirs.close()


def test_fetch_procs_must_not_be_negative():
    with pytest.raises(ValueError, match="fetch_procs"):
        StoreConfig(fetch_procs=-1).validate()


def test_fetch_processes_by_default_only_where_there_are_cpus_to_spare(monkeypatch):
    for cpus, n in ((2, 0), (7, 0), (8, 2), (12, 3), (16, 4), (128, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, c=cpus: set(range(c)))
        assert StoreConfig().fetch_procs_here() == n
        assert StoreConfig(fetch_procs=3).fetch_procs_here() == 3
        assert StoreConfig(fetch_procs=0).fetch_procs_here() == 0
