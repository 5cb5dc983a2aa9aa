"""The engine-facing connector: save/load of kv_cache blocks, load-vs-recompute, events,
the real engine reusing blocks from the store, layer-by-layer landing of G2 prefixes, and
the `kvgrid store` command."""

from __future__ import annotations

import os

import pytest
import torch

from kvgrid import keys
from kvgrid.events import BlockRemoved, BlockStored
from kvgrid.store import ContextStore, StoreConfig, StoreConnector
from kvgrid.store.crypto import KeyRing
from kvgrid.store.landing import land_layers
from kvgrid.store.load_plan import SPLIT_OVERHEAD_S, LoadPlan
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
    # G3 at 50 ms a block (a slow disk, so that splits are worth their fixed overhead); the
    # start-up probe off, so that the planner starts from these figures
    store = make(tmp_path, seed_bytes_per_s={"G2": 10e9, "G3": 2048 / 0.05}, probe_tiers=False)
    src = kv_cache()
    conn = StoreConnector(store, src, BS)
    ks = keys.block_keys(list(range(BS * 8)), MODEL.with_tenant(A), BS)
    conn.save(ks, [None, *ks[:-1]], A, list(range(8)))
    store.flush()
    for k in ks[4:]:  # blocks 4.. now only on disk
        store.g2.delete(tenant_id(A), k)
    assert store.contains(ks, A) == ["G2"] * 4 + ["G3"] * 4
    assert conn.lookup(ks, A, 0) == 8  # prefill speed unknown: offer all that is stored
    assert conn.load_plan(A, 8).compute_blocks == 0
    assert conn.lookup(ks, A, 3) == 5  # only keys after the G1 hits
    g2_s, g3_s = conn.block_load_seconds("G2"), conn.block_load_seconds("G3")
    assert g2_s < 1e-3 and g3_s == pytest.approx(0.0502)
    # recompute slower than either tier: load everything, no split
    conn.prefill_tokens_per_s = BS / (10 * g3_s)
    assert conn.lookup(ks, A, 0) == 8
    assert conn.load_plan(A, 8).compute_blocks == 0
    # recompute between the tiers (30 ms a block): the G2 blocks pay off; the G3 ones, even
    # split (recompute 5 while 3 load: 170 ms), lose to recomputing them (4 x 30 ms)
    conn.prefill_tokens_per_s = BS / 0.03
    assert conn.lookup(ks, A, 0) == 4
    assert conn.load_plan(A, 4) == LoadPlan(0, 4, pytest.approx(4 * g2_s), pytest.approx(4 * g2_s))
    # a prefix only on the slow disk, recompute faster than loading (40 vs 50 ms a block):
    # recompute the first 4 while the last 4 load, 200 ms, beats both 320 and 400 ms
    for k in ks[:4]:
        store.g2.delete(tenant_id(A), k)
    conn.prefill_tokens_per_s = BS / 0.04
    assert conn.lookup(ks, A, 0) == 8
    plan = conn.load_plan(A, 8)
    assert (plan.compute_blocks, plan.load_blocks) == (4, 4)
    assert plan.expected_s == pytest.approx(max(SPLIT_OVERHEAD_S + 4 * 0.04, 4 * g3_s))
    assert plan.expected_s < min(8 * 0.04, 8 * g3_s)
    assert conn.load_seconds_per_block(A) == pytest.approx(g3_s)
    # the same, the load starting 100 ms after it is planned (the engine launching a step
    # first): recompute 5 (220 ms) while 3 load (100 + 150 ms), against 4/4 at 260 ms
    conn.load_start_s = 0.1
    assert conn.lookup(ks, A, 0) == 8
    plan = conn.load_plan(A, 8)
    assert (plan.compute_blocks, plan.load_blocks) == (5, 3)
    assert plan.expected_s == pytest.approx(0.1 + 3 * g3_s)
    conn.load_start_s = 0.0
    # recompute faster than any tier: recompute it all
    conn.save(ks, [None, *ks[:-1]], A, list(range(8)))
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
    if tier == "G2" and eng.device.type == "cuda":
        # written back on the side stream while the next forward went on (and overwrote them)
        assert store.metrics.total("writebacks", mode="async") >= 4
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
    assert "would remove" in capsys.readouterr().out and p.exists()  # reported, kept
    assert main(["store", "verify", "--dir", d, "--tenant", A.hex(), "--remove"]) == 1
    assert not p.exists()
    assert main(["store", "clear", "--dir", d]) == 2  # asks for --yes
    assert main(["store", "clear", "--dir", d, "--yes"]) == 0
    assert "removed 2 objects" in capsys.readouterr().out
    assert not list((tmp_path / "g3" / "objects").rglob("*.kvo"))


