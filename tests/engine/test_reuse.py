"""Reuse at system level, in the engine: G1 gives up first what is safe below it, blocks an
admission evicts reach the store before the next one looks them up, a stored prefix waits for
G1 room rather than being recomputed, a preempted request keeps what it computed, and the
waiting queue is published to the store's prefetch planner. Each output equals a cold run's."""

from __future__ import annotations

import pytest

from kvgrid import SamplingParams, keys
from kvgrid.engine.llm_engine import LLMEngine
from kvgrid.engine.scheduler import Scheduler
from kvgrid.store import ContextStore, StoreConfig, StoreConnector

BS = 16


def tokens(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + 31 * i) % 1000 + 10 for i in range(n)]


def run(eng: LLMEngine, reqs: dict[str, list[int]], n: int = 3) -> dict:
    """Add every request at once, step to the end; per request (tokens, cached tokens)."""
    for rid, p in reqs.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    out = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = (list(o.outputs[0].token_ids), o.num_cached_tokens)
    return out


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


def engine(model, tmp_path, g2_blocks=64, write_through=True, **kw):
    cfg = dict(model=model, block_size=BS, num_kv_blocks=24, max_num_batched_tokens=256)
    cfg.update(kw)
    eng = LLMEngine(**cfg)
    block_bytes = eng.runner.kv_cache[0].nbytes
    store_cfg = StoreConfig(g2_bytes=g2_blocks * block_bytes, sweep_interval_s=0,
                            probe_tiers=False, encrypt=False,
                            write_through=write_through)  # fmt: skip
    conn = StoreConnector(ContextStore(store_cfg), eng.runner.kv_cache, BS)
    eng.attach_store(conn)
    return eng, conn


def cold(model, reqs, n=3, **kw) -> dict:
    cfg = dict(model=model, block_size=BS, num_kv_blocks=64, max_num_batched_tokens=256)
    cfg.update(kw)
    return {r: v[0] for r, v in run(LLMEngine(**cfg), reqs, n).items()}


def queue_behind_busy(eng: LLMEngine, p: list[int], busy: list[int], n: int) -> None:
    """``p``'s prefix in the store only, "busy" prefilling, then ``p`` again as "p2" behind
    it (``n`` tokens each, greedy)."""
    run(eng, {"p": p})
    eng.scheduler.offload_cached()
    assert eng.block_manager.reset_prefix_cache()  # p's prefix: in the store only
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    eng.add_request("busy", busy, params)
    eng.step()  # busy prefills
    eng.add_request("p2", p, params)


def test_g1_gives_up_first_the_blocks_safe_below_it(model, tmp_path):
    """B's blocks exist only in G1; A's were loaded from the store. When C needs room, G1
    evicts A's (more recently used, but safe below) and keeps B's, with no write-back.
    (Without write-through: with it, B's blocks would be below G1 as soon as computed.)"""
    a, b, c = tokens(BS * 5 + 3, 1), tokens(BS * 5 + 3, 2), tokens(BS * 16 + 3, 3)
    eng, conn = engine(model, tmp_path, write_through=False)
    run(eng, {"a": a})
    eng.scheduler.offload_cached()  # A's blocks go down
    assert eng.block_manager.reset_prefix_cache()
    run(eng, {"b": b})  # B: computed, in G1 only
    out = run(eng, {"a2": a})  # A again: loaded from the store (marked safe below)
    assert out["a2"][1] == BS * 5
    bm = eng.block_manager
    kb = keys.block_keys(b, eng.scope.digest, BS)
    ka = keys.block_keys(a, eng.scope.digest, BS)
    saved = conn.saved_blocks
    run(eng, {"c": c})  # 17 blocks of 24, 14 holding nothing: three cached ones must go
    assert len(bm.match_prefix(kb)) == 5  # B's blocks all survived
    assert len(bm.match_prefix(ka)) == 2  # A's gave way, the last three first
    assert conn.store.metrics.total("g1_writebacks", outcome="already_stored") >= 1
    # nothing of B's had to be written back to make room
    assert conn.store.contains(kb, keys.PUBLIC_TENANT)[0] is None
    assert conn.saved_blocks - saved <= 5 - len(bm.match_prefix(ka))
    conn.close()


def test_blocks_an_admission_evicts_reach_the_store_before_the_next_lookup(model, tmp_path):
    """X's continuation is admitted in the same step as Y, whose blocks evict X's history
    from G1: the history is handed down before the continuation looks it up, so it loads
    it instead of recomputing it."""
    x = tokens(BS * 6 + 3, 4)
    x2 = x + tokens(BS, 5)
    z = tokens(BS * 6 + 3, 5)
    y = tokens(BS * 29 + 3, 6)  # 30 blocks of 40: the 28 holding nothing, then x's last two
    eng, conn = engine(model, tmp_path, num_kv_blocks=40, max_num_batched_tokens=512)
    run(eng, {"x": x})
    run(eng, {"z": z})  # z's blocks, freed after x's, are what x2 itself evicts
    out = run(eng, {"y": y, "x2": x2})
    assert out["x2"][1] == BS * 6  # 4 blocks still in G1, the 2 evicted from the store
    assert conn.store.metrics.total("hits", tier="G2") == 2
    ref = cold(model, {"y": y, "x2": x2}, max_num_batched_tokens=512)
    assert out["x2"][0] == ref["x2"] and out["y"][0] == ref["y"]
    conn.close()


