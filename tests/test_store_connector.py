"""The engine-facing connector: save/load of kv_cache blocks, load-vs-recompute, events,
the real engine reusing blocks from the store, and the `kvgrid store` command."""

from __future__ import annotations

import os

import pytest
import torch

from kvgrid import keys
from kvgrid.events import BlockRemoved, BlockStored
from kvgrid.store import ContextStore, StoreConfig, StoreConnector
from kvgrid.store.crypto import KeyRing
from kvgrid.store.object import tenant_id

MODEL = keys.KVScope("test-model", "bfloat16")
A = keys.tenant_scope(b"server-secret", "tenant-a")
KR = KeyRing({1: os.urandom(32)})
BS = 16


def kv_cache(num_blocks: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num_blocks, 2, 2, BS, 2, 8), generator=g).to(torch.bfloat16)


def make(tmp_path, **kw) -> ContextStore:
    cfg = dict(g2_bytes=1 << 20, g3_dir=tmp_path / "g3", sweep_interval_s=0,
               admit_after={"G2": 1, "G3": 1, "G4": 1})  # fmt: skip
    cfg.update(kw)
    return ContextStore(StoreConfig(**cfg), keyring=KR)


def test_save_then_load_is_bit_exact_from_every_tier(tmp_path):
    store = make(tmp_path)
    src = kv_cache()
    conn = StoreConnector(store, src, BS)
    ks = keys.block_keys(list(range(BS * 6)), MODEL.with_tenant(A), BS)
    snapshot = src[:6].clone()
    conn.save(ks, [None, *ks[:-1]], A, list(range(6)))
    src[:6] = 0  # G1 reuses the blocks at once: save must already have read them
    store.flush()
    dst = torch.zeros_like(src)
    reader = StoreConnector(store, dst, BS)
    assert reader.lookup(ks, A, 0) == 6
    assert reader.load(ks, A, [11, 10, 9, 8, 7, 6]) == 6  # any block ids
    assert torch.equal(dst[6:12].flip(0), snapshot)
    store.g2.clear()  # now from disk (G3): verified, decrypted, promoted back to G2
    dst.zero_()
    assert store.contains(ks, A) == ["G3"] * 6
    assert reader.load(ks, A, list(range(6))) == 6
    assert torch.equal(dst[:6], snapshot)
    assert store.contains(ks, A) == ["G2"] * 6
    assert store.metrics.total("hits", tier="G3") == 6
    assert "G3" in reader.tier_bytes_per_s and store.bandwidth["G3"] > 0
    store.close()


def test_load_stops_at_the_first_bad_block(tmp_path):
    store = make(tmp_path, g2_bytes=0)
    src = kv_cache()
    conn = StoreConnector(store, src, BS)
    ks = keys.block_keys(list(range(BS * 5)), MODEL.with_tenant(A), BS)
    conn.save(ks, [None, *ks[:-1]], A, list(range(5)))
    store.flush()
    p = store.tier("G3").path(tenant_id(A), ks[2])
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    dst = torch.zeros_like(src)
    reader = StoreConnector(store, dst, BS)
    assert reader.load(ks, A, list(range(5))) == 2  # the engine recomputes from block 2
    assert torch.equal(dst[:2], src[:2])
    assert store.metrics.total("integrity_failures", tier="G3", kind="checksum") == 1
    store.close()


def test_lookup_weighs_load_against_recompute(tmp_path):
    store = make(tmp_path, seed_bytes_per_s={"G2": 10e9, "G3": 1e9})
    src = kv_cache()
    conn = StoreConnector(store, src, BS)
    ks = keys.block_keys(list(range(BS * 8)), MODEL.with_tenant(A), BS)
    conn.save(ks, [None, *ks[:-1]], A, list(range(8)))
    store.flush()
    for k in ks[4:]:  # blocks 4.. now only on disk
        store.g2.delete(tenant_id(A), k)
    assert store.contains(ks, A) == ["G2"] * 4 + ["G3"] * 4
    assert conn.lookup(ks, A, 0) == 8  # prefill speed unknown: offer all that is stored
    assert conn.lookup(ks, A, 3) == 5  # only keys after the G1 hits
    g2_s, g3_s = conn.block_load_seconds("G2"), conn.block_load_seconds("G3")
    assert g2_s < g3_s
    # recompute slower than either tier: load everything
    conn.prefill_tokens_per_s = BS / (10 * g3_s)
    assert conn.lookup(ks, A, 0) == 8
    # recompute between the tiers: G2 blocks pay off, and G3 blocks only while the
    # savings of the G2 blocks cover them (cumulative load < cumulative recompute)
    recompute = g2_s + 0.3 * (g3_s - g2_s)  # covers 4 * 0.3 / 0.7 = 1.7 G3 blocks
    conn.prefill_tokens_per_s = BS / recompute
    n = conn.lookup(ks, A, 0)
    assert n == 5
    assert sum([g2_s] * 4 + [g3_s] * (n - 4)) < n * recompute
    assert conn.load_seconds_per_block(A) == pytest.approx((4 * g2_s + (n - 4) * g3_s) / n)
    # recompute faster than any tier: recompute it all
    conn.prefill_tokens_per_s = BS / (g2_s / 10)
    assert conn.lookup(ks, A, 0) == 0
    store.close()