def _engine_with_store(tiny_model_dir, store, **kw):
    from kvgrid.engine.llm_engine import LLMEngine

    cfg = dict(model=str(tiny_model_dir("llama")), block_size=BS, num_kv_blocks=40,
               max_num_batched_tokens=256)  # fmt: skip
    cfg.update(kw)
    eng = LLMEngine(**cfg)
    conn = StoreConnector(store, eng.runner.kv_cache, BS)
    eng.attach_store(conn)
    return eng, conn


@pytest.mark.parametrize("write_through", [True, False])
def test_write_through_saves_after_prefill_without_eviction(
    tmp_path, tiny_model_dir, write_through
):
    prompt = [(5 * i + 1) % 1000 + 10 for i in range(BS * 5 + 3)]
    store = make(tmp_path, write_through=write_through)
    eng, conn = _engine_with_store(tiny_model_dir, store)
    first, _ = _run(eng, "a", prompt, 4)
    eng.step()  # an idle step: the blocks named by the last one are saved before any forward
    store.flush()
    assert eng.block_manager.take_evictions() == []  # G1 (40 blocks) never evicted anything
    ks = keys.block_keys(prompt, eng.scope.digest, BS)
    if not write_through:  # paired: without it, nothing leaves G1 until an eviction
        assert conn.saved_blocks == 0 and store.contains(ks, keys.PUBLIC_TENANT)[0] is None
        store.close()
        return
    assert store.contains(ks, keys.PUBLIC_TENANT) == ["G2"] * 5
    assert conn.saved_blocks >= 5
    writes = store.writes.done
    assert writes >= 5 and store.metrics.total("bytes_in", tier="G3") == store.tier("G3").used()
    # G1 forgets the prompt; the store's copies (G2, then G3 alone) give the same output
    for tier in ("G2", "G3"):
        assert eng.block_manager.reset_prefix_cache()
        if tier == "G3":
            store.g2.clear()
        hits = store.metrics.total("hits", tier=tier)
        again, cached = _run(eng, f"b-{tier}", prompt, 4)
        assert again == first and cached == BS * 5
        assert store.metrics.total("hits", tier=tier) == hits + 5
    # blocks loaded from the store are not written back again: G2 knows G3 holds them
    eng.step()
    store.flush()
    assert store.writes.done == writes
    assert store.g2.pinned_count() == 0
    store.close()


def test_queued_request_prefetches_its_prefix_into_g2(tmp_path, tiny_model_dir):
    prompt = [(3 * i + 7) % 1000 + 10 for i in range(BS * 6 + 1)]
    other = [(13 * i + 2) % 1000 + 10 for i in range(BS * 2)]
    cold, _ = _run(_engine_with_store(tiny_model_dir, make(tmp_path / "cold"))[0], "c", prompt, 5)
    store = make(tmp_path, write_through=True)
    eng, _ = _engine_with_store(tiny_model_dir, store, max_num_seqs=1)
    _run(eng, "warm", prompt, 2)
    eng.step()
    store.flush()
    assert eng.block_manager.reset_prefix_cache()
    store.g2.clear()  # the prompt's blocks are on disk (G3) only
    ks = keys.block_keys(prompt, eng.scope.digest, BS)
    assert store.contains(ks, keys.PUBLIC_TENANT) == ["G3"] * 6
    from kvgrid import SamplingParams

    eng.add_request("busy", other, SamplingParams(max_tokens=8, temperature=0))
    eng.add_request("queued", prompt, SamplingParams(max_tokens=5, temperature=0))
    eng.step()  # "busy" runs (max_num_seqs=1); "queued" waits, and its prefetch starts
    assert eng.stats()["num_waiting"] == 1
    store.flush()
    assert store.contains(ks, keys.PUBLIC_TENANT) == ["G2"] * 6  # up in G2 before admission
    assert store.metrics.total("hits", tier="G3") == 6
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    assert list(outs["queued"].outputs[0].token_ids) == cold
    assert outs["queued"].num_cached_tokens == BS * 6
    assert store.metrics.total("hits", tier="G2") >= 6  # the load was a G2 hit
    assert store.metrics.total("hits", tier="G3") == 6  # and read no disk again
    store.close()


