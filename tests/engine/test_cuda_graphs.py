"""Decode CUDA graphs replay exactly what the eager Triton path computes (GPU only)."""

from __future__ import annotations

import itertools

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA graphs need a CUDA device", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from kvgrid.engine.cuda_graphs import DecodeGraphRunner, decode_buckets
from kvgrid.layers.attention.base import AttentionMetadata
from kvgrid.layers.attention.torch_ref import TorchAttentionBackend
from kvgrid.layers.attention.triton_backend import TritonAttentionBackend
from tests.support.small_llama import small_llama

DEV = torch.device("cuda")


def test_buckets_cover_every_batch_size():
    b = decode_buckets(256)
    assert b[:6] == [1, 2, 4, 8, 16, 32] and b[-1] == 256
    assert all(b2 <= 2 * b1 for b1, b2 in itertools.pairwise(b))
    assert decode_buckets(3) == [1, 2, 3]


def _meta(ctx: list[int], tables: torch.Tensor, block_size: int) -> AttentionMetadata:
    n = len(ctx)
    slots = [
        int(tables[i, c // block_size]) * block_size + c % block_size for i, c in enumerate(ctx)
    ]
    i32 = dict(dtype=torch.int32, device=DEV)
    return AttentionMetadata(
        query_start_loc=torch.arange(n + 1, **i32),
        seq_lens=torch.tensor([c + 1 for c in ctx], **i32),
        context_lens=torch.tensor(ctx, **i32),
        block_tables=tables.to(DEV),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEV),
        max_query_len=1,
        max_seq_len=max(ctx) + 1,
        query_start_loc_cpu=list(range(n + 1)),
        seq_lens_cpu=[c + 1 for c in ctx],
        context_lens_cpu=list(ctx),
    )


@torch.inference_mode()
def test_graph_replay_matches_eager_and_reference():
    model = small_llama(DEV, torch.bfloat16)
    bs, nblocks = 16, 128
    cache = torch.randn(nblocks, 2, 2, bs, 2, 32, device=DEV, dtype=torch.bfloat16)
    backend = TritonAttentionBackend()

    def fwd(ids, pos, meta):
        return model(ids, pos, cache, meta, backend)

    runner = DecodeGraphRunner(
        fwd, max_num_seqs=8, max_blocks_per_seq=16, max_seq_len=256, device=DEV
    )
    runner.capture()
    gen = torch.Generator().manual_seed(0)
    for ctx in ([5], [17, 100, 3], [64, 1, 33, 200, 8]):
        n = len(ctx)
        tables = torch.randperm(nblocks - 1, generator=gen)[: n * 16].view(n, 16).int() + 1
        meta = _meta(ctx, tables, bs)
        ids = torch.randint(0, 512, (n,), generator=gen).to(DEV)
        pos = torch.tensor(ctx, device=DEV)
        before = cache.clone()
        eager = fwd(ids, pos, meta)
        after_eager = cache.clone()
        cache.copy_(before)
        replay = runner.run(ids, pos, meta).clone()
        assert torch.equal(cache, after_eager), "graph wrote different KV than eager"
        assert torch.allclose(replay.float(), eager.float(), atol=1e-2, rtol=1e-2)
        cache.copy_(before)
        ref = model(ids, pos, cache, meta, TorchAttentionBackend())
        err = (replay.float() - ref.float()).norm() / ref.float().norm()
        assert err < 2e-2, f"graph vs torch reference: {err:.2e}"
    assert runner.replays == 3


@torch.inference_mode()
@pytest.mark.skipif(torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm_90+")
def test_pdl_launches_replay_bitwise_what_plain_launches_compute(monkeypatch):
    """Programmatic dependent launch only moves when kernels start: graphs captured with
    and without it write the same KV and return the same hidden states, bit for bit."""
    from kvgrid.layers import pdl

    model = small_llama(DEV, torch.bfloat16)
    bs, nblocks = 16, 128
    cache0 = torch.randn(nblocks, 2, 2, bs, 2, 32, device=DEV, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    ctx = [17, 100, 3, 64]
    tables = torch.randperm(nblocks - 1, generator=gen)[: 4 * 16].view(4, 16).int() + 1
    meta = _meta(ctx, tables, bs)
    ids = torch.randint(0, 512, (4,), generator=gen).to(DEV)
    pos = torch.tensor(ctx, device=DEV)
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(pdl, "ENABLED", enabled)
        cache = cache0.clone()
        backend = TritonAttentionBackend()
        runner = DecodeGraphRunner(
            lambda i, p, m, c=cache, b=backend: model(i, p, c, m, b),
            max_num_seqs=4,
            max_blocks_per_seq=16,
            max_seq_len=256,
            device=DEV,
        )
        runner.capture()
        cache.copy_(cache0)
        results.append((runner.run(ids, pos, meta).clone(), cache.clone()))
    assert torch.equal(results[0][1], results[1][1]), "KV differs with PDL"
    assert torch.equal(results[0][0], results[1][0]), "hidden states differ with PDL"
