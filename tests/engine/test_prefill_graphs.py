"""Piecewise prefill graphs (engine/prefill_graphs.py) compute what the eager forward does.

On the CPU the runner executes its pieces without capturing them: that checks the static
buffers, the padding and the order of store landings. On a GPU the captured graphs are
checked against the eager Triton forward: bit for bit where the step fills its bucket
exactly, within bf16 rounding where it is padded, and through the engine end to end.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kvgrid.engine.prefill_graphs import PrefillGraphRunner, prefill_buckets
from kvgrid.layers.attention.base import AttentionMetadata
from kvgrid.layers.attention.torch_ref import TorchAttentionBackend
from tests.support.small_llama import HEAD_DIM, KV_HEADS, LAYERS, small_llama

GPU = torch.cuda.is_available()
BS, NBLOCKS = 16, 64


def test_buckets_bound_the_padding():
    b = prefill_buckets(512)
    assert b[0] == 16 and b[-1] == 512 and b == sorted(set(b))
    # a step is padded by under 16 tokens, or by under a quarter of itself above 128
    assert all(b2 - b1 <= max(16, b1 // 4) for b1, b2 in itertools.pairwise(b))
    assert prefill_buckets(100)[-1] == 100 and prefill_buckets(16) == [16]


def _mixed_batch(device, gen: torch.Generator, chunks: list[tuple[int, int]]):
    """Sequences given as (cached context, new tokens): a prefill over a cached prefix, a
    decode row, a fresh prefill... Returns ids, positions, metadata."""
    n_seq = len(chunks)
    perm = torch.randperm(NBLOCKS - 1, generator=gen) + 1  # block 0 never used
    tables = perm[: n_seq * 8].view(n_seq, 8).int()
    ids, pos, slots, qsl = [], [], [], [0]
    for s, (ctx, new) in enumerate(chunks):
        for p in range(ctx, ctx + new):
            pos.append(p)
            slots.append(int(tables[s, p // BS]) * BS + p % BS)
        ids += torch.randint(0, 512, (new,), generator=gen).tolist()
        qsl.append(qsl[-1] + new)
    i32 = dict(dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, **i32),
        seq_lens=torch.tensor([c + n for c, n in chunks], **i32),
        context_lens=torch.tensor([c for c, _ in chunks], **i32),
        block_tables=tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(n for _, n in chunks),
        max_seq_len=max(c + n for c, n in chunks),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=[c + n for c, n in chunks],
        context_lens_cpu=[c for c, _ in chunks],
    )
    return torch.tensor(ids, device=device), torch.tensor(pos, device=device), meta


def _cache(device, dtype, gen) -> torch.Tensor:
    return torch.randn(NBLOCKS, LAYERS, 2, BS, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)


def _setup(dev, dtype, backend, seed: int, capture: bool = True):
    """A seeded generator, the small model, a random cache (and its copy the runner works
    on) and a runner of buckets up to 64 tokens."""
    gen = torch.Generator().manual_seed(seed)
    model = small_llama(dev, dtype)
    cache0 = _cache(dev, dtype, gen)
    cache = cache0.clone()
    runner = PrefillGraphRunner(model, backend, cache, 64, dev, dtype, capture=capture)
    return gen, model, cache0, cache, runner


class _Landing:
    """Records the layers the forward waited for (the store's LayerLanding interface)."""

    def __init__(self, log: list):
        self.log = log

    def wait_layer(self, i: int) -> None:
        self.log.append(("wait", i))


@torch.inference_mode()
def test_pieces_without_graphs_compute_the_eager_forward_cpu():
    dev = torch.device("cpu")
    backend = TorchAttentionBackend()
    gen, model, cache0, cache, runner = _setup(dev, torch.float32, backend, 0, capture=False)
    assert runner.sizes == [16, 32, 48, 64]
    # prefill over a cached prefix, a decode row, a fresh prefill: 37 + 1 + 9 = 47 tokens
    ids, pos, meta = _mixed_batch(dev, gen, [(20, 37), (50, 1), (0, 9)])
    eager = model(ids, pos, cache, meta, backend)
    eager_cache = cache.clone()
    cache.copy_(cache0)
    calls: list = []
    layer_forward = backend.forward

    def attend(*a, **kw):
        calls.append(("attend", a[4]))
        return layer_forward(*a, **kw)

    backend.forward = attend
    got = runner.run(ids, pos, meta, [_Landing(calls)]).clone()
    assert got.shape == eager.shape
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, eager_cache, rtol=1e-5, atol=1e-5)
    # only the real tokens' slots were written (the padding row has slot -1)
    touched = torch.zeros(NBLOCKS * BS, dtype=torch.bool)
    touched[meta.slot_mapping] = True
    untouched = ~touched.view(NBLOCKS, BS)
    for layer in range(LAYERS):
        assert torch.equal(
            cache[:, layer].transpose(1, 2)[untouched], cache0[:, layer].transpose(1, 2)[untouched]
        )
    # each layer waits for its part of a landing prefix before it attends
    assert calls == [("wait", 0), ("attend", 0), ("wait", 1), ("attend", 1)]
    # a second, smaller step reuses the buffers: stale rows beyond it do not leak in
    ids2, pos2, meta2 = _mixed_batch(dev, gen, [(0, 5), (30, 1)])
    cache.copy_(cache0)
    backend.forward = layer_forward
    ref = model(ids2, pos2, cache, meta2, backend)
    cache.copy_(cache0)
    torch.testing.assert_close(runner.run(ids2, pos2, meta2), ref, rtol=1e-5, atol=1e-5)


