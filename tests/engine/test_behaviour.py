"""Engine behaviour: prefix reuse, chunking, batching and preemption change nothing but speed."""

import pytest
import torch

from kvgrid import LLM, RequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def prompts(n, length, vocab, seed=0, shared=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, vocab, (shared,), generator=g).tolist()
    return [
        prefix + torch.randint(0, vocab, (length - shared,), generator=g).tolist() for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def tokens_of(outs):
    return [o.outputs[0].token_ids for o in outs]


def run_alone(path, ps, params=GREEDY, **kw):
    llm = LLM(path, block_size=16, num_kv_blocks=128, **kw)
    return [tokens_of(llm.generate([p], params))[0] for p in ps]


def test_prefix_cache_hit_equals_cold_run_and_is_reported(tiny):
    llm = LLM(tiny, block_size=16, num_kv_blocks=128)
    p = prompts(2, 80, 1000, shared=64)
    cold = llm.generate([p[0]], GREEDY)[0]
    assert cold.num_cached_tokens == 0
    warm = llm.generate([p[0]], GREEDY)[0]
    # everything but the last (partial) block is reused; the last token is always computed
    assert warm.num_cached_tokens == 64
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    sibling = llm.generate([p[1]], GREEDY)[0]
    assert sibling.num_cached_tokens == 64
    assert sibling.outputs[0].token_ids == run_alone(tiny, [p[1]])[0]
    off = LLM(tiny, block_size=16, num_kv_blocks=128, enable_prefix_caching=False)
    off.generate([p[0]], GREEDY)
    assert off.generate([p[0]], GREEDY)[0].num_cached_tokens == 0


def test_chunked_prefill_equals_one_shot(tiny):
    p = prompts(3, 150, 1000, seed=1)
    one_shot = run_alone(tiny, p)
    chunked = LLM(tiny, block_size=16, num_kv_blocks=128, max_num_batched_tokens=32)
    assert tokens_of(chunked.generate(p, GREEDY)) == one_shot


def test_mixed_batch_equals_each_alone(tiny):
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 17, 64, 100, 33)]
    params = [
        SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (5, 9, 16, 2, 11)
    ]
    alone = [run_alone(tiny, [p], q)[0] for p, q in zip(ps, params)]
    llm = LLM(tiny, block_size=16, num_kv_blocks=128)
    assert tokens_of(llm.generate(ps, params)) == alone