def test_load_stops_at_its_deadline_and_keeps_what_landed(tmp_path):
    import time

    from kvgrid.store.disk_tier import DiskTier

    class SlowDisk(DiskTier):
        def get(self, tid, key, into=None):
            time.sleep(0.05)
            return super().get(tid, key, into)

    slow = SlowDisk(tmp_path / "g3", 1 << 30, "G3")
    cfg = StoreConfig(g2_bytes=1 << 20, sweep_interval_s=0, load_workers=1,
                      admit_after={"G2": 1, "G3": 1})  # fmt: skip
    store = ContextStore(cfg, keyring=KR, tiers=[slow])
    src = kv_cache(16)
    conn = StoreConnector(store, src, BS)
    ks = keys.block_keys(list(range(BS * 12)), MODEL.with_tenant(A), BS)
    conn.save(ks, [None, *ks[:-1]], A, list(range(12)))
    store.flush()
    store.g2.clear()
    dst = torch.zeros_like(src)
    reader = StoreConnector(store, dst, BS)
    n = reader.load(ks, A, list(range(12)), deadline=time.monotonic() + 0.12)
    assert 1 <= n < 12  # one reader at 50 ms a block: a few, not all twelve
    assert torch.equal(dst[:n], src[:n])
    assert store.metrics.total("misses", tier="G3", reason="deadline") == 1
    assert reader.load(ks, A, list(range(12))) == 12  # no deadline: all of them
    assert torch.equal(dst[:12], src[:12])
    store.flush()
    assert store.g2.pinned_count() == 0  # fetches the first load abandoned let go too
    store.close()


# ---- layer-by-layer landing (kvgrid.store.landing) ------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_reference_lands_every_layer_of_every_block():
    src, dst = kv_cache(8, seed=1), torch.zeros_like(kv_cache(8))
    order = [5, 0, 7, 2]
    landing = land_layers(src, order, dst, [0, 1, 2, 3])
    assert torch.equal(dst[:4], src[order]) and not dst[4:].any()
    assert landing.nbytes == 4 * src[0].nbytes
    landing.wait_layer(0)  # CPU copies are done already: waits are no-ops
    landing.wait_all()


def test_mismatched_blocks_are_refused_before_any_copy():
    a, b = kv_cache(4), torch.zeros_like(kv_cache(4))
    with pytest.raises(ValueError, match="sources for"):
        land_layers(a, [0], b, [0, 1])
    with pytest.raises(ValueError, match="do not match"):
        land_layers(a[:, :1], [0], b, [0])
    with pytest.raises(ValueError, match="out of range"):
        land_layers(a, [0, 4], b, [0, 1])
    with pytest.raises(ValueError, match="contiguous"):
        land_layers(a.transpose(0, 1).contiguous().transpose(0, 1), [0], b, [0])
    assert not b.any()


def test_engine_loads_a_g2_prefix_layer_by_layer_with_the_cold_output(tmp_path, tiny_model_dir):
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(BS * 6 + 5)]
    cold_eng, _ = _engine_with_store(tiny_model_dir, make(tmp_path / "cold"))
    cold, _ = _run(cold_eng, "cold", prompt, 6)
    store = make(tmp_path, write_through=True)
    eng, conn = _engine_with_store(tiny_model_dir, store)
    eng.scheduler.loader.layered = True
    layered = []
    inner = conn.load_layered
    conn.load_layered = lambda *a: layered.append(inner(*a)) or layered[-1]
    first, _ = _run(eng, "a", prompt, 6)
    store.flush()
    assert eng.block_manager.reset_prefix_cache()
    again, cached = _run(eng, "b", prompt, 6)
    assert first == cold and again == cold
    assert cached == BS * 6
    assert len(layered) == 1 and layered[0] is not None  # the layered path served it
    assert store.metrics.total("hits", tier="G2") == 6
    store.flush()
    store._landings.submit(lambda: None).result()  # the slot release runs after the landing
    assert store.g2.pinned_count() == 0
    # blocks not all in G2: nothing started, the block-by-block load serves them
    store.g2.clear()
    assert eng.block_manager.reset_prefix_cache()
    again, cached = _run(eng, "c", prompt, 6)
    assert again == cold and cached == BS * 6 and layered[-1] is None
    store.close()