def test_decode_steps_and_oversized_steps_are_not_taken():
    dev = torch.device("cpu")
    gen, _, _, _, runner = _setup(dev, torch.float32, TorchAttentionBackend(), 1, capture=False)
    _, _, decode = _mixed_batch(dev, gen, [(10, 1), (20, 1)])
    _, _, mixed = _mixed_batch(dev, gen, [(10, 8), (20, 1)])
    assert not runner.can_run(decode, 2)
    assert runner.can_run(mixed, 9) and not runner.can_run(mixed, 65)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a CUDA device")
@torch.inference_mode()
def test_captured_pieces_match_the_eager_triton_forward():
    pytest.importorskip("triton")
    from kvgrid.layers.attention.triton_backend import TritonAttentionBackend

    backend = TritonAttentionBackend()
    gen, model, cache0, cache, runner = _setup(torch.device("cuda"), torch.bfloat16, backend, 2)
    runner.capture()
    dev = cache.device
    # 48 tokens fill their bucket: same shapes as eager, so the same bits; 47 are padded
    cases = [([(20, 37), (50, 1), (0, 10)], True), ([(20, 37), (50, 1), (0, 9)], False)]
    for chunks, exact in cases:
        ids, pos, meta = _mixed_batch(dev, gen, chunks)
        cache.copy_(cache0)
        eager = model(ids, pos, cache, meta, backend).clone()
        eager_cache = cache.clone()
        cache.copy_(cache0)
        got = runner.run(ids, pos, meta).clone()
        if exact:
            assert torch.equal(got, eager), "graph pieces differ from eager at the same shape"
            assert torch.equal(cache, eager_cache), "graph pieces wrote different KV"
        else:
            err = (got.float() - eager.float()).norm() / eager.float().norm()
            assert err < 1e-2, f"padded step: {err:.2e} from eager"
            kv_err = (cache.float() - eager_cache.float()).norm() / eager_cache.float().norm()
            assert kv_err < 1e-2
    assert runner.replays == 2


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a CUDA device")
def test_engine_with_prefill_graphs_generates_as_without():
    from kvgrid.engine.llm import LLM
    from kvgrid.engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 4000, (96,), generator=gen).tolist()
    prompts = [shared + torch.randint(0, 4000, (n,), generator=gen).tolist() for n in (40, 150, 7)]
    prompts.append(torch.randint(0, 4000, (300,), generator=gen).tolist())
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = []
    for tokens in (512, 0):
        llm = LLM(
            "smollm2-135m",
            load_format="dummy",
            max_model_len=1024,
            max_num_batched_tokens=256,
            num_kv_blocks=200,
            prefill_graph_tokens=tokens,
        )
        runner = llm.engine.runner
        assert (runner.prefill_graphs is not None) == (tokens > 0)
        outs.append([list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)])
        if tokens:
            assert runner.prefill_graphs.replays > 0
        llm.engine.close()
    a, b = outs
    assert [x[0] for x in a] == [x[0] for x in b]  # every request's first token
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    assert same >= 0.9 * sum(len(r) for r in a)
