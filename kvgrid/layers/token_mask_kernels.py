"""Triton kernel of kvgrid.layers.token_mask (imported on first GPU use: a CPU-only run
never imports triton)."""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 4096  # tokens per program: 128 mask words, read once


@triton.jit
def _mask_logits_kernel(
    logits_ptr,
    stride_l,
    rows_ptr,  # int64 [n]: the logits row of each mask row (unused without HAS_ROWS)
    mask_ptr,  # int32 [n, words]: bit t of word t // 32 set where token t is allowed
    stride_m,
    vocab,
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    tok = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = tok < vocab
    words = tl.load(mask_ptr + r * stride_m + tok // 32, mask=inside, other=-1)
    allowed = ((words >> (tok % 32)) & 1) != 0
    row = tl.load(rows_ptr + r) if HAS_ROWS else r
    ptrs = logits_ptr + row.to(tl.int64) * stride_l + tok
    # only the refused tokens are written, and no logit is read
    ninf = tl.full([BLOCK], float("-inf"), logits_ptr.dtype.element_ty)
    tl.store(ptrs, ninf, mask=inside & ~allowed)


def mask_logits(logits, rows, bitmask) -> None:
    n = bitmask.shape[0] if rows is None else rows.shape[0]
    if n == 0:
        return
    vocab = logits.shape[-1]
    grid = (n, triton.cdiv(vocab, BLOCK))
    _mask_logits_kernel[grid](
        logits, logits.stride(0), rows if rows is not None else bitmask, bitmask,
        bitmask.stride(0), vocab, HAS_ROWS=rows is not None, BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip
