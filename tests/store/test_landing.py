"""Loads landing in the engine's cache: G2 prefixes layer by layer under the forward (the
reference and the Triton kernel), loads that start once the engine has launched the step that
planned them, and loads cut by their deadline."""

from __future__ import annotations

import pytest
import torch

from kvgrid.store import StoreConnector
from kvgrid.store.landing import land_layers
from tests.support.store_engine import BS, engine_with_store, kv_cache, make, run_request

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
    cold_eng, _ = engine_with_store(tiny_model_dir, make(tmp_path / "cold"))
    cold, _ = run_request(cold_eng, "cold", prompt, 6)
    store = make(tmp_path, write_through=True)
    eng, conn = engine_with_store(tiny_model_dir, store)
    eng.scheduler.loader.layered = True
    layered = []
    inner = conn.load_layered
    conn.load_layered = lambda *a: layered.append(inner(*a)) or layered[-1]
    first, _ = run_request(eng, "a", prompt, 6)
    store.flush()
    assert eng.block_manager.reset_prefix_cache()
    again, cached = run_request(eng, "b", prompt, 6)
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
    again, cached = run_request(eng, "c", prompt, 6)
    assert again == cold and cached == BS * 6 and layered[-1] is None
    store.close()


def test_a_request_aborted_while_its_prefix_lands_frees_its_blocks(tmp_path, tiny_model_dir):
    from kvgrid import SamplingParams

    prompt = [(5 * i + 2) % 1000 + 10 for i in range(BS * 4 + 3)]
    store = make(tmp_path, write_through=True)
    eng, _ = engine_with_store(tiny_model_dir, store)
    eng.scheduler.loader.layered = True
    run_request(eng, "a", prompt, 2)
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
    run_request(eng, "a", prompt, 2)
    run_request(eng, "b", other, 2)  # evicts the prompt's blocks to G3
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
    eng, conn = engine_with_store(tiny_model_dir, store, num_kv_blocks=12)
    cold, _ = run_request(eng, "a", prompt, 3)
    run_request(eng, "b", [(11 * i + 5) % 1000 + 10 for i in range(BS * 10)], 2)  # evicts it to G3
    store.flush()
    get = DiskTier.get

    def slow_get(self, tid, key, into=None):
        time.sleep(0.2)
        return get(self, tid, key, into)

    monkeypatch.setattr(DiskTier, "get", slow_get)
    store.bandwidth["G3"] = 1e12  # what the planner believes
    conn.prefill_tokens_per_s = BS / 0.05
    t0, loaded = time.monotonic(), eng.scheduler.store_loaded_tokens
    tokens, _ = run_request(eng, "c", prompt, 3)
    took, loaded = time.monotonic() - t0, eng.scheduler.store_loaded_tokens - loaded
    assert tokens == cold
    assert store.metrics.total("misses", tier="G3", reason="deadline") == 1
    if late_wait < 1:  # cut at 0.5 x (5 or 6) x 50 ms + 20 ms, before the first block landed
        assert took < 0.5 and loaded == 0, (took, loaded)
    else:  # cut at the stall deadline, (5 or 6) x 50 ms + 0.5 s, three blocks landed
        assert took > 0.7 and loaded >= 3 * BS, (took, loaded)
    store.close()


class _Landing:
    """A prefix still crossing to G1 (the device never says it has landed)."""

    def landed(self) -> bool:
        return False

    def wait_all(self) -> None:
        pass


def test_a_landing_prefix_joins_a_prefill_step_and_waits_out_a_decode_step(tiny_model_dir):
    """Requests whose prefixes are still landing are scheduled together in a step that only
    prefills (one step for all of them, not one each as they land); a step that decodes
    goes without them, so no decode row waits for a landing."""
    from kvgrid import SamplingParams
    from kvgrid.engine.llm_engine import LLMEngine

    eng = LLMEngine(model=str(tiny_model_dir("llama")), block_size=BS, num_kv_blocks=40,
                    max_num_batched_tokens=256)  # fmt: skip
    params = SamplingParams(max_tokens=8, temperature=0)
    eng.add_request("b", list(range(20, 60)), params)
    eng.add_request("c", list(range(70, 110)), params)
    sched = eng.scheduler
    assert len(sched.schedule().scheduled) == 2  # admitted (not run: no step executes it)
    for seq in sched.running:
        seq.kv_landing = _Landing()
    assert sorted(s.seq.request_id for s in sched.schedule().scheduled) == ["b", "c"]

    eng = LLMEngine(model=str(tiny_model_dir("llama")), block_size=BS, num_kv_blocks=40,
                    max_num_batched_tokens=256)  # fmt: skip
    eng.add_request("a", list(range(10, 50)), params)
    for _ in range(3):
        eng.step()  # "a" decodes
    eng.add_request("b", list(range(20, 60)), params)
    sched = eng.scheduler
    sched.schedule()  # admits "b" (and decodes "a")
    landing = next(s for s in sched.running if s.request_id == "b")
    landing.kv_landing = _Landing()
    ran = {s.seq.request_id for s in sched.schedule().scheduled}
    assert "a" in ran and "b" not in ran