def test_a_stored_prefix_waits_for_g1_room_instead_of_being_recomputed(model, tmp_path):
    """The head of the queue has a 10-block prefix in the store but G1 has no room for it
    while another request runs: it waits (counted) and then loads the whole prefix."""
    p = tokens(BS * 10 + 3, 7)
    busy = tokens(BS * 14 + 3, 8)  # 15 blocks of 24: too few left for p's 11
    eng, conn = engine(model, tmp_path)
    run(eng, {"p": p})
    eng.scheduler.offload_cached()
    assert eng.block_manager.reset_prefix_cache()
    out = run(eng, {"busy": busy, "p2": p}, n=6)
    assert eng.scheduler.num_room_waits > 0
    assert out["p2"][1] == BS * 10  # every stored block loaded, none recomputed
    assert conn.store.metrics.total("lost_hits") == 0
    assert out["p2"][0] == cold(model, {"p2": p}, n=6)["p2"]
    conn.close()


def test_a_preempted_request_keeps_what_it_computed_below_g1(model, tmp_path, monkeypatch):
    """With asynchronous scheduling the last step's blocks of a request are not named when
    it is preempted: kept, they are named and handed down at once and its recompute
    starts from them; without that they are lost."""
    reqs = {f"r{i}": tokens(BS * 3 + 8, 10 + i) for i in range(3)}
    computed = {}

    def measure(keep: bool) -> tuple[dict, int]:
        if not keep:
            monkeypatch.setattr(Scheduler, "_keep_below", lambda self, seq: None)
        eng, conn = engine(model, tmp_path, num_kv_blocks=10, async_scheduling=True,
                           max_num_batched_tokens=32)  # fmt: skip
        inner = eng.runner.execute
        n_computed = [0]

        def execute(batch, prev=None):
            n_computed[0] += sum(s.num_tokens for s in batch)
            return inner(batch, prev)

        eng.runner.execute = execute
        out = run(eng, reqs, n=8)
        assert eng.scheduler.num_preemptions > 0
        conn.close()
        monkeypatch.undo()
        return out, n_computed[0]

    kept, computed["kept"] = measure(True)
    lost, computed["lost"] = measure(False)
    ref = cold(model, reqs, n=8)
    assert {r: v[0] for r, v in kept.items()} == ref == {r: v[0] for r, v in lost.items()}
    assert computed["kept"] < computed["lost"]


def test_the_waiting_queue_is_published_with_its_prefixes(model, tmp_path):
    """Each step the store learns the waiting requests' keys past their G1 hits, in order,
    with when the GPU would start on them: a request whose blocks left G1 while it waited
    is planned again (the store's planner fetches and holds them). (No parking: a request
    parked is admitted, and leaves the queue.)"""
    eng, conn = engine(model, tmp_path, max_num_seqs=1, max_parked_seqs=0)
    seen = []
    conn.plan_queue = lambda queue, bcs: seen.append(queue)
    p = tokens(BS * 4 + 3, 9)
    run(eng, {"p": p})  # in G1 now
    eng.add_request("busy", tokens(BS * 3, 10), SamplingParams(max_tokens=4))
    eng.add_request("p2", p, SamplingParams(max_tokens=1))
    eng.step()
    assert seen and seen[-1][0].keys == ()  # all four in G1: nothing to bring up
    assert eng.block_manager.reset_prefix_cache() is False  # "busy" holds blocks
    bm = eng.block_manager
    for k in keys.block_keys(p, eng.scope.digest, BS):  # G1 lets p's blocks go
        bid = bm.cached.get(k)
        if bid is not None:
            bm._drop_key(bm.blocks[bid])
    eng.scheduler._published_at = 0.0
    eng.step()
    assert len(seen[-1][0].keys) == 4  # planned again, now that G1 lost them
    while eng.has_unfinished_requests():
        eng.step()
    assert seen[-1] == []  # the queue emptied: the store lets go of what it held
    conn.close()


def test_the_queue_is_published_again_at_once_when_its_head_leaves(model, tmp_path, monkeypatch):
    """While its head stays, the queue is published at most every ``_PUBLISH_S`` (the store
    plans on its own thread, and the estimates move slowly), but at once when the head is
    admitted: the store then brings up and holds the new head's blocks."""
    monkeypatch.setattr(Scheduler, "_PUBLISH_S", 60.0)
    eng, conn = engine(model, tmp_path, max_num_seqs=1, max_parked_seqs=0)
    seen = []
    conn.plan_queue = lambda queue, bcs: seen.append(len(queue))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for i, rid in enumerate(("busy", "q1", "q2")):
        eng.add_request(rid, tokens(BS * 2 + 3, 50 + i), params)
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    assert steps > 6 and seen == [2, 1, 0]
    conn.close()


