"""The engine-facing connector: save/load of kv_cache blocks, load-vs-recompute, events,
the real engine reusing blocks from the store, write-through, queue prefetches, load
deadlines, and the `kvgrid store` command."""

from __future__ import annotations

import time
from unittest import mock

import pytest
import torch

from kvgrid import keys
from kvgrid.events import BlockRemoved, BlockStored
from kvgrid.store import ContextStore, StoreConfig, StoreConnector, connector
from kvgrid.store.connector import LOAD_START_HALF_LIFE_S as HALF_LIFE
from kvgrid.store.load_plan import SPLIT_OVERHEAD_S, LoadDeadline, LoadPlan, short_load_reason
from kvgrid.store.object import tenant_id
from tests.support.store_engine import (
    BS,
    KR,
    MODEL,
    A,
    engine_with_store,
    kv_cache,
    make,
    run_request,
)


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
    conn.observe_load_start(0.2)  # the EWMA's half of it, from 0
    assert conn.lookup(ks, A, 0) == 8
    plan = conn.load_plan(A, 8)
    assert (plan.compute_blocks, plan.load_blocks) == (5, 3)
    assert plan.expected_s == pytest.approx(0.1 + 3 * g3_s, rel=1e-3)
    # a delay seen once fades while no split runs to measure it again: two half-lives on,
    # a quarter of it (held for good, every later plan would recompute)
    now = time.monotonic()
    with mock.patch.object(connector.time, "monotonic", return_value=now + 2 * HALF_LIFE):
        assert conn.load_start_delay() == pytest.approx(0.1 / 4, rel=1e-3)
    conn.load_start_s = 0.0
    # recompute faster than any tier: recompute it all
    conn.save(ks, [None, *ks[:-1]], A, list(range(8)))
    conn.prefill_tokens_per_s = BS / (g2_s / 10)
    assert conn.lookup(ks, A, 0) == 0
    store.close()


def test_lookup_with_slack_loads_a_tier_slower_than_recomputing(tmp_path):
    """A request parked while the batch is full waits ``slack_s`` for a slot anyway: a load
    from a disk slower than recomputing lands within it, so all of it is loaded (no split);
    with too little slack the plan is what it would be without."""
    store = make(tmp_path, seed_bytes_per_s={"G3": 2048 / 0.05}, probe_tiers=False)
    conn = StoreConnector(store, kv_cache(), BS)
    ks = keys.block_keys(list(range(BS * 8)), MODEL.with_tenant(A), BS)
    conn.save(ks, [None, *ks[:-1]], A, list(range(8)))
    store.flush()
    store.g2.clear()
    assert store.contains(ks, A) == ["G3"] * 8
    conn.prefill_tokens_per_s = BS / 0.01  # recompute 5x faster than the disk
    busy = dict(busy=True)
    assert conn.lookup(ks, A, 0, **busy) == 0  # admitted now: recompute it all
    assert conn.lookup(ks, A, 0, **busy, slack_s=0.5) == 8  # 8 x 50 ms within the wait
    assert conn.load_plan(A, 8).compute_blocks == 0
    assert conn.lookup(ks, A, 0, **busy, slack_s=0.05) == 0
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


@pytest.mark.parametrize("tier", ["G2", "G3"])
def test_engine_reuses_evicted_blocks_with_cold_run_output(tmp_path, tiny_model_dir, tier):
    from kvgrid.engine.llm_engine import LLMEngine

    model = str(tiny_model_dir("llama"))
    cfg = dict(model=model, block_size=BS, num_kv_blocks=10, max_num_batched_tokens=256)
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(BS * 6 + 5)]
    other = [(11 * i + 5) % 1000 + 10 for i in range(BS * 8)]
    cold, _ = run_request(LLMEngine(**cfg), "cold", prompt, 6)

    eng = LLMEngine(**cfg)
    store = make(tmp_path, g2_bytes=(1 << 20) if tier == "G2" else 0)
    conn = StoreConnector(store, eng.runner.kv_cache, BS)
    eng.attach_store(conn)
    first, _ = run_request(eng, "a", prompt, 6)
    run_request(eng, "b", other, 2)  # G1 has 10 blocks: this evicts the prompt's blocks
    store.flush()
    assert conn.saved_blocks >= 4
    again, cached = run_request(eng, "c", prompt, 6)
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


def test_the_engine_waits_for_g2_room_no_longer_than_recomputing_the_blocks(tmp_path):
    """Every G2 slot pinned: a hand-down waits for one at most as long as recomputing its
    blocks would take (then it goes on to the write-down, or is dropped and counted), not
    the whole ``g2_wait_s``: a longer wait costs the GPU more than losing them."""
    src = kv_cache()
    store = make(tmp_path, g2_bytes=2 * src[0].nbytes, g2_wait_s=2.0)
    conn = StoreConnector(store, src, BS)
    ks = keys.block_keys(list(range(BS * 3)), MODEL.with_tenant(A), BS)
    conn.save(ks[:2], [None, ks[0]], A, [0, 1])
    pins = [store.g2.acquire(tenant_id(A), k)[0] for k in ks[:2]]  # nothing to evict
    conn.prefill_tokens_per_s = BS / 0.05  # a block is recomputed in 50 ms
    t0 = time.perf_counter()
    assert conn.save(ks[2:], [ks[1]], A, [2]) == [False]
    assert 0.04 <= time.perf_counter() - t0 < 0.5
    assert store.metrics.total("backpressure_s") < 0.5
    for slot in pins:
        store.g2.release(slot)
    store.close()


