"""Triton kernels over the paged KV cache: KV write, split-KV decode, varlen prefill.

Layout (base.py): ``kv_cache[:, layer]`` is ``[num_blocks, 2, block_size, kvh, head_dim]``,
strided (the layer axis sits between blocks). Every kernel takes the four leading strides
of that view and assumes only that ``head_dim`` is contiguous.

Query heads are grouped per KV head (GQA): one program owns one KV head and all of its
``G = num_heads // num_kv_heads`` query heads, packed as extra rows of the query tile, so
each K/V tile is read from memory once per group instead of once per query head.
Rows are padded to a power of two (and at least 16, the smallest ``tl.dot`` tile).

Softmax uses base-2 exponentials: scores are pre-multiplied by ``scale * log2(e)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvgrid.layers import pdl
from kvgrid.layers.pdl_kernels import pdl_start

LOG2E = 1.4426950408889634


@triton.jit
def _kv_write_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ckv,
    stride_ct,
    stride_ch,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding rows (CUDA-graph buckets) write nothing
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = cache_ptr + blk * stride_cb + off * stride_ct + h * stride_ch + d
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def kv_write(
    k: torch.Tensor, v: torch.Tensor, layer_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store ``k``/``v`` ``[T, kvh, d]`` into ``layer_cache`` at ``slots`` (negative: skip)."""
    t, kvh, d = k.shape
    if t == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and layer_cache.stride(-1) == 1
    _kv_write_kernel[(t,)](
        k,
        v,
        layer_cache,
        slots,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        layer_cache.stride(0),
        layer_cache.stride(1),
        layer_cache.stride(2),
        layer_cache.stride(3),
        BLOCK_SIZE=layer_cache.shape[2],
        NUM_KV_HEADS=kvh,
        HEAD_DIM=d,
        BLOCK_H=triton.next_power_of_2(kvh),
        BLOCK_D=triton.next_power_of_2(d),
    )


# ---- decode: one query token per sequence, split-KV (flash-decoding) -----------------------


