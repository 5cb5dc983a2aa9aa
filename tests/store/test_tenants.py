"""Tenant isolation on every tier, and a shared tier (Redis) going away mid-run."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from kvgrid import keys
from kvgrid.store import ContextStore, StoreConfig
from kvgrid.store.crypto import KeyRing
from kvgrid.store.object import tenant_id

MODEL = keys.KVScope("test-model", "bfloat16")
A = keys.tenant_scope(b"server-secret", "tenant-a")
B = keys.tenant_scope(b"server-secret", "tenant-b")
SHAPE = (2, 2, 16, 2, 8)
KR = KeyRing({1: os.urandom(32)})


def block(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def store_for(kind: str, tmp_path, redis_url: str | None = None) -> ContextStore:
    cfg = dict(g2_bytes=0, admit_after={"G2": 1, "G3": 1, "G4": 1}, sweep_interval_s=0)
    if kind == "G2":
        cfg["g2_bytes"] = 1 << 20
    elif kind == "G3":
        cfg.update(g3_dir=tmp_path / "g3")
    elif kind == "G4-fs":
        cfg.update(g4_dir=tmp_path / "g4")
    else:
        cfg.update(g4_redis=redis_url, g4_prefix=f"iso{uuid.uuid4().hex[:8]}:")
    return ContextStore(StoreConfig(**cfg), keyring=KR)


@pytest.mark.parametrize("kind", ["G2", "G3", "G4-fs", "G4-redis"])
def test_a_tenant_never_hits_another_tenants_blocks(kind, tmp_path, request):
    url = request.getfixturevalue("redis_server") if kind == "G4-redis" else None
    store = store_for(kind, tmp_path, url)
    tier = kind[:2]
    tokens = list(range(16 * 4))  # the same prompt for both tenants
    ka = keys.block_keys(tokens, MODEL.with_tenant(A), 16)
    kb = keys.block_keys(tokens, MODEL.with_tenant(B), 16)
    assert set(ka).isdisjoint(kb)  # the tenant scope is in every key
    for i, k in enumerate(ka):
        store.put(k, ka[i - 1] if i else None, A, block(i), 16)
    store.flush()
    # paired: the owner hits, the other tenant misses, for the same prompt ...
    assert store.contains(ka, A) == [tier] * 4
    assert store.contains(kb, B) == [None] * 4
    assert torch.equal(store.get(ka[2], A), block(2))
    assert store.get(kb[2], B) is None
    # ... and even when B asks for A's exact key bytes: objects are stored per tenant
    assert store.contains(ka, B) == [None] * 4
    assert store.get(ka[2], B) is None
    assert store.metrics.total("hits", tenant=tenant_id(B).hex()[:12]) == 0
    assert store.metrics.total("hits", tenant=tenant_id(A).hex()[:12]) == 1
    # B storing the same key bytes does not replace or reveal A's object
    store.put(ka[0], None, B, block(99), 16)
    store.flush()
    assert torch.equal(store.get(ka[0], A), block(0))
    assert torch.equal(store.get(ka[0], B), block(99))
    store.close()


def test_redis_going_away_keeps_serving_from_other_tiers(tmp_path, redis_factory):
    proc, url = redis_factory()
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    cfg = StoreConfig(g2_bytes=4 * 2048, g3_dir=tmp_path / "g3", g4_redis=url, redis_retry_s=0.5,
                      admit_after={"G2": 1, "G3": 1, "G4": 1}, sweep_interval_s=0)  # fmt: skip
    store = ContextStore(cfg, registry=reg, keyring=KR)
    ks = keys.block_keys(list(range(16 * 12)), MODEL.with_tenant(A), 16)
    for i, k in enumerate(ks):
        store.put(k, None, A, block(i), 16)
    store.flush()
    g4 = store.tier("G4")
    assert g4.used() > 0
    store.tier("G3").clear()  # only G2 (a few blocks) and Redis hold them now
    assert store.get(ks[0], A) is not None  # from Redis, promoted into G2
    where = store.contains(ks, A)
    assert set(where) == {"G2", "G4"}
    in_g2 = [i for i, t in enumerate(where) if t == "G2"]
    only_g4 = [i for i, t in enumerate(where) if t == "G4"]
    assert 0 in in_g2 and len(only_g4) >= 6
    proc.kill()
    proc.wait()
    # Redis is gone: no exception escapes, G2 keeps serving, Redis reads are misses
    for i in in_g2:
        assert torch.equal(store.get(ks[i], A), block(i))
    assert store.get(ks[only_g4[0]], A) is None
    assert store.contains(ks, A)[: only_g4[0] + 1] == [*where[: only_g4[0]], None]
    store.put(ks[5], None, A, block(5), 16)  # writes do not raise either
    store.flush()
    st = store.stats()
    assert st["tiers"]["G4"]["up"] is False
    assert reg.get_sample_value("kvgrid_store_backend_up", {"tier": "G4", "backend": "redis"}) == 0
    assert reg.get_sample_value("kvgrid_store_backend_up", {"tier": "G3", "backend": "disk"}) == 1
    assert store.metrics.total("misses", tier="G4", reason="backend_down") >= 1
    assert g4.errors >= 1
    # the same engine-facing path works too
    out = torch.zeros(SHAPE, dtype=torch.bfloat16)
    assert store.load_into([ks[5]], A, [out]) == ["G2"] and torch.equal(out, block(5))
    store.close()