def test_a_stored_prefix_lands_while_every_slot_is_taken(model, tmp_path):
    """With the one slot busy decoding, a request whose prefix is stored is admitted parked:
    its load starts at once, it computes nothing until the slot frees, then its first step
    computes only its new tokens. Outputs equal a cold run's; without parking it waits in
    the queue and loads only once admitted."""
    p = tokens(BS * 6 + 3, 21)
    busy = tokens(BS * 2 + 5, 22)
    want = cold(model, {"p2": p, "busy": busy}, n=6)

    def measure(parked: int):
        eng, conn = engine(model, tmp_path / str(parked), max_num_seqs=1, max_parked_seqs=parked)
        queue_behind_busy(eng, p, busy, 6)
        sched, loads_before_slot = eng.scheduler, 0
        outs = {}
        while eng.has_unfinished_requests():
            p2 = next((s for s in sched.running if s.request_id == "p2"), None)
            busy_running = any(s.request_id == "busy" for s in sched.running)
            if p2 is not None and busy_running:
                assert p2 not in sched.active()
                loads_before_slot += p2.load_future is not None or p2.kv_landing is not None
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = (list(o.outputs[0].token_ids), o.num_cached_tokens)
        conn.close()
        return outs, loads_before_slot

    parked, early = measure(4)
    waited, none = measure(0)
    assert {r: v[0] for r, v in parked.items()} == want == {r: v[0] for r, v in waited.items()}
    assert parked["p2"][1] == waited["p2"][1] == BS * 6
    assert early > 0 and none == 0


def test_a_head_refused_parking_for_want_of_room_is_not_looked_up_every_step(
    model, tmp_path, monkeypatch
):
    """With every slot taken, a request whose stored prefix needs more G1 room than the
    running requests leave it is refused a parking place. The store is not asked about it
    again at every step (a pass over its keys on the engine's thread, with the same answer)
    until room could have grown: here, once the slot frees and it is admitted. Outputs
    equal a cold run's, its prefix loaded."""
    # room alone calls for a recheck
    monkeypatch.setattr(Scheduler, "_PARK_RECHECK_S", 60.0, raising=False)
    p = tokens(BS * 16 + 3, 41)  # 17 blocks of G1's 24
    busy = tokens(BS * 6 + 5, 42)  # 7 blocks, growing as it decodes
    want = cold(model, {"p2": p, "busy": busy}, n=8)
    eng, conn = engine(model, tmp_path, max_num_seqs=1, max_parked_seqs=4)
    queue_behind_busy(eng, p, busy, 8)
    sched, looked, waited, outs = eng.scheduler, [], 0, {}
    inner = conn.lookup
    conn.lookup = lambda *a, **kw: looked.append(len(sched.running)) or inner(*a, **kw)
    while eng.has_unfinished_requests():
        waited += any(s.request_id == "p2" for s in sched.waiting)
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = (list(o.outputs[0].token_ids), o.num_cached_tokens)
    assert waited >= 6, waited  # it waited out busy's decode steps at the head of the queue
    # refused beside busy (again only once the step's prompt budget shrank: a smaller first
    # chunk needs fewer blocks); then admitted to the free slot
    assert looked[-1] == 0 and 1 <= looked.count(1) <= 2 and len(looked) < waited, looked
    assert {r: v[0] for r, v in outs.items()} == want
    assert outs["p2"][1] == BS * 16
    conn.close()


def test_a_short_prompt_tail_joins_its_chunk(model, tmp_path):
    """A mixed step's prompt chunk takes the rest of the prompt when what would be left is
    at most PROMPT_TAIL_TOKENS: no step of its own for a short tail."""
    from kvgrid.engine.scheduler import PROMPT_TAIL_TOKENS
    from kvgrid.engine.step_budget import MIN_MIXED_PREFILL_TOKENS

    # no drain window: the queued prompts would otherwise widen the step (its own test)
    eng = LLMEngine(model=model, block_size=BS, num_kv_blocks=64, max_num_batched_tokens=1024,
                    prompt_drain_s=0)  # fmt: skip
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    eng.add_request("d", tokens(20, 31), params)
    eng.step()
    eng.step()  # "d" decodes from here on
    sched = eng.scheduler
    sched.decode_step.update(0.01)
    sched.prefill_token.update(1.0)  # the mixed budget falls to its floor
    n = MIN_MIXED_PREFILL_TOKENS + PROMPT_TAIL_TOKENS
    eng.add_request("p", tokens(n, 32), params)
    eng.add_request("q", tokens(n + 1, 33), params)
    out = sched.schedule()
    chunk = {s.seq.request_id: s.num_tokens for s in out.scheduled}
    assert chunk == {"d": 1, "p": n}  # the whole prompt; and no budget left for "q"
    for _ in range(2):  # "q" is one token too long: a chunk now, its tail next
        eng.step()
    q = next(s for s in sched.running if s.request_id == "q")
    assert q.num_computed_tokens == MIN_MIXED_PREFILL_TOKENS
