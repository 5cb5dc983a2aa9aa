"""Write processes (``write_procs``): blocks going down to a disk tier are encoded,
encrypted and written to temp files in helper processes; the engine's process keeps the
ledger, the renames and the bookkeeping, and a process's failure leaves the write to it."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from kvgrid import keys
from kvgrid.store import ContextStore, StoreConfig
from kvgrid.store import writedown as writedown_mod
from kvgrid.store.object import tenant_id
from tests.support.store_blocks import BLOCK_BYTES, KR, SCOPE, SHAPE, A, block


def chain(n: int, start: int = 0) -> list[bytes]:
    return keys.block_keys(list(range(16 * (start + n))), SCOPE.with_tenant(A), 16)[start:]


def new_store(tmp_path, codec: str = "none", wait: bool = True, **kw) -> ContextStore:
    opts = {"write_procs": 1, "fetch_procs": 0, "io_workers": 1, "g3_bytes": 1 << 24,
            "admit_after": {"G2": 1, "G3": 1}, **kw}  # fmt: skip
    cfg = StoreConfig(g2_bytes=16 * BLOCK_BYTES, g3_dir=tmp_path / "g3", codec=codec,
                      sweep_interval_s=0, probe_tiers=False, **opts)  # fmt: skip
    store = ContextStore(cfg, keyring=KR)
    store.configure_blocks(SHAPE, torch.bfloat16)
    end = time.monotonic() + 90
    while wait and store.write_procs and not store.write_procs.fits(BLOCK_BYTES):
        assert time.monotonic() < end, "the write process did not start in 90 s"
        time.sleep(0.05)
    return store


def put(store: ContextStore, ks: list[bytes], seed0: int = 0) -> None:
    for i, k in enumerate(ks):
        store.put(k, None, A, block(seed0 + i), 16)
    assert store.flush()


def no_encoding_here(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("encoded in the engine's process")

    monkeypatch.setattr(writedown_mod, "encode_object", refuse)


def read_back(store: ContextStore, ks: list[bytes], seed0: int = 0) -> None:
    store.g2.clear()
    dst = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in ks]
    assert store.load_into(ks, A, dst) == ["G3"] * len(ks)
    assert all(torch.equal(d, block(seed0 + i)) for i, d in enumerate(dst))


def tier_files(store: ContextStore) -> tuple[int, int, list]:
    """(objects, their bytes, temp files left) of G3."""
    g3 = store.tier("G3")
    objs = list(g3.list())
    return len(objs), sum(o.size for o in objs), list(g3.tmp.iterdir())


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_blocks_written_down_by_a_write_process_read_back_equal(tmp_path, monkeypatch, codec):
    """Encoded in the process (not here), the objects open with their tenant's key only,
    owner-only files; a run's objects are reserved in one ledger update."""
    store = new_store(tmp_path, codec, io_batch=8)
    try:
        no_encoding_here(monkeypatch)  # fails if the write-down encodes in this process
        g3 = store.tier("G3")
        updates = []
        real = g3._write_ledger
        monkeypatch.setattr(g3, "_write_ledger", lambda led: (updates.append(1), real(led)))
        ks = chain(8)
        store.put_many(ks, [None] * 8, A, [block(i) for i in range(8)], 16)
        assert store.flush()
        procs = store.write_procs
        assert procs.served == 8 and len(updates) == procs.requests < 8
        assert store.metrics.total("writedown", tier="G3", outcome="written") == 8
        n, nbytes, tmp = tier_files(store)
        assert n == 8 and not tmp
        assert g3.used() == nbytes  # the ledger holds what was renamed in
        assert store.writes.write_rate["G3"] > 0  # the processes' writes are timed
        assert g3.path(tenant_id(A), ks[0]).stat().st_mode & 0o777 == 0o600
        store.g2.clear()
        b = keys.tenant_scope(b"server-secret", "tenant-b")
        assert store.get(ks[0], b) is None  # another tenant's scope finds nothing
        read_back(store, ks)
    finally:
        store.close()