def test_a_request_aborted_while_its_prefix_lands_frees_its_blocks(tmp_path, tiny_model_dir):
    from kvgrid import SamplingParams

    prompt = [(5 * i + 2) % 1000 + 10 for i in range(BS * 4 + 3)]
    store = make(tmp_path, write_through=True)
    eng, _ = _engine_with_store(tiny_model_dir, store)
    eng.scheduler.loader.layered = True
    _run(eng, "a", prompt, 2)
    assert eng.block_manager.reset_prefix_cache()
    free = eng.block_manager.num_free_blocks
    eng.add_request("b", prompt, SamplingParams(max_tokens=4, temperature=0))
    eng.scheduler.schedule()  # admitted: its load is submitted
    assert eng.abort_request("b")
    assert eng.block_manager.num_free_blocks == free
    assert not eng.has_unfinished_requests()
    store.close()


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
def test_triton_landing_matches_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    # 15-byte layers: the kernel falls back to byte words
    shape = (4, 2, BS, 2, 8) if dtype != torch.uint8 else (4, 1, 3, 1, 5)
    slab = (torch.rand((9, *shape), generator=g) * 100).to(dtype).pin_memory()
    g1 = torch.zeros((12, *shape), dtype=dtype, device="cuda")
    src_ids, dst_ids = [8, 1, 4, 5, 0], [3, 11, 0, 7, 6]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        landing = land_layers(slab, src_ids, g1, dst_ids)
    assert landing.num_layers == shape[0]
    landing.wait_all()
    got = g1.cpu()
    assert all(torch.equal(got[d], slab[s]) for s, d in zip(src_ids, dst_ids))
    assert int(sum(got[i].count_nonzero() for i in set(range(12)) - set(dst_ids))) == 0
    landing.synchronize()
    assert landing.device_seconds() > 0


@cuda
def test_triton_landing_refuses_pageable_sources():
    src = kv_cache(1)
    with pytest.raises(ValueError, match="pinned"):
        land_layers(src, [0], torch.zeros_like(src, device="cuda"), [0])


class _SlowConnector:
    """What KVLoader needs of a connector, recording when each load was hinted and began."""

    def __init__(self) -> None:
        from kvgrid.store.connector import EngineThreadTime

        self.engine_time = EngineThreadTime()
        self.started: list[float] = []
        self.hinted: list[float] = []
        self.start_delays: list[float] = []

    def will_load(self, keys, tenant) -> None:
        import time

        self.hinted.append(time.monotonic())

    def observe_load_start(self, seconds: float) -> None:
        self.start_delays.append(seconds)

    def load(self, keys, tenant, block_ids, deadline=None) -> int:
        import time

        self.started.append(time.monotonic())
        return len(keys)


def test_a_load_starts_once_the_engine_has_launched_its_step(monkeypatch):
    import time

    from kvgrid.engine import kv_loader

    conn = _SlowConnector()
    loader = kv_loader.KVLoader(conn, torch.device("cpu"), layered=False)
    fut = loader.submit([b"k1", b"k2"], b"", [1, 2], split=True)
    time.sleep(0.05)
    assert not conn.started and not fut.done()  # held while the step is still launching
    assert len(conn.hinted) == 1  # but the disk has been told to start reading
    t = time.monotonic()
    loader.step_launched()
    assert fut.result(timeout=5).blocks == 2 and conn.started[0] >= t
    assert conn.start_delays[0] >= 0.05  # measured: the planner counts it (load_start_s)
    # a load submitted with no step signalled after it still starts (bounded wait)
    monkeypatch.setattr(kv_loader, "LAUNCH_GATE_S", 0.01)
    assert loader.submit([b"k3"], b"", [3]).result(timeout=5).blocks == 1
    assert len(conn.start_delays) == 1  # only a split's start is the planner's business
    loader.close()