@triton.jit(do_not_specialize=["stride_bt"])  # see _prefill_kernel
def _decode_kernel(
    q_ptr,
    cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    out_ptr,  # [S, H, D] when NUM_SPLITS == 1
    part_o_ptr,  # [S, H, NUM_SPLITS, D] float32
    part_lse_ptr,  # [S, H, NUM_SPLITS] float32
    # ROPE only: q (and k) come unrotated; rotate them, store k and v at the new token's slot
    k_ptr,  # [S, KVH, D]
    v_ptr,
    pos_ptr,  # [S] positions of the new tokens
    cos_ptr,  # [max_pos, D] float32, both halves equal (rotate-half layout)
    sin_ptr,
    slot_ptr,  # [S] int64 cache slots; negative: no write (CUDA-graph padding)
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_ckv,
    stride_ct,
    stride_ch,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ROPE: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (layers/pdl.py)
):
    pdl_start(PDL)
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + s)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    qmask = gmask[:, None] & dmask[None, :]
    q_rows = q_ptr + s * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=qmask, other=0.0)

    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    t_lo = split * per_split
    t_hi = tl.minimum(t_lo + per_split, num_tiles)

    if ROPE:
        # the arithmetic and roundings of fused_kernels._rope_kv_kernel, which this
        # replaces in decode steps: one kernel per layer fewer
        pos = tl.load(pos_ptr + s).to(tl.int64)
        c = tl.load(cos_ptr + pos * stride_cos + d, mask=dmask, other=0.0)
        sn = tl.load(sin_ptr + pos * stride_cos + d, mask=dmask, other=0.0)
        partner = (d + HEAD_DIM // 2) % HEAD_DIM
        sign = tl.where(d < HEAD_DIM // 2, -1.0, 1.0)
        q_p = tl.load(q_rows + partner[None, :], mask=qmask, other=0.0).to(tl.float32)
        q = q.to(tl.float32) * c[None, :] + sign[None, :] * q_p * sn[None, :]
        q = q.to(q_ptr.dtype.element_ty)
        # the program whose keys include the new token stores it, then reads it back
        last_tile = (seq_len - 1) // BLOCK_N
        slot = tl.load(slot_ptr + s).to(tl.int64)
        if (seq_len > 0) & (t_lo <= last_tile) & (last_tile < t_hi) & (slot >= 0):
            kp = k_ptr + s * stride_kt + kvh * stride_kh
            k_new = tl.load(kp + d, mask=dmask, other=0.0).to(tl.float32)
            k_p = tl.load(kp + partner, mask=dmask, other=0.0).to(tl.float32)
            k_rot = (k_new * c + sign * k_p * sn).to(k_ptr.dtype.element_ty)
            v_new = tl.load(v_ptr + s * stride_vt + kvh * stride_vh + d, mask=dmask)
            dst = (
                cache_ptr
                + (slot // BLOCK_SIZE) * stride_cb
                + (slot % BLOCK_SIZE) * stride_ct
                + kvh * stride_ch
                + d
            )
            cty = cache_ptr.dtype.element_ty
            tl.store(dst, k_rot.to(cty), mask=dmask)
            tl.store(dst + stride_ckv, v_new.to(cty), mask=dmask)
            tl.debug_barrier()  # the loop's loads of this tile, by other threads, see it
    q = q.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    kv_base = cache_ptr + kvh * stride_ch
    for tile in range(t_lo, t_hi):
        tok = tile * BLOCK_N + n
        nmask = tok < seq_len
        blk = tl.load(block_table_ptr + s * stride_bt + tok // BLOCK_SIZE, mask=nmask, other=0)
        row = blk.to(tl.int64) * stride_cb + (tok % BLOCK_SIZE) * stride_ct
        ptrs = kv_base + row[:, None] + d[None, :]
        lmask = nmask[:, None] & dmask[None, :]
        k = tl.load(ptrs, mask=lmask, other=0.0).to(DOT_DTYPE)
        v = tl.load(ptrs + stride_ckv, mask=lmask, other=0.0).to(DOT_DTYPE)
        sc = tl.dot(q, tl.trans(k)) * qk_scale
        sc = tl.where(nmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v)
        m_i = m_new

    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + s * stride_ot + heads[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=gmask[:, None] & dmask[None, :],
        )
    else:
        # partial result of this split: normalised output and its log2-sum-exp
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        pidx = (s * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split
        tl.store(part_lse_ptr + pidx, lse, mask=gmask)
        tl.store(
            part_o_ptr + pidx[:, None] * HEAD_DIM + d[None, :],
            o,
            mask=gmask[:, None] & dmask[None, :],
        )


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (layers/pdl.py)
):
    pdl_start(PDL)
    s = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    base = (s * NUM_HEADS + h) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + sp)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(
        part_o_ptr + (base + sp)[:, None] * HEAD_DIM + d[None, :],
        mask=d[None, :] < HEAD_DIM,
        other=0.0,
    )
    den = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    tl.store(
        out_ptr + s * stride_ot + h * stride_oh + d,
        res.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


def _reduce_splits(
    part_o: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, num_splits: int
) -> None:
    """Combine the per-split partial results of [rows, H, NUM_SPLITS] into ``out``."""
    rows, h, d = out.shape
    _decode_reduce_kernel[(rows, h)](
        part_o,
        part_lse,
        out,
        out.stride(0),
        out.stride(1),
        NUM_HEADS=h,
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        NUM_SPLITS=num_splits,
        **pdl.launch_kwargs(out),
    )


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Enough splits to give every SM about two programs, none shorter than 256 keys."""
    if num_seqs * num_kv_heads >= num_sms:
        return 1
    want = max(1, (2 * num_sms) // max(1, num_seqs * num_kv_heads))
    cap = max(1, max_seq_len // 256)
    return min(triton.next_power_of_2(want), triton.next_power_of_2(cap), 32)


class DecodeRope(NamedTuple):
    """What ``paged_decode`` needs to rotate q and k itself and store the new K/V."""

    k: torch.Tensor  # [S, kvh, D], unrotated; last dim contiguous
    v: torch.Tensor
    positions: torch.Tensor  # [S]
    cos: torch.Tensor  # [max_pos, D] float32
    sin: torch.Tensor
    slots: torch.Tensor  # [S] int64; negative: no write


def paged_decode(
    q: torch.Tensor,  # [S, H, D], one token per sequence
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor,
    dot_dtype: tl.dtype,
    rope: DecodeRope | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context, into ``out``; with
    ``num_splits > 1`` each (sequence, KV head) is spread over that many programs whose
    partial results a second kernel combines. With ``rope``, ``q`` is unrotated and the
    new K/V are not in the cache yet: this kernel does what ``fused_ops.rope_kv_write``
    would have done first. The tile defaults are the best or within 2% of it in
    kvgrid.bench.gpu.decode_attn's sweep (H200) for batch 1 to 128 at 1K context."""
    s, h, d = q.shape
    kvh = layer_cache.shape[3]
    group = h // kvh
    if num_splits > 1:
        part_o = torch.empty(s, h, num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(s, h, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    if rope is not None:
        assert rope.k.stride(-1) == 1 and rope.v.stride(-1) == 1 and q.stride(-1) == 1
        k, v, pos, cos, sin, slots = rope
        rope_strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0))
    else:  # unused pointers
        k = v = pos = cos = sin = slots = seq_lens
        rope_strides = (0,) * 5
    _decode_kernel[(s, kvh, num_splits)](
        q,
        layer_cache,
        block_tables,
        seq_lens,
        out,
        part_o,
        part_lse,
        k,
        v,
        pos,
        cos,
        sin,
        slots,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        *rope_strides,
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        layer_cache.stride(0),
        layer_cache.stride(1),
        layer_cache.stride(2),
        layer_cache.stride(3),
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_SIZE=layer_cache.shape[2],
        BLOCK_N=block_n,  # block ids are gathered per key, so a tile may span several pages
        NUM_SPLITS=num_splits,
        DOT_DTYPE=dot_dtype,
        ROPE=rope is not None,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl.launch_kwargs(q),
    )
    if num_splits > 1:
        _reduce_splits(part_o, part_lse, out, num_splits)
    return out


# ---- prefill / mixed: varlen queries, causal with a context offset ---------------------------


# a step's block-table width and first sequence vary: not specialised on (one compiled
# variant for all of them, which ModelRunner's warm-up compiles before serving)
@triton.jit(do_not_specialize=["first_seq", "stride_bt"])
def _prefill_kernel(
    q_ptr,
    cache_ptr,
    block_table_ptr,
    query_start_ptr,
    context_lens_ptr,
    out_ptr,  # [T, H, D] when NUM_SPLITS == 1
    part_o_ptr,  # [T, H, NUM_SPLITS, D] float32
    part_lse_ptr,  # [T, H, NUM_SPLITS] float32
    qk_scale,
    first_seq,  # sequences before this one are not this launch's (decode rows)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_ckv,
    stride_ct,
    stride_ch,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per program; rows = BLOCK_Q * G_PAD
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    qt = tl.program_id(0) // NUM_SPLITS
    split = tl.program_id(0) % NUM_SPLITS
    s = tl.program_id(1) + first_seq
    kvh = tl.program_id(2)
    q0 = tl.load(query_start_ptr + s)
    q_len = tl.load(query_start_ptr + s + 1) - q0
    if qt * BLOCK_Q >= q_len:
        return
    ctx = tl.load(context_lens_ptr + s)

    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    r = tl.arange(0, BLOCK_M)
    tok = qt * BLOCK_Q + r // G_PAD  # index within this sequence's new tokens
    g = r % G_PAD
    rmask = (tok < q_len) & (g < GROUP)
    pos = ctx + tok  # absolute position: sees keys 0..pos
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + (q0 + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    kv_base = cache_ptr + kvh * stride_ch
    first_pos = ctx + qt * BLOCK_Q
    last_pos = tl.minimum(ctx + q_len, first_pos + BLOCK_Q) - 1
    # keys before first_pos are seen by every row: no causal mask for those whole tiles
    n_full = first_pos // BLOCK_N
    n_all = tl.cdiv(last_pos + 1, BLOCK_N)
    per_split = tl.cdiv(n_all, NUM_SPLITS)
    t_lo = split * per_split
    t_hi = tl.minimum(t_lo + per_split, n_all)
    for tile in range(t_lo, t_hi):
        kt = tile * BLOCK_N + n
        nmask = kt <= last_pos
        blk = tl.load(block_table_ptr + s * stride_bt + kt // BLOCK_SIZE, mask=nmask, other=0)
        row = blk.to(tl.int64) * stride_cb + (kt % BLOCK_SIZE) * stride_ct
        ptrs = kv_base + row[:, None] + d[None, :]
        lmask = nmask[:, None] & dmask[None, :]
        k = tl.load(ptrs, mask=lmask, other=0.0).to(DOT_DTYPE)
        v = tl.load(ptrs + stride_ckv, mask=lmask, other=0.0).to(DOT_DTYPE)
        sc = tl.dot(q, tl.trans(k)) * qk_scale
        if tile >= n_full:
            sc = tl.where(kt[None, :] <= pos[:, None], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        # rows with no visible key yet keep m = -inf; avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + (q0 + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=rmask[:, None] & dmask[None, :],
        )
    else:
        # this split's partial result per row, as the decode kernel leaves it: the same
        # reduction kernel combines them (a split with no visible key has lse -inf)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        pidx = ((q0 + tok) * (GROUP * tl.num_programs(2)) + heads) * NUM_SPLITS + split
        tl.store(part_lse_ptr + pidx, lse, mask=rmask)
        tl.store(
            part_o_ptr + pidx[:, None] * HEAD_DIM + d[None, :],
            o,
            mask=rmask[:, None] & dmask[None, :],
        )


def paged_prefill(
    q: torch.Tensor,  # [T, H, D]
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
    dot_dtype: tl.dtype,
    max_seq_len: int = 0,
    num_sms: int = 0,
    num_splits: int | None = None,
    query_lens: list[int] | None = None,
    first_seq: int = 0,
) -> torch.Tensor:
    """Varlen causal attention of new tokens over their cached context. A few query tiles
    over a long context (a new turn of a long conversation, the tail of a prompt loaded
    from the store) would occupy only a handful of SMs for the whole scan, so the keys are
    then split across programs and the partial results reduced (``num_splits``: forced,
    else chosen from ``max_seq_len``, ``num_sms`` and the tiles that have work: from
    ``query_lens`` where given, else as if every sequence had ``max_query_len``). Sequences
    before ``first_seq`` are left alone (their rows go through ``paged_decode``); the
    per-sequence arguments still cover the whole batch."""
    t, h, d = q.shape
    kvh = layer_cache.shape[3]
    group = h // kvh
    g_pad = triton.next_power_of_2(group)
    num_seqs = query_start_loc.shape[0] - 1 - first_seq
    # rows = query tokens x padded group: 64 for short queries, 128 for long ones
    rows = 128 if max_query_len * g_pad >= 128 and d <= 128 else 64
    block_q = max(1, rows // g_pad)
    block_size = layer_cache.shape[2]
    block_n = 64 if block_q * g_pad <= 64 else 32
    q_tiles = triton.cdiv(max_query_len, block_q)
    if num_splits is None:
        # the grid's programs past a sequence's own query length return at once
        lens = query_lens or [max_query_len] * num_seqs
        busy = sum(triton.cdiv(n, block_q) for n in lens)
        num_splits = prefill_num_splits(busy * kvh, max_seq_len, num_sms)
    if num_splits > 1:
        part_o = torch.empty(t, h, num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(t, h, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    grid = (q_tiles * num_splits, num_seqs, kvh)
    _prefill_kernel[grid](
        q,
        layer_cache,
        block_tables,
        query_start_loc,
        context_lens,
        out,
        part_o,
        part_lse,
        scale * LOG2E,
        first_seq,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        layer_cache.stride(0),
        layer_cache.stride(1),
        layer_cache.stride(2),
        layer_cache.stride(3),
        GROUP=group,
        G_PAD=g_pad,
        BLOCK_Q=block_q,
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DOT_DTYPE=dot_dtype,
        num_warps=8 if block_q * g_pad >= 128 else 4,
        num_stages=2,
    )
    if num_splits > 1:
        _reduce_splits(part_o, part_lse, out, num_splits)
    return out


def prefill_num_splits(num_programs: int, max_seq_len: int, num_sms: int) -> int:
    """Key splits for a prefill launch of ``num_programs`` query tiles: about two programs
    per SM, none scanning fewer than 512 keys; 1 when the tiles alone fill the GPU."""
    if num_sms <= 0 or num_programs >= num_sms:
        return 1
    want = (2 * num_sms) // max(1, num_programs)
    cap = max_seq_len // 512
    if cap < 2:
        return 1
    return min(triton.next_power_of_2(want), 1 << (cap.bit_length() - 1), 32)


def dot_dtype_for(dtype: torch.dtype) -> tl.dtype:
    """Operand type of the matrix products: the cache's own 16-bit type, else float32."""
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, tl.float32)


__all__ = [
    "LOG2E",
    "DecodeRope",
    "decode_num_splits",
    "dot_dtype_for",
    "kv_write",
    "paged_decode",
    "paged_prefill",
    "prefill_num_splits",
]