def test_write_through_by_default_only_where_g2_holds_what_g1_caches(tmp_path, tiny_model_dir):
    """A G2 smaller than G1 lets written-through blocks go long before G1 evicts them: the
    copies would buy nothing. Asked for explicitly, it is on or off whatever the sizes."""
    from kvgrid.engine.llm_engine import LLMEngine

    eng = LLMEngine(model=str(tiny_model_dir("llama")), block_size=BS, num_kv_blocks=40,
                    max_num_batched_tokens=256)  # fmt: skip
    g1 = eng.block_manager.num_free_blocks * eng.runner.kv_cache[0].nbytes
    cases = [(g1 // 2, None, False), (g1, None, True), (g1 // 2, True, True), (g1, False, False)]
    for g2_bytes, asked, on in cases:
        store = make(tmp_path, g2_bytes=g2_bytes, write_through=asked, g3_dir=None,
                     probe_tiers=False)  # fmt: skip
        conn = StoreConnector(store, eng.runner.kv_cache, BS)
        eng.attach_store(conn)
        assert conn.write_through is on and eng.block_manager.record_commits is on
        eng.detach_store()
        store.close()


@pytest.mark.parametrize("write_through", [True, False])
def test_write_through_saves_after_prefill_without_eviction(
    tmp_path, tiny_model_dir, write_through
):
    prompt = [(5 * i + 1) % 1000 + 10 for i in range(BS * 5 + 3)]
    store = make(tmp_path, write_through=write_through)
    eng, conn = engine_with_store(tiny_model_dir, store)
    first, _ = run_request(eng, "a", prompt, 4)
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
        again, cached = run_request(eng, f"b-{tier}", prompt, 4)
        assert again == first and cached == BS * 5
        assert store.metrics.total("hits", tier=tier) == hits + 5
    # blocks loaded from the store are not written back again: G2 knows G3 holds them
    eng.step()
    store.flush()
    assert store.writes.done == writes
    assert store.g2.pinned_count() == 0
    store.close()


def test_without_write_through_the_next_steps_evictions_go_below_a_step_ahead(
    tmp_path, tiny_model_dir
):
    """What the next step may evict (the prompt tokens left, up to a step's budget, and a
    block of growth per running request, after the unnamed blocks and those safe below) is
    handed down at the end of this step's scheduling: its copies run beside this step's
    forward, and the step that reuses the blocks neither copies them nor waits for them."""
    from kvgrid import SamplingParams

    a = [(7 * i + 3) % 1000 + 10 for i in range(BS * 5 + 3)]
    b = [(11 * i + 5) % 1000 + 10 for i in range(BS * 6)]
    store = make(tmp_path, write_through=False)
    eng, _ = engine_with_store(tiny_model_dir, store, num_kv_blocks=8, max_num_seqs=2,
                               max_num_batched_tokens=4 * BS)  # fmt: skip
    run_request(eng, "a", a, 2)  # 6 blocks: 5 named, then 3 free holding nothing
    eng.add_request("b", b, SamplingParams(max_tokens=1, temperature=0))
    eng.step()  # b's first 4 blocks: the 3 unnamed ones, and one of a's (evicted)
    store.flush()
    bm, ka = eng.block_manager, keys.block_keys(a, eng.scope.digest, BS)
    stored = store.contains(ka, keys.PUBLIC_TENANT, leading=False)
    assert sum(t is not None for t in stored) == 4
    # b's next step takes 2 more blocks, and 1 as it grows: 3 of a's went below a step
    # ahead, still in G1, safe to give up without a copy
    ahead = [k for k, t in zip(ka, stored) if t is not None and k in bm.cached]
    assert len(ahead) == 3 and all(bm.blocks[bm.cached[k]].below for k in ahead)
    store.close()


def test_queued_request_prefetches_its_prefix_into_g2(tmp_path, tiny_model_dir):
    prompt = [(3 * i + 7) % 1000 + 10 for i in range(BS * 6 + 1)]
    other = [(13 * i + 2) % 1000 + 10 for i in range(BS * 2)]
    cold, _ = run_request(
        engine_with_store(tiny_model_dir, make(tmp_path / "cold"))[0], "c", prompt, 5
    )
    store = make(tmp_path, write_through=True)
    # not parked (which would load it straight into G1): it waits in the queue
    eng, _ = engine_with_store(tiny_model_dir, store, max_num_seqs=1, max_parked_seqs=0)
    run_request(eng, "warm", prompt, 2)
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
    ctl = LoadDeadline(time.monotonic() + 0.12)
    n = reader.load(ks, A, list(range(12)), deadline=ctl)
    assert 1 <= n < 12  # one reader at 50 ms a block: a few, not all twelve
    assert torch.equal(dst[:n], src[:n])
    assert store.metrics.total("misses", tier="G3", reason="deadline") == 1
    assert ctl.stopped == "deadline"
    assert short_load_reason(ctl, False, time.monotonic()) == "not_loaded_deadline"
    assert reader.load(ks, A, list(range(12))) == 12  # no deadline: all of them
    assert torch.equal(dst[:12], src[:12])
    store.flush()
    assert store.g2.pinned_count() == 0  # fetches the first load abandoned let go too
    # a block gone from every tier since the lookup ends the load: not an error, nor late
    store.g2.clear()
    assert slow.delete(tenant_id(A), ks[3])
    ctl = LoadDeadline(None)
    assert reader.load(ks, A, list(range(12)), deadline=ctl) == 3
    assert ctl.stopped == "missing"
    assert short_load_reason(ctl, False, time.monotonic()) == "not_loaded_missing"
    assert short_load_reason(ctl, True, time.monotonic()) == "not_loaded_error"  # it raised
    assert short_load_reason(LoadDeadline(None), False, time.monotonic()) == "not_loaded_error"
    store.flush()
    store.close()


# ---- layer-by-layer landing (kvgrid.store.landing) ------------------------------------