def test_preempted_and_recomputed_equals_uninterrupted(tiny):
    p = prompts(4, 40, 1000, seed=3)
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=7, ignore_eos=True)
    alone = run_alone(tiny, p, params)
    # 12 blocks of 16 tokens cannot hold 4 sequences of 80 tokens: some must be preempted
    small = LLM(tiny, block_size=16, num_kv_blocks=12)
    outs = small.generate(p, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert tokens_of(outs) == alone


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    p = prompts(3, 20, 1000, seed=4)
    params = SamplingParams(
        max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True
    )
    llm = LLM(tiny, block_size=16, num_kv_blocks=128)
    a = tokens_of(llm.generate(p, params))
    b = tokens_of(llm.generate(p[:1], params))
    assert a[0] == b[0]
    assert a[0] != a[1]
    # top_k=1 is greedy whatever the temperature
    k1 = SamplingParams(max_tokens=10, temperature=1.5, top_k=1, ignore_eos=True)
    assert tokens_of(llm.generate(p[:1], k1)) == [
        run_alone(tiny, p[:1], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    ]


def test_stop_token_ids_max_tokens_and_logprobs(tiny):
    llm = LLM(tiny, block_size=16, num_kv_blocks=128)
    p = prompts(1, 12, 1000, seed=5)[0]
    ref = tokens_of(llm.generate([p], GREEDY))[0]
    stop_at = ref[5]
    first = ref.index(stop_at)
    out = llm.generate(
        [p], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[stop_at])
    )[0].outputs[0]
    assert out.token_ids == ref[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    out = llm.generate(
        [p], SamplingParams(max_tokens=3, temperature=0, logprobs=4, ignore_eos=True)
    )[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert len(out.logprobs) == 3
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and len(lp) >= 4
        assert lp[tok] == max(lp.values())  # greedy picks the most likely token
    assert out.cumulative_logprob == pytest.approx(
        sum(lp[t] for t, lp in zip(out.token_ids, out.logprobs))
    )


def test_bad_inputs_raise_clear_errors_and_engine_keeps_serving(tiny):
    llm = LLM(tiny, block_size=16, num_kv_blocks=128, max_model_len=256)
    eng = llm.engine
    eng.add_request("good", prompts(1, 10, 1000)[0], GREEDY)
    cases = [
        (lambda: eng.add_request("long", [1] * 300, GREEDY), "context"),
        (lambda: eng.add_request("empty", [], GREEDY), "empty"),
        (lambda: eng.add_request("vocab", [10**7], GREEDY), "vocabulary"),
        (lambda: eng.add_request("over", [1] * 200, SamplingParams(max_tokens=100)), "exceeds"),
        (lambda: SamplingParams(temperature=-1), "temperature"),
        (lambda: SamplingParams(top_p=0), "top_p"),
        (lambda: SamplingParams(max_tokens=0), "max_tokens"),
        (lambda: SamplingParams(stop=[1, 2]), "stop"),
        (lambda: SamplingParams(stop=5), "stop"),
        (lambda: eng.add_request("good", [1, 2], GREEDY), "already in use"),
    ]
    for fn, word in cases:
        with pytest.raises(RequestError, match=word):
            fn()
    done = []
    while eng.has_unfinished_requests():
        done += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in done] == ["good"]
    assert len(done[0].outputs[0].token_ids) == 16


def test_abort_frees_blocks(tiny):
    llm = LLM(tiny, block_size=16, num_kv_blocks=64, enable_prefix_caching=False)
    eng = llm.engine
    free0 = eng.block_manager.num_free_blocks
    eng.add_request("a", prompts(1, 100, 1000)[0], SamplingParams(max_tokens=50))
    eng.step()
    assert eng.block_manager.num_free_blocks < free0
    assert eng.abort_request("a")
    assert eng.block_manager.num_free_blocks == free0
    assert not eng.has_unfinished_requests()
    assert not eng.abort_request("a")


def test_packed_step_inputs_start_on_16_bytes():
    """Kernels are compiled per 16-byte alignment of their pointers: every view of the
    packed step inputs starts aligned whatever the parts' lengths, and holds its part."""
    import numpy as np

    from kvgrid.engine.model_runner import ALIGN_BYTES, pack_aligned

    rng = np.random.default_rng(0)
    for dtype in (np.int64, np.int32):
        for _ in range(20):
            parts = [rng.integers(0, 99, rng.integers(0, 9)).astype(dtype) for _ in range(5)]
            packed, spans = pack_aligned(parts, dtype)
            for (a, b), p in zip(spans, parts):
                assert (a * packed.itemsize) % ALIGN_BYTES == 0
                assert np.array_equal(packed[a:b], p)


def test_attention_metadata_views_are_aligned_for_every_batch(tiny):
    """Odd and even batch sizes and token counts, prefill and decode: each device view the
    runner hands the kernels (lengths, tables, slots, positions) starts on 16 bytes."""
    llm = LLM(tiny, block_size=16, num_kv_blocks=128, max_num_seqs=8)
    runner = llm.engine.runner
    inner, seen = runner.prepare, []

    def prepare(*a, **kw):
        ids, pos, meta, sample_idx = inner(*a, **kw)
        views = (ids, pos, meta.query_start_loc, meta.seq_lens, meta.context_lens,
                 meta.block_tables, meta.slot_mapping)  # fmt: skip
        seen.append([v.data_ptr() % 16 for v in views if v.numel()])
        return ids, pos, meta, sample_idx

    runner.prepare = prepare
    for n in (1, 2, 3, 5):
        llm.generate(prompts(n, 17 + n, 1000), SamplingParams(max_tokens=3, temperature=0))
    assert len(seen) > 8
    assert all(not any(r) for r in seen), seen
