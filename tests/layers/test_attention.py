"""Triton paged attention against the torch reference backend, on random paged caches.

On a machine without a GPU these run under Triton's interpreter (TRITON_INTERPRET=1, set
below before triton is imported) in float32: the interpreter mis-computes ``tl.dot`` on
bfloat16 operands, so 16-bit inputs are checked on the GPU (kvgrid.bench.gpu.engine) only.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.support import triton_interp

triton_interp.setup()
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from kvgrid.layers.attention import triton_kernels as tk  # noqa: E402
from kvgrid.layers.attention.base import AttentionMetadata  # noqa: E402
from kvgrid.layers.attention.torch_ref import TorchAttentionBackend  # noqa: E402
from kvgrid.layers.attention.triton_backend import TritonAttentionBackend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = 1e-4 if DEVICE == "cpu" else 2e-2


def make_batch(
    gen: torch.Generator,
    ctx_lens: list[int],
    q_lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    num_layers: int = 2,
):
    """A paged cache holding each sequence's context, and this step's new q/k/v."""
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    # scattered, non-monotonic block ids; block 0 stays unused as padding
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    max_blocks = max(blocks_per_seq) + 1
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    slots, owned = [], 0
    for i, (c, s) in enumerate(zip(ctx_lens, seq_lens)):
        ids = perm[owned : owned + blocks_per_seq[i]]
        owned += blocks_per_seq[i]
        tables[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        slots += [ids[p // block_size] * block_size + p % block_size for p in range(c, s)]
    cache = torch.randn(
        num_blocks, num_layers, 2, block_size, kv_heads, head_dim, generator=gen
    ).to(DTYPE)
    t = sum(q_lens)
    q = torch.randn(t, heads, head_dim, generator=gen).to(DTYPE)
    k = torch.randn(t, kv_heads, head_dim, generator=gen).to(DTYPE)
    v = torch.randn(t, kv_heads, head_dim, generator=gen).to(DTYPE)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=DEVICE)

    meta = AttentionMetadata(
        query_start_loc=i32(qsl),
        seq_lens=i32(seq_lens),
        context_lens=i32(ctx_lens),
        block_tables=tables.to(DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
        context_lens_cpu=list(ctx_lens),
    )
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cache.to(DEVICE), meta


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def check(backend, gen, ctx_lens, q_lens, heads, kv_heads, head_dim, block_size, layer=1):
    q, k, v, cache, meta = make_batch(gen, ctx_lens, q_lens, heads, kv_heads, head_dim, block_size)
    ref_cache = cache.clone()
    scale = head_dim**-0.5
    ref = TorchAttentionBackend().forward(q, k, v, ref_cache, layer, meta, scale)
    out = backend.forward(q, k, v, cache, layer, meta, scale)
    assert torch.isfinite(out).all(), "non-finite attention output"
    err = rel_err(out, ref)
    assert err < TOL, f"relative error {err:.2e} (ctx={ctx_lens}, q={q_lens})"
    # the fused KV write stored exactly the new keys and values, and nothing else
    assert torch.equal(cache, ref_cache), "KV cache differs from the reference write"


SHAPES = [
    # (heads, kv_heads, head_dim, block_size): GQA ratios 1, 4, 8
    (4, 4, 64, 16),
    (8, 2, 128, 64),
    (8, 1, 64, 64),
    (16, 2, 128, 16),
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES)
def test_mixed_decode_prefill_and_cached_prefix(heads, kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim + block_size)
    backend = TritonAttentionBackend()
    # decodes (one new token over a context), a fresh prompt, two cached-prefix chunks
    ctx = [37, 0, 70, 5, 129]
    new = [1, 23, 9, 1, 40]
    check(backend, gen, ctx, new, heads, kv_heads, head_dim, block_size)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES)
def test_decode_only(heads, kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(7 + heads + block_size)
    check(
        TritonAttentionBackend(),
        gen,
        [1, 63, 64, 200],
        [1, 1, 1, 1],
        heads,
        kv_heads,
        head_dim,
        block_size,
    )


@pytest.mark.parametrize("splits", [2, 4, 8])
def test_split_kv_decode_matches_unsplit(splits):
    """Flash-decoding: partial softmaxes over key ranges reduce to the one-pass result."""
    gen = torch.Generator().manual_seed(splits)
    q, k, v, cache, meta = make_batch(gen, [300, 5, 130], [1, 1, 1], 8, 2, 64, 16)
    layer_cache = cache[:, 0]
    dot = tk.dot_dtype_for(DTYPE)
    tk.kv_write(k, v, layer_cache, meta.slot_mapping)
    args = (q, layer_cache, meta.block_tables, meta.seq_lens, 0.125)
    one = tk.paged_decode(*args, 1, torch.empty_like(q), dot)
    many = tk.paged_decode(*args, splits, torch.full_like(q, float("nan")), dot)
    assert torch.isfinite(many).all()
    assert rel_err(many, one) < TOL


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_with_rope_is_the_separate_rope_kernel_then_decode(splits, monkeypatch):
    """Decode steps fold RoPE and the K/V store into the attention kernel: the same cache
    and output as the separate rope_kv kernel then decode, bit for bit, and the torch
    reference's within tolerance. The new token opens a block, ends one, sits alone, and
    one row is CUDA-graph padding (no slot, nothing stored, zeros out)."""
    from kvgrid.layers import fused_ops

    monkeypatch.setattr(fused_ops, "force_triton", True)  # the separate kernel on CPU too
    gen = torch.Generator().manual_seed(splits)
    ctx = [64, 127, 0, 300, 0]
    q, k, v, cache, meta = make_batch(gen, ctx, [1] * len(ctx), 8, 2, 64, 16)
    meta.slot_mapping[-1] = -1
    meta.seq_lens[-1] = 0
    positions = torch.tensor(ctx, device=DEVICE)
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    ang = torch.outer(torch.arange(512, dtype=torch.float32), inv)
    cos = torch.cat([ang, ang], -1).cos().to(DEVICE)
    sin = torch.cat([ang, ang], -1).sin().to(DEVICE)
    args = (positions, q, k, v, cos, sin)
    monkeypatch.setattr(tk, "decode_num_splits", lambda *a: splits)
    runs = {}
    for fuse in (True, False):
        c = cache.clone()
        backend = TritonAttentionBackend(fuse_decode_rope=fuse)
        runs[fuse] = (backend.forward_rope(*args, c, 1, meta, 0.125), c)
    assert torch.equal(runs[True][1], runs[False][1]), "KV cache differs"
    assert torch.equal(runs[True][0], runs[False][0]), "attention output differs"
    assert not runs[True][0][-1].any()
    ref_cache = cache.clone()
    ref = TorchAttentionBackend().forward_rope(*args, ref_cache, 1, meta, 0.125)
    assert rel_err(runs[True][0][:-1], ref[:-1]) < TOL
    assert rel_err(runs[True][1], ref_cache) < TOL


def test_decode_padding_rows_are_inert():
    """CUDA-graph padding: slot -1 writes nothing, seq_len 0 yields zeros, not NaN."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, cache, meta = make_batch(gen, [20, 0], [1, 1], 4, 2, 64, 16)
    before = cache.clone()
    layer_cache = cache[:, 0]
    tk.kv_write(k, v, layer_cache, torch.full_like(meta.slot_mapping, -1))
    assert torch.equal(cache, before)
    seq_lens = meta.seq_lens.clone()
    seq_lens[1] = 0
    out = tk.paged_decode(
        q,
        layer_cache,
        meta.block_tables,
        seq_lens,
        0.125,
        4,
        torch.empty_like(q),
        tk.dot_dtype_for(DTYPE),
    )
    assert torch.isfinite(out).all() and not out[1].any()


