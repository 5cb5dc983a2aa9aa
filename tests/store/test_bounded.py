"""Bounded waits: a lease that runs out under a reader never frees its slots before the
read ends; a tier read that never returns is cut by the load's deadline, and the engine
recomputes what did not arrive (same tokens as a cold run)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from kvgrid import keys
from kvgrid.store import ContextStore, StoreConfig
from kvgrid.store.crypto import KeyRing
from kvgrid.store.disk_tier import DiskTier
from kvgrid.store.lease import LeaseExpired
from kvgrid.store.object import tenant_id

SCOPE = keys.KVScope("test-model", "bfloat16")
A = keys.tenant_scope(b"server-secret", "tenant-a")
SHAPE = (2, 2, 16, 2, 8)
BLOCK_BYTES = 2 * 2 * 16 * 2 * 8 * 2
KR = KeyRing({1: os.urandom(32)})
BS = 16


def block(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def chain(n: int, start: int = 0) -> list[bytes]:
    return keys.block_keys(list(range(start, start + 16 * n)), SCOPE.with_tenant(A), 16)


def test_a_lease_that_expires_mid_read_keeps_its_slots_until_the_read_ends():
    store = ContextStore(
        StoreConfig(g2_bytes=6 * BLOCK_BYTES, sweep_interval_s=0, lease_timeout_s=5.0),
        keyring=KR,
    )
    ks = chain(2)
    for i, k in enumerate(ks):
        store.put(k, None, A, block(i), 16)
    lease = store.lease(ks, A, timeout_s=0.05)
    assert len(lease) == 2
    with lease.use() as slots:
        first = slots[0].clone()  # the reader has read part of what it leased...
        time.sleep(0.1)  # ...its lease runs out...
        others = chain(18, start=1000)
        for i, k in enumerate(others):  # ...and G2 fills to 3x its capacity (reaping)
            store.put(k, None, A, block(100 + i), 16)
        second = slots[1].clone()  # ...then it reads the rest
    assert torch.equal(first, block(0)) and torch.equal(second, block(1))
    assert store.leases.expired == 1 and store.leases.expired_in_use == 1
    assert store.stats()["pinned_blocks"] == 0  # released when the read ended
    with pytest.raises(LeaseExpired), lease.use():
        pass
    store.put(chain(1, start=5000)[0], None, A, block(7), 16)
    assert store.contains(ks, A) == [None, None]  # evictable once nobody reads them
    store.close()


def _generate(engine, rid: str, prompt: list[int], n: int, limit_s: float) -> list[int]:
    from kvgrid import SamplingParams

    engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0))
    end = time.monotonic() + limit_s
    final = None
    while engine.has_unfinished_requests():
        assert time.monotonic() < end, f"request {rid} still waiting after {limit_s}s"
        for out in engine.step():
            if out.finished:
                final = out
    return list(final.outputs[0].token_ids)


def test_a_stuck_tier_read_is_cut_by_the_load_deadline_and_recomputed(tmp_path, tiny_model_dir):
    """One stored object turns into a FIFO: opening it blocks for good, as a read from a
    hung network mount does. The engine has not measured its prefill speed yet (the load's
    deadline is then a few times its prediction): the request must still finish, with the
    tokens of a cold run, its first blocks loaded and the rest recomputed."""
    from kvgrid.engine.llm_engine import LLMEngine

    model = str(tiny_model_dir("llama"))
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(BS * 6 + 5)]
    cfg = dict(model=model, block_size=BS, num_kv_blocks=40, max_num_batched_tokens=256)
    admit = {"G2": 1, "G3": 1, "G4": 1}
    store_cfg = StoreConfig(
        g2_bytes=0,
        g3_dir=tmp_path / "g3",
        sweep_interval_s=0,
        write_through=True,
        admit_after=admit,
    )
    first = LLMEngine(**cfg, kv_store=store_cfg)
    cold = _generate(first, "cold", prompt, 6, 60)
    first.close()  # flushes the write-through copies to G3

    eng = LLMEngine(**cfg, kv_store=store_cfg)
    assert eng.prefill_tokens_per_s is None
    g3: DiskTier = eng.connector.store.tier("G3")
    ks = keys.block_keys(prompt, eng.scope.with_tenant(keys.PUBLIC_TENANT).digest, BS)
    assert all(t == "G3" for t in eng.connector.store.contains(ks, keys.PUBLIC_TENANT))
    stuck = g3.path(tenant_id(keys.PUBLIC_TENANT), ks[2])
    stuck.unlink()
    os.mkfifo(stuck)
    try:
        t0 = time.monotonic()
        out = _generate(eng, "warm", prompt, 6, 30)
        assert time.monotonic() - t0 < 15
        assert out == cold
        assert eng.connector.store.metrics.total("misses", reason="deadline") >= 1
        assert eng.connector.loaded_blocks == 2  # the blocks before the stuck one
    finally:
        # let the fetch thread still blocked in open() go: it reads an empty object (a miss)
        fd = os.open(stuck, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    done = threading.Event()
    threading.Thread(target=lambda: (eng.close(), done.set()), daemon=True).start()
    assert done.wait(30)
