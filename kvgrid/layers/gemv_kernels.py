"""Triton kernels of kvgrid.layers.gemv (imported on first use, so a CPU-only run never
imports triton and tests can switch on the interpreter before these are defined)."""

from __future__ import annotations

import triton
import triton.language as tl

from kvgrid.layers.pdl_kernels import pdl_start


# M is not specialised on 1: the tensor-core variant then serves every M with one compile
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr,  # [M, K], last dim contiguous
    w_ptr,  # [N, K] row-major
    b_ptr,  # [N] bias (read only with HAS_BIAS)
    out_ptr,  # y [M, N]; with PARTIAL fp32 partials [splits, M, N]; SILU_MUL: [M, N // 2]
    M,
    N,
    K,
    k_per_split,  # a multiple of BLOCK_K
    stride_xm,
    stride_wn,
    stride_om,
    stride_os,  # partials: the stride between splits
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,  # split-K: store fp32 partials for _gemv_reduce_kernel
    # w = [gate; up] (N = 2I): each program takes BLOCK_N // 2 rows of both halves and
    # stores silu(gate) * up, so the activation needs neither a kernel nor a round trip
    SILU_MUL: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % k_per_split == 0: no K masks, so loads stay vectorised
    USE_DOT: tl.constexpr,  # tensor cores, BLOCK_M == 16; else FMA, M == BLOCK_M == 1
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (layers/pdl.py)
):
    pdl_start(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    if SILU_MUL:
        # columns j of the output: gate row j in the first half of the tile, up row I + j
        # in the second
        HALF: tl.constexpr = BLOCK_N // 2
        lane = tl.arange(0, BLOCK_N)
        rn = pid_n * HALF + lane % HALF
        rn_load = (tl.minimum(rn, N // 2 - 1) + tl.where(lane < HALF, 0, N // 2)).to(tl.int64)
    else:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # rows past N re-read row N-1 instead of masking: the weight loads stay unmasked
        # (the only traffic that matters) and the extra rows are dropped at the store
        rn_load = tl.minimum(rn, N - 1).to(tl.int64)
    # rows of x past M are read as row 0 and never stored either
    rm_load = tl.where(rm < M, rm, 0)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    w_ptrs = w_ptr + rn_load[:, None] * stride_wn + (k_start + rk)[None, :]
    if USE_DOT:
        x_ptrs = x_ptr + rm_load[:, None] * stride_xm + (k_start + rk)[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        # M == 1. x's row is read as a [BLOCK_N, BLOCK_K] tile (rows repeat, L1 serves
        # them): the same shape as w's tile gets the same register layout, where a
        # [1, BLOCK_K] load would go through shared memory, behind a barrier, every tile.
        x_ptrs = x_ptr + (rn_load * 0)[:, None] + (k_start + rk)[None, :]
        # one fp32 partial per loaded element, reduced along K once after the loop: no
        # cross-thread reduction per tile
        acc_k = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            k_mask = (k + rk) < k_end
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        if USE_DOT:
            # tensor cores on x padded to 16 rows: wasted MMA work is free at this intensity
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            acc_k += w.to(tl.float32) * x.to(tl.float32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if not USE_DOT:
        acc = tl.sum(acc_k, axis=1)[None, :]

    if SILU_MUL:
        # rounded to the activation dtype first, as the unfused path stores gate_up
        a = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        a = tl.reshape(a, [BLOCK_M, 2, BLOCK_N // 2])
        is_gate = (tl.arange(0, 2) == 0)[None, :, None]
        g = tl.sum(tl.where(is_gate, a, 0.0), axis=1)
        u = tl.sum(tl.where(is_gate, 0.0, a), axis=1)
        cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        y = g / (1.0 + tl.exp(-g)) * u  # the formula of fused_kernels._silu_mul_kernel
        tl.store(
            out_ptr + rm[:, None] * stride_om + cols[None, :],
            y.to(out_ptr.dtype.element_ty),
            mask=(rm < M)[:, None] & (cols < N // 2)[None, :],
        )
        return
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm[:, None] * stride_om + rn[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_k * stride_os + offs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_reduce_kernel(
    part_ptr,  # fp32 [SPLIT_K, M, N] contiguous
    b_ptr,
    y_ptr,
    M,
    N,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (layers/pdl.py)
):
    pdl_start(PDL)
    # a fixed summation order over the splits: results do not depend on scheduling
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + row) * N + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)