def kill(store: ContextStore) -> None:
    proc = store.write_procs._procs[0]
    os.kill(proc.popen.pid, signal.SIGKILL)
    proc.popen.wait(10)


def test_a_write_process_that_dies_is_counted_and_its_blocks_written_here(tmp_path):
    store = new_store(tmp_path)
    try:
        kill(store)
        ks = chain(3)
        put(store, ks)  # the first run written in this process instead
        assert store.metrics.total("errors", tier="write", op="write_process") == 1
        assert store.metrics.total("writedown", tier="G3", outcome="written") == 3
        served = store.write_procs.served
        assert served < 3
        more = chain(2, start=3)
        put(store, more, seed0=3)  # a new process serves the next runs
        assert store.write_procs.served == served + 2
        assert not tier_files(store)[2]
        read_back(store, ks + more)
    finally:
        store.close()


def test_write_processes_that_cannot_start_leave_writes_in_this_process(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.executable", "/bin/false")  # exits at once: no "ready"
    store = new_store(tmp_path, wait=False)
    try:
        assert not store.write_procs.fits(BLOCK_BYTES)  # starts them
        store.write_procs._procs[0].popen.wait(10)
        ks = chain(2)
        put(store, ks)
        assert store.metrics.total("errors", tier="write", op="start") == 1
        assert store.metrics.total("writedown", tier="G3", outcome="written") == 2
        read_back(store, ks)
    finally:
        store.close()


def test_an_object_the_tier_cannot_take_leaves_no_temp_file(tmp_path, monkeypatch):
    """The ledger reserves an object's bytes once its process has written it: one too big
    for the tier is refused then, and its temp file goes."""
    store = new_store(tmp_path, g3_bytes=BLOCK_BYTES // 2)
    try:
        no_encoding_here(monkeypatch)
        put(store, chain(2))
        assert store.write_procs.served == 2
        assert store.metrics.total("writedown", tier="G3", outcome="too_big") == 2
        assert tier_files(store) == (0, 0, [])
        assert store.tier("G3").used() == 0
    finally:
        store.close()


def test_a_write_process_that_cannot_write_turns_the_tier_off(tmp_path, monkeypatch):
    store = new_store(tmp_path)
    try:
        no_encoding_here(monkeypatch)
        g3 = store.tier("G3")
        g3.tmp.rmdir()  # its temp files cannot be created
        put(store, chain(1))
        assert store.write_procs.served == 1
        assert not g3.up
        assert store.metrics.total("writes_dropped", tier="G3", reason="error") == 1
        assert g3.used() == 0  # nothing reserved for it
    finally:
        store.close()


def test_shutdown_write_down_goes_through_the_write_processes(tmp_path, monkeypatch):
    store = new_store(tmp_path, admit_after={"G2": 1, "G3": 2})  # one sighting: G2 only
    ks = chain(4)
    put(store, ks)
    assert tier_files(store)[0] == 0
    no_encoding_here(monkeypatch)
    assert store.settle() == 4  # at shutdown G2 goes down to G3, within its capacity
    assert store.write_procs.served == 4
    store.close()
    again = new_store(tmp_path, write_procs=0)
    try:
        assert again.contains(ks, A) == ["G3"] * 4
        read_back(again, ks)
    finally:
        again.close()


def test_write_procs_must_not_be_negative():
    with pytest.raises(ValueError, match="write_procs"):
        StoreConfig(write_procs=-1).validate()


def test_write_processes_by_default_one_per_writer_where_there_are_cpus_to_spare(monkeypatch):
    for cpus, workers, n in ((2, 4, 0), (7, 4, 0), (8, 4, 4), (16, 2, 2), (128, 8, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, c=cpus: set(range(c)))
        assert StoreConfig(io_workers=workers).write_procs_here() == n
        assert StoreConfig(write_procs=3).write_procs_here() == 3
        assert StoreConfig(write_procs=0).write_procs_here() == 0
