"""Degrade, do not die: a full or read-only directory, a damaged ledger, a lock held by a
stopped process or a bad key file turn a tier off (log line, metric) while the store keeps
serving from its other tiers; read-only commands never change a store.

Full and read-only directories are real (a small tmpfs, remounted read-only: needs root)."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvgrid import keys
from kvgrid.chaos import disk
from kvgrid.store import ContextStore, StoreConfig
from kvgrid.store.crypto import KeyRing
from kvgrid.store.object import tenant_id

SCOPE = keys.KVScope("test-model", "bfloat16")
A = keys.tenant_scope(b"server-secret", "tenant-a")
SHAPE = (2, 2, 16, 2, 8)
KR = KeyRing({1: os.urandom(32)})


def block(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def chain(n: int, start: int = 0) -> list[bytes]:
    return keys.block_keys(list(range(start, start + 16 * n)), SCOPE.with_tenant(A), 16)


def make(g3: Path, **kw) -> ContextStore:
    cfg = dict(g2_bytes=1 << 20, g3_dir=g3, sweep_interval_s=0, disk_retry_s=0.2,
               admit_after={"G2": 1, "G3": 1, "G4": 1})  # fmt: skip
    cfg.update(kw)
    return ContextStore(StoreConfig(**cfg), keyring=kw.pop("keyring", KR))


def put_all(store: ContextStore, ks: list[bytes], start: int = 0) -> None:
    for i, k in enumerate(ks):
        store.put(k, None, A, block(start + i), 16)
    assert store.flush(30)


def tree(root: Path) -> dict[str, tuple]:
    """Every file and directory under ``root``: size, times (ns) and content hash (read
    without moving the access time, which the snapshot itself compares)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = "dir"
        if p.is_file():
            with open(os.open(p, os.O_RDONLY | os.O_NOATIME), "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_atime_ns, digest)
    return out


def test_read_only_commands_change_nothing_and_verify_removes_only_when_told(
    tmp_path, monkeypatch, capsys
):
    """`kvgrid store stats`/`ls`/`verify` on a store with damaged objects, a stale temp
    file and a damaged ledger leave every byte and every time stamp as they were (opening
    the store for stats must not delete damaged objects)."""
    from kvgrid.cli import main

    monkeypatch.setenv("KVGRID_MASTER_KEY", "1:" + KR.masters[1].hex())
    g3 = tmp_path / "g3"
    store = make(g3, g2_bytes=0)
    put_all(store, chain(8))
    store.close()
    files = disk.objects(g3)
    rng = random.Random(0)
    for kind in disk.DAMAGES:
        assert disk.damage(files, kind, rng)
    (g3 / "tmp" / "otherhost-123-abc.tmp").write_bytes(b"half an object")
    (g3 / "ledger.json").write_text("[]")
    before = tree(g3)
    d = str(g3)
    assert main(["store", "stats", "--dir", d]) == 0
    assert main(["store", "ls", "--dir", d]) == 0
    assert main(["store", "verify", "--dir", d, "--tenant", A.hex()]) == 1
    out = capsys.readouterr().out
    assert "would remove" in out and "--remove" in out
    assert tree(g3) == before
    assert main(["store", "verify", "--dir", d, "--tenant", A.hex(), "--remove"]) == 1
    assert len(disk.objects(g3)) < len(files)
    assert main(["store", "verify", "--dir", d, "--tenant", A.hex()]) == 0


@pytest.mark.parametrize("content", ["[]", '{"used": "x", "tenants": {}}',
                                     '{"used": 5, "tenants": {"ab": "cd"}}', "\udcff"])  # fmt: skip
def test_damaged_ledger_is_recounted_with_a_log_line_and_a_metric(tmp_path, content, caplog):
    g3 = tmp_path / "g3"
    store = make(g3)
    ks = chain(3)
    put_all(store, ks)
    ledger = g3 / "ledger.json"
    # damaged while the store runs: later writes must still succeed
    ledger.write_text(content, errors="surrogateescape")
    with caplog.at_level(logging.WARNING):
        put_all(store, chain(2, start=1000))
    assert "ledger" in caplog.text and "damaged" in caplog.text
    assert store.metrics.total("tier_faults", tier="G3", reason="ledger") == 1
    g3_tier = store.tier("G3")
    assert g3_tier.up
    assert g3_tier.created_many(tenant_id(A), chain(2, start=1000)) != [None, None]
    assert g3_tier.used() == sum(p.stat().st_size for p in disk.objects(g3))
    store.close()
    # damaged at rest: found and recounted when the tier opens
    ledger.write_text(content, errors="surrogateescape")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        store = make(g3)
    assert "damaged" in caplog.text
    assert store.metrics.total("tier_faults", tier="G3", reason="ledger") == 1
    assert torch.equal(store.get(ks[1], A), block(1))
    store.close()


def test_bad_master_key_turns_the_lower_tiers_off_and_the_engine_still_serves(
    tmp_path, monkeypatch, tiny_model_dir, caplog
):
    """A garbage key file made every worker crash-loop; now G3/G4 are off (stored KV leaves
    the process encrypted or not at all), G2 serves, and output equals recompute."""
    from kvgrid.engine.llm_engine import LLMEngine
    from kvgrid.engine.sampling_params import SamplingParams

    monkeypatch.delenv("KVGRID_MASTER_KEY", raising=False)
    monkeypatch.setenv("KVGRID_STORE_DIR", str(tmp_path))
    (tmp_path / "master.key").write_text("this is not a key\n")
    os.chmod(tmp_path / "master.key", 0o600)
    cfg = StoreConfig(g2_bytes=1 << 22, g3_dir=tmp_path / "g3", sweep_interval_s=0)
    with caplog.at_level(logging.ERROR):
        store = ContextStore(cfg)
    assert "master key" in caplog.text and "G3" in caplog.text
    st = store.stats()["tiers"]
    assert st["G3"]["up"] is False and st["G3"]["fault"] == "bad_key" and st["G2"]["up"]
    assert store.metrics.total("tier_faults", tier="G3", reason="bad_key") == 1
    store.close()

    model = str(tiny_model_dir("llama"))
    prompt = [(7 * i + 3) % 900 + 10 for i in range(100)]
    sp = SamplingParams(max_tokens=6, temperature=0)
    ref = LLMEngine(model=model, block_size=16, num_kv_blocks=40)
    eng = LLMEngine(model=model, block_size=16, num_kv_blocks=40, kv_store=cfg)
    assert eng.connector.store.lower == []
    for e in (ref, eng):
        e.add_request("r", prompt, sp)
        while e.has_unfinished_requests():
            out = e.step()
        e.last = out[-1].outputs[0].token_ids
    assert eng.last == ref.last
    eng.close()


def test_full_disk_at_start_turns_g3_off_then_it_comes_back(tmpfs, caplog):
    fs = tmpfs(256 * 1024)
    filler = disk.fill(fs)
    with caplog.at_level(logging.WARNING):
        store = make(fs / "g3")  # must not raise OSError (ENOSPC): the worker would crash-loop
    g3 = store.tier("G3")
    assert g3.fault == "disk_full" and not g3.up
    assert "G3 (disk) off: disk_full" in caplog.text
    assert store.metrics.total("tier_faults", tier="G3", reason="disk_full") == 1
    ks = chain(3)
    put_all(store, ks)  # G2 takes them; G3 writes are dropped
    assert store.contains(ks, A) == ["G2"] * 3
    filler.unlink()
    time.sleep(0.3)  # disk_retry_s
    assert g3.up and g3.fault is None
    assert "is back" in caplog.text
    put_all(store, chain(2, start=500))
    assert g3.created_many(tenant_id(A), chain(2, start=500)) != [None, None]
    store.close()


def test_disk_full_and_read_only_at_runtime_turn_g3_off_and_g2_serves(tmpfs, caplog):
    fs = tmpfs(1 << 20)
    store = make(fs / "g3")
    g3 = store.tier("G3")
    put_all(store, chain(2))
    assert g3.up
    filler = disk.fill(fs)
    with caplog.at_level(logging.WARNING):
        put_all(store, chain(4, start=100))
    assert g3.fault == "disk_full"
    assert store.stats()["tiers"]["G3"]["fault"] == "disk_full"
    assert store.contains(chain(4, start=100), A) == ["G2"] * 4  # served from G2
    filler.unlink()
    time.sleep(0.3)
    assert g3.up
    disk.remount(fs, "ro")
    try:
        put_all(store, chain(2, start=200))
        assert g3.fault == "read_only"
        assert store.metrics.total("tier_faults", tier="G3", reason="read_only") == 1
        store.g2.clear()
        assert store.get(chain(2)[0], A) is None  # off: a miss, the engine recomputes
    finally:
        disk.remount(fs, "rw")
    time.sleep(0.3)
    store.g2.clear()
    assert torch.equal(store.get(chain(2)[0], A), block(0))  # back, and its data intact
    store.close()


def test_a_lock_held_by_a_stopped_process_is_waited_for_a_bounded_time(tmp_path):
    """A writer stopped (SIGSTOP) while holding the ledger lock must not block every other
    writer of the directory for good: each waits lock_timeout_s, then the tier is off."""
    g3 = tmp_path / "g3"
    store = make(g3, lock_timeout_s=0.3)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(g3 / '.lock')!r}, os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGSTOP)
        done = threading.Event()
        t0 = time.monotonic()

        def write():
            put_all(store, chain(2))
            done.set()

        threading.Thread(target=write, daemon=True).start()
        assert done.wait(10), "a write waited for the lock without a deadline"
        assert time.monotonic() - t0 < 5
        assert store.tier("G3").fault == "timeout"
        assert store.contains(chain(2), A) == ["G2", "G2"]
    finally:
        holder.kill()
        holder.wait()
    store.close()


def test_a_full_redis_refuses_writes_but_keeps_serving_reads(redis_factory):
    """A Redis at its maxmemory refuses writes; that is not the same as unreachable (the
    tier stays on and its reads still hit)."""
    import redis

    _, url = redis_factory()
    store = ContextStore(
        StoreConfig(g2_bytes=0, g4_redis=url, g4_bytes=1 << 30, sweep_interval_s=0,
                    admit_after={"G2": 1, "G3": 1, "G4": 1}),
        keyring=KR,
    )  # fmt: skip
    ks = chain(3)
    put_all(store, ks)
    r = redis.Redis.from_url(url)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 1024)
    more = chain(4, start=300)
    put_all(store, more)
    g4 = store.tier("G4")
    assert g4.up and g4.fault is None
    assert store.metrics.total("writes_dropped", tier="G4", reason="refused") >= 1
    assert torch.equal(store.get(ks[2], A), block(2))  # reads go on
    store.close()