def test_engine_starts_a_prefix_load_after_launching_the_step_that_planned_it(
    tmp_path, tiny_model_dir, monkeypatch
):
    """A request is admitted with its prefix in G3 while another one decodes: the load
    starts only once the step that admitted it (the other's decode) has been launched."""
    import time

    from kvgrid import SamplingParams
    from kvgrid.engine.llm_engine import LLMEngine

    cfg = dict(model=str(tiny_model_dir("llama")), block_size=BS, num_kv_blocks=12,
               max_num_batched_tokens=256)  # fmt: skip
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(BS * 6 + 5)]
    other = [(11 * i + 5) % 1000 + 10 for i in range(BS * 8)]
    eng = LLMEngine(**cfg)
    store = make(tmp_path, g2_bytes=0)
    conn = StoreConnector(store, eng.runner.kv_cache, BS)
    eng.attach_store(conn)
    _run(eng, "a", prompt, 2)
    _run(eng, "b", other, 2)  # evicts the prompt's blocks to G3
    store.flush()
    events: list[str] = []
    launch, load, submit = eng._launch, conn.load, eng.scheduler.loader.submit

    def record(name, fn):
        def call(*a, **kw):
            if name != "launched":
                events.append(name)
            else:
                # a slow launch: a load the gate did not hold back would start during it
                time.sleep(0.05)
            out = fn(*a, **kw)
            if name == "launched":
                events.append(name)
            return out

        return call

    monkeypatch.setattr(eng, "_launch", record("launched", launch))
    monkeypatch.setattr(conn, "load", record("load", load))
    monkeypatch.setattr(eng.scheduler.loader, "submit", record("submit", submit))
    eng.add_request("d", [5, 6, 7], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    eng.step()
    eng.add_request("c", prompt, SamplingParams(max_tokens=2, temperature=0))
    cached = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == "c" and out.finished:
                cached = out.num_cached_tokens
    assert cached >= BS * 4 and store.metrics.total("hits", tier="G3") >= 1
    # the loader thread may start only after the engine has gone on to launch more steps,
    # so what is asserted is the order: the admitting step's launch, then the load
    i = events.index("submit")
    assert events[i + 1] == "launched", events[i - 1 : i + 4]
    assert "load" in events[i + 2 :], events[i - 1 :]
    store.close()


def test_deadline_moved_earlier_stops_a_waiting_load():
    import threading
    import time
    from concurrent.futures import Future
    from concurrent.futures import TimeoutError as FutureTimeout

    from kvgrid.store.load_plan import LoadDeadline

    done: Future = Future()
    done.set_result("x")
    assert LoadDeadline(time.monotonic() - 1).wait(done) == "x"  # ready: past deadline or not
    slow: Future = Future()
    threading.Timer(2.0, slow.set_result, ("late",)).start()
    ctl = LoadDeadline(time.monotonic() + 30)
    threading.Timer(0.05, setattr, (ctl, "at", time.monotonic() + 0.1)).start()
    t0 = time.monotonic()
    with pytest.raises(FutureTimeout):
        ctl.wait(slow)
    assert 0.08 < time.monotonic() - t0 < 1.0  # the moved deadline, not the first one
    assert LoadDeadline(None).wait(slow) == "late"  # no deadline: waits it out


@pytest.mark.parametrize("late_wait", [0.5, 1e9])
def test_a_load_behind_its_plan_is_cut_once_the_recomputed_part_is_done(
    tmp_path, tiny_model_dir, monkeypatch, late_wait
):
    """The store claims a fast disk, but each block takes 200 ms: once the engine has
    nothing left to compute, it waits at most half of what recomputing the blocks would
    take (6 x 50 ms), then recomputes them, with the cold run's tokens. Without that bound
    the load runs to its stall deadline (0.8 s)."""
    import time

    from kvgrid.engine import scheduler
    from kvgrid.store.disk_tier import DiskTier

    monkeypatch.setattr(scheduler, "LATE_LOAD_WAIT", late_wait)
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(BS * 6 + 5)]
    store = make(tmp_path, g2_bytes=0, load_workers=1)
    eng, conn = _engine_with_store(tiny_model_dir, store, num_kv_blocks=12)
    cold, _ = _run(eng, "a", prompt, 3)
    _run(eng, "b", [(11 * i + 5) % 1000 + 10 for i in range(BS * 10)], 2)  # evicts it to G3
    store.flush()
    get = DiskTier.get

    def slow_get(self, tid, key, into=None):
        time.sleep(0.2)
        return get(self, tid, key, into)

    monkeypatch.setattr(DiskTier, "get", slow_get)
    store.bandwidth["G3"] = 1e12  # what the planner believes
    conn.prefill_tokens_per_s = BS / 0.05
    t0, loaded = time.monotonic(), eng.scheduler.store_loaded_tokens
    tokens, _ = _run(eng, "c", prompt, 3)
    took, loaded = time.monotonic() - t0, eng.scheduler.store_loaded_tokens - loaded
    assert tokens == cold
    assert store.metrics.total("misses", tier="G3", reason="deadline") == 1
    if late_wait < 1:  # cut at 0.5 x (5 or 6) x 50 ms + 20 ms, before the first block landed
        assert took < 0.5 and loaded == 0, (took, loaded)
    else:  # cut at the stall deadline, (5 or 6) x 50 ms + 0.5 s, three blocks landed
        assert took > 0.7 and loaded >= 3 * BS, (took, loaded)
    store.close()