def test_events_name_the_tiers(tmp_path):
    store = make(tmp_path, g2_bytes=3 * 2048)
    src = kv_cache()
    conn = StoreConnector(store, src, BS)
    ks = keys.block_keys(list(range(BS * 6)), MODEL.with_tenant(A), BS)
    for lo in (0, 3):  # G2 holds 3 blocks: the second batch evicts from it
        conn.save(ks[lo : lo + 3], [ks[lo - 1] if lo else None, *ks[lo : lo + 2]], A, [0, 1, 2])
        store.flush()
    ev = conn.drain_events()
    stored = {(e.keys[0], e.tier) for e in ev if isinstance(e, BlockStored)}
    assert {(k, "G3") for k in ks} <= stored
    assert all(e.token_count == BS for e in ev if isinstance(e, BlockStored))
    parents = {e.keys[0]: e.parent_key for e in ev if isinstance(e, BlockStored)}
    assert parents[ks[3]] == ks[2] and parents[ks[0]] is None
    removed = [e for e in ev if isinstance(e, BlockRemoved)]
    assert removed and all(e.tier == "G2" for e in removed)
    assert conn.drain_events() == []
    store.close()


def _run(engine, rid: str, prompt: list[int], n: int) -> tuple[list[int], int]:
    from kvgrid import SamplingParams

    engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                final = out
    return list(final.outputs[0].token_ids), final.num_cached_tokens


@pytest.mark.parametrize("tier", ["G2", "G3"])
def test_engine_reuses_evicted_blocks_with_cold_run_output(tmp_path, tiny_model_dir, tier):
    from kvgrid.engine.llm_engine import LLMEngine

    model = str(tiny_model_dir("llama"))
    cfg = dict(model=model, block_size=BS, num_kv_blocks=10, max_num_batched_tokens=256)
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(BS * 6 + 5)]
    other = [(11 * i + 5) % 1000 + 10 for i in range(BS * 8)]
    cold, _ = _run(LLMEngine(**cfg), "cold", prompt, 6)

    eng = LLMEngine(**cfg)
    store = make(tmp_path, g2_bytes=(1 << 20) if tier == "G2" else 0)
    conn = StoreConnector(store, eng.runner.kv_cache, BS)
    eng.attach_store(conn)
    first, _ = _run(eng, "a", prompt, 6)
    _run(eng, "b", other, 2)  # G1 has 10 blocks: this evicts the prompt's blocks
    store.flush()
    assert conn.saved_blocks >= 4
    again, cached = _run(eng, "c", prompt, 6)
    assert first == cold and again == cold  # loaded KV gives exactly the cold output
    assert cached >= BS * 6
    assert eng.stats()["store_loaded_tokens"] >= BS * 4
    assert store.metrics.total("hits", tier=tier) >= 4
    store.close()


def test_store_cli(tmp_path, monkeypatch, capsys):
    from kvgrid.cli import main

    monkeypatch.setenv("KVGRID_MASTER_KEY", "1:" + KR.masters[1].hex())
    store = make(tmp_path, g2_bytes=0)
    conn = StoreConnector(store, kv_cache(), BS)
    ks = keys.block_keys(list(range(BS * 3)), MODEL.with_tenant(A), BS)
    conn.save(ks, [None, *ks[:-1]], A, [0, 1, 2])
    store.close()
    d = str(tmp_path / "g3")
    assert main(["store", "stats", "--dir", d]) == 0
    assert "G3" in capsys.readouterr().out
    assert main(["store", "ls", "--dir", d]) == 0
    assert ks[0].hex()[:14] in capsys.readouterr().out
    assert main(["store", "verify", "--dir", d, "--tenant", A.hex()]) == 0
    p = next((tmp_path / "g3" / "objects").rglob("*.kvo"))
    data = bytearray(p.read_bytes())
    data[-3] ^= 1
    p.write_bytes(bytes(data))
    assert main(["store", "verify", "--dir", d, "--tenant", A.hex()]) == 1
    assert main(["store", "clear", "--dir", d]) == 2  # asks for --yes
    assert main(["store", "clear", "--dir", d, "--yes"]) == 0
    assert "removed 2 objects" in capsys.readouterr().out
    assert not list((tmp_path / "g3" / "objects").rglob("*.kvo"))