@pytest.mark.parametrize("sdpa", [True, False])
def test_fresh_prefill_sdpa_and_kernel(sdpa):
    gen = torch.Generator().manual_seed(11)
    backend = TritonAttentionBackend(sdpa_min_query_len=1 if sdpa else 10**9)
    ctx, new = [0, 0, 0], [17, 64, 3]
    meta = make_batch(gen, ctx, new, 8, 2, 64, 16)[-1]
    assert backend.use_sdpa(meta) is sdpa
    check(backend, gen, ctx, new, 8, 2, 64, 16)


def test_sdpa_not_used_over_a_cached_prefix():
    gen = torch.Generator().manual_seed(5)
    _, _, _, _, meta = make_batch(gen, [64, 0], [600, 600], 8, 2, 64, 64)
    assert not TritonAttentionBackend().use_sdpa(meta)


def test_sdpa_padding_lengths():
    from kvgrid.layers.attention.triton_backend import sdpa_padded_len

    for n in (1, 3, 64, 65, 511, 512, 513, 8190, 8192, 8193, 32768, 40000):
        p = sdpa_padded_len(n)
        assert n <= p <= max(64, n * 1.0625), (n, p)
    # few distinct shapes: one per 1/16 octave
    assert len({sdpa_padded_len(n) for n in range(8193, 16385)}) == 16


