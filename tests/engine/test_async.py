"""Asynchronous scheduling: launching a step before reading back the last one's tokens
changes nothing but speed. Run on the CPU with it forced on (CUDA turns it on by default)."""

import pytest
import torch

from kvgrid import SamplingParams
from kvgrid.engine.llm_engine import LLMEngine
from kvgrid.engine.sequence import PENDING


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def prompts(n, length, seed, shared=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 1000, (shared,), generator=g).tolist()
    return [prefix + torch.randint(0, 1000, (length,), generator=g).tolist() for _ in range(n)]


def run(path, requests, async_scheduling, abort=None, **kw):
    """Drive the engine step by step; per request (token ids, finish reason, stop reason,
    logprobs, streamed ids). ``abort``: (step number, request id) to abort then."""
    eng = LLMEngine(model=path, async_scheduling=async_scheduling, **kw)
    for rid, (prompt, params) in requests.items():
        eng.add_request(rid, prompt, params)
    final, streamed, deferred, steps = {}, {rid: [] for rid in requests}, 0, 0
    while eng.has_unfinished_requests():
        if abort is not None and steps == abort[0]:
            assert eng.abort_request(abort[1])
        outs = eng.step()
        steps += 1
        deferred += eng._in_flight is not None
        for o in outs:
            assert PENDING not in o.new_token_ids and PENDING not in o.outputs[0].token_ids
            streamed[o.request_id] += o.new_token_ids
            if o.finished:
                c = o.outputs[0]
                final[o.request_id] = (c.token_ids, c.finish_reason, c.stop_reason, c.logprobs)
    bm = eng.block_manager
    assert all(b.ref_count == 0 for b in bm.blocks)  # every block came back
    return final, streamed, deferred, eng


def same_up_to_rounding(a, b):
    """Same tokens and stops; logprobs within float32 rounding (the two modes batch the
    same requests into different steps, and a batch's make-up moves the last bits)."""
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid][:3] == b[rid][:3], rid
        lp_a, lp_b = a[rid][3], b[rid][3]
        assert (lp_a is None) == (lp_b is None)
        for x, y in zip(lp_a or [], lp_b or []):
            assert x.keys() == y.keys() and x == pytest.approx(y, abs=1e-5)


def test_async_equals_sync_across_sampling_stops_preemption_and_prefix_reuse(tiny):
    ps = prompts(6, 40, seed=11, shared=32)
    ref_params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref, *_ = run(tiny, {"probe": (ps[0], ref_params)}, False, block_size=16, num_kv_blocks=64)
    probe = ref["probe"][0]
    requests = {
        "greedy": (ps[0], ref_params),
        # stops on a token it samples mid-way: the step already launched past it is dropped
        "stop-token": (
            ps[0],
            SamplingParams(
                max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[probe[6]]
            ),
        ),
        "seeded": (ps[1], SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=5)),
        "min-tokens": (
            ps[2],
            SamplingParams(
                max_tokens=12, temperature=0.7, seed=3, min_tokens=8, stop_token_ids=[1]
            ),
        ),
        # logprobs are read against the chosen token on the host: those steps complete at once
        "logprobs": (ps[3], SamplingParams(max_tokens=9, temperature=0, logprobs=3)),
        "short": (ps[4], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)),
        "long-prompt": (
            prompts(1, 150, seed=12)[0],
            SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
        ),
    }
    # a pool too small for everything at once (preemption), chunked prefill, shared prefixes
    kw = dict(block_size=16, num_kv_blocks=24, max_num_batched_tokens=48)
    sync, sync_stream, sync_deferred, _ = run(tiny, requests, False, **kw)
    asyn, asyn_stream, asyn_deferred, eng = run(tiny, requests, True, **kw)
    assert sync_deferred == 0 and asyn_deferred > 10  # it did overlap
    assert eng.scheduler.num_preemptions > 0
    same_up_to_rounding(asyn, sync)
    assert asyn_stream == sync_stream
    for rid, (tokens, *_rest) in asyn.items():
        assert asyn_stream[rid] == tokens  # streamed deltas add up to the final output
    assert sync["stop-token"][0] == probe[: probe.index(probe[6]) + 1]
    assert sync["stop-token"][1:3] == ("stop", probe[6])
    assert len(sync["short"][0]) == 1 and len(sync["min-tokens"][0]) >= 8


def test_async_stop_string_and_abort_in_flight(tiny):
    ps = prompts(3, 30, seed=13)
    free = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ref, *_ = run(tiny, {"t": (ps[0], free)}, False, block_size=16, num_kv_blocks=64)
    ref_ids = ref["t"][0]
    eng = LLMEngine(model=tiny, block_size=16, num_kv_blocks=64)
    text = eng.tokenizer.decode(ref_ids[10:14])
    stop = text.strip()[:3] or text[:3]
    assert stop
    requests = {
        "stop-string": (ps[0], SamplingParams(max_tokens=40, temperature=0, stop=[stop])),
        "aborted": (ps[1], free),
        "other": (ps[2], free),
    }
    kw = dict(block_size=16, num_kv_blocks=64)
    sync, _, _, _ = run(tiny, requests, False, abort=(6, "aborted"), **kw)
    asyn, _, deferred, _ = run(tiny, requests, True, abort=(6, "aborted"), **kw)
    assert deferred > 0
    assert "aborted" not in asyn and "aborted" not in sync
    same_up_to_rounding(asyn, sync)
    assert sync["stop-string"][1:3] == ("stop", stop)
    assert len(sync["stop-string"][0]) < 40


def test_block_keys_refuse_tokens_not_yet_known(tiny):
    eng = LLMEngine(model=tiny, block_size=16, num_kv_blocks=64, async_scheduling=True)
    eng.add_request("r", prompts(1, 31, seed=14)[0], SamplingParams(max_tokens=4))
    eng.step()  # the prompt's forward is in flight; its first token is pending
    seq = eng.seqs["r"]
    assert seq.num_pending == 1 and seq.token_ids[-1] == PENDING
    with pytest.raises(RuntimeError, match="not yet known"):
        seq.block_keys(2)  # block 2 would hold the pending token
    assert len(seq.block_keys(1)) == 1


def test_aborting_the_only_request_in_flight_leaves_nothing_unfinished(tiny):
    eng = LLMEngine(model=tiny, block_size=16, num_kv_blocks=64, async_scheduling=True)
    free0 = eng.block_manager.num_free_blocks
    eng.add_request("a", prompts(1, 40, seed=15)[0], SamplingParams(max_tokens=20))
    eng.step()
    eng.step()
    assert eng._in_flight is not None  # a step of "a" is on the device
    assert eng.abort_request("a")
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == free0
    # the engine goes on: the aborted step is completed (no output) under the next one
    eng.add_request("b", prompts(1, 20, seed=16)[0], SamplingParams(max_tokens=3))
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert {o.request_id for o in outs} == {"b"} and len(outs[-1].outputs[0].token_ids) == 3


def test_an_asynchronous_engine_switches_threads_within_a_step(tiny):
    """Work the engine thread hands off (grammar masks, store loads) must start within a
    step, not at CPython's default 5 ms thread switch: an asynchronous engine lowers it."""
    import sys

    from kvgrid.engine.llm_engine import GIL_SWITCH_INTERVAL_S

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        LLMEngine(model=tiny, async_scheduling=False, num_kv_blocks=16)
        assert sys.getswitchinterval() == pytest.approx(0.005)
        LLMEngine(model=tiny, async_scheduling=True, num_kv_blocks=16)
        assert sys.getswitchinterval() <= GIL_SWITCH_INTERVAL_S
    finally:
        sys.setswitchinterval(before)