@pytest.mark.parametrize("top", [1, 64, 65, 5000, 8192, 20000])
def test_sdpa_lengths_are_every_padded_length(top):
    from kvgrid.layers.attention.triton_backend import sdpa_lengths, sdpa_padded_len

    assert sdpa_lengths(top) == sorted({sdpa_padded_len(n) for n in range(1, top + 1)})


def _sdpa_step_host_s(backend, n: int) -> float:
    """Host time of one fresh prefill of ``n`` tokens through the SDPA path (8B shape)."""
    gen = torch.Generator().manual_seed(n)
    q, k, v, _, meta = make_batch(gen, [0], [n], 32, 8, 128, 64, num_layers=1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    backend._sdpa_fresh(q, k, v, meta, 0.088, torch.empty_like(q))
    return time.perf_counter() - t0


@pytest.mark.skipif(DEVICE != "cuda", reason="cuDNN's attention plans (CUDA only)")
def test_warm_sdpa_builds_the_plans_a_fresh_prefill_uses():
    """A fresh prefill at a length never seen launches without building a plan once this
    thread is warmed; another thread, not warmed, still builds its own (cuDNN keeps them
    per thread), which is why the engine warms the thread that steps."""
    backend = TritonAttentionBackend(sdpa_min_query_len=1)
    assert backend.warm_sdpa(32, 8, 128, 6000, DTYPE, DEVICE)
    assert not backend.warm_sdpa(32, 8, 128, 6000, DTYPE, DEVICE)  # once per thread
    warm = [_sdpa_step_host_s(backend, n) for n in (4993, 5377, 700, 81)]
    cold: list[float] = []
    t = threading.Thread(target=lambda: cold.append(_sdpa_step_host_s(backend, 4993)))
    t.start()
    t.join()
    assert max(warm) < 0.01 < cold[0], (warm, cold)


@pytest.mark.parametrize("splits", [2, 4, 8])
def test_split_kv_prefill_matches_unsplit(splits):
    """A short chunk over a long cached context scans the keys in splits (a new turn over
    a long conversation): same result as one pass, including splits that see no key."""
    gen = torch.Generator().manual_seed(20 + splits)
    q, k, v, cache, meta = make_batch(gen, [700, 0, 3], [40, 9, 1], 8, 2, 64, 16)
    layer_cache = cache[:, 0]
    dot = tk.dot_dtype_for(DTYPE)
    tk.kv_write(k, v, layer_cache, meta.slot_mapping)
    args = (q, layer_cache, meta.block_tables, meta.query_start_loc, meta.context_lens)
    one = tk.paged_prefill(*args, meta.max_query_len, 0.125, torch.empty_like(q), dot,
                           num_splits=1)  # fmt: skip
    many = tk.paged_prefill(*args, meta.max_query_len, 0.125, torch.full_like(q, float("nan")),
                            dot, num_splits=splits)  # fmt: skip
    assert torch.isfinite(many).all()
    assert rel_err(many, one) < TOL


def test_prefill_splits_only_when_the_gpu_would_idle():
    assert tk.prefill_num_splits(16, 32768, 132) == 16  # 64 new tokens over 32K keys
    assert tk.prefill_num_splits(200, 32768, 132) == 1  # enough query tiles already
    assert tk.prefill_num_splits(16, 700, 132) == 1  # too few keys to be worth it
    assert tk.prefill_num_splits(1, 1 << 20, 132) == 32


def test_backend_splits_a_short_chunk_over_a_long_context():
    gen = torch.Generator().manual_seed(31)
    backend = TritonAttentionBackend()
    backend._num_sms = 64  # as on a GPU: few query tiles leave most SMs idle
    check(backend, gen, [1500], [20], 8, 2, 64, 16)


@pytest.mark.parametrize("split_mixed", [True, False])
def test_mixed_batch_decode_rows_through_the_decode_kernel(split_mixed, monkeypatch):
    """The scheduler's order: decodes first (long contexts), then prefill chunks, one of
    them a single token over a cached prefix. The leading decode rows go to the decode
    kernel (split over their long contexts), the rest to the prefill kernel; the result is
    the reference's either way."""
    calls = {"decode": [], "prefill": []}
    real_decode, real_prefill = tk.paged_decode, tk.paged_prefill

    def decode(q, *a, **kw):
        calls["decode"].append((q.shape[0], a[4]))
        return real_decode(q, *a, **kw)

    def prefill(q, cache, tables, qsl, *a, **kw):
        calls["prefill"].append(qsl.shape[0] - 1 - kw.get("first_seq", 0))
        return real_prefill(q, cache, tables, qsl, *a, **kw)

    monkeypatch.setattr(tk, "paged_decode", decode)
    monkeypatch.setattr(tk, "paged_prefill", prefill)
    backend = TritonAttentionBackend(mixed_decode_min_rows=2 if split_mixed else 1 << 30)
    backend._num_sms = 64
    gen = torch.Generator().manual_seed(41)
    batch = ([900, 1, 300, 0, 450], [1, 1, 17, 30, 1], 8, 2, 64, 16)
    check(backend, gen, *batch)
    if split_mixed:
        (n, splits), = calls["decode"]  # fmt: skip
        assert n == 2 and splits > 1, calls
        assert calls["prefill"] == [3]
    else:
        assert calls == {"decode": [], "prefill": [5]}
    # fewer decode rows than the threshold: all rows stay in the prefill kernel
    calls["decode"].clear()
    calls["prefill"].clear()
    backend.mixed_decode_min_rows = 3
    check(backend, gen, *batch)
    assert calls == {"decode": [], "prefill": [5]}


def test_leading_decodes():
    from kvgrid.layers.attention.triton_backend import leading_decodes

    assert leading_decodes([0, 1, 2, 30]) == 2
    assert leading_decodes([0, 5, 6, 7]) == 0  # a q_len-1 row after a prefill stays there
    assert leading_decodes([0, 1, 2]) == 1  # one sequence is left to the prefill kernel
    assert leading_decodes([0, 40]) == 0


def test_prefill_splits_count_only_tiles_with_work(monkeypatch):
    """A 20-token chunk over a long context next to many one-token rows: the grid is
    sequences x the longest query's tiles, but only the chunk's tiles scan keys, so the
    keys are still split across the idle SMs."""
    seen = []
    real = tk.prefill_num_splits
    monkeypatch.setattr(tk, "prefill_num_splits", lambda *a: seen.append(a) or real(*a))
    backend = TritonAttentionBackend(mixed_decode_min_rows=1 << 30)
    backend._num_sms = 64
    gen = torch.Generator().manual_seed(43)
    check(backend, gen, [2000] + [3] * 12, [20] + [1] * 12, 8, 2, 64, 16)
    (programs, _, _), = seen  # fmt: skip
    # tiles with work x KV heads: the chunk's 2 tiles of 16 tokens and one per 1-token
    # row, not 13 sequences x 2 tiles
    assert programs == (2 + 12) * 2


def _compiled(fn) -> int:
    return sum(len(c[0]) for c in fn.device_caches.values())


@pytest.mark.skipif(DEVICE != "cuda", reason="compiles for the GPU (CUDA only)")
def test_warm_up_compiles_every_variant_a_mixed_step_uses():
    """After the warm-up, mixed steps of any shape (decode rows with long contexts, block
    tables of any width, chunks over long prefixes) compile nothing new."""
    backend = TritonAttentionBackend(mixed_decode_min_rows=1)
    gen = torch.Generator().manual_seed(47)
    _, _, _, cache, _ = make_batch(gen, [1], [1], 32, 8, 128, 64)
    backend.warm_up(cache, 32)
    kernels = (tk._decode_kernel, tk._prefill_kernel, tk._decode_reduce_kernel)
    before = [_compiled(k) for k in kernels]
    for ctx, new in (([5000, 70, 3], [1, 1, 200]), ([1, 900], [1, 30]), ([20000], [64]),
                     ([3, 4000, 0], [1, 1, 300])):  # fmt: skip
        check(backend, gen, ctx, new, 32, 8, 128, 64)
    assert [_compiled(k) for k in kernels] == before
