"""Triton kernel of kvgrid.store.landing (imported on first GPU use: a CPU-only run never
imports triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL = {torch.int64: tl.int64, torch.int32: tl.int32, torch.int16: tl.int16, torch.int8: tl.int8}
CHUNK_BYTES = 16384  # per program and iteration: 128 B of loads in flight per thread
# Programs per layer copy. The copy is bound by PCIe, not by SMs: 16 programs keep enough
# reads in flight to fill it (51 GB/s on an H200, as many as 96 or one per chunk), and the
# rest of the GPU stays free for the forward that runs alongside: every SM a copy holds
# slows that forward's kernels (kvgrid.bench.gpu.store_env measures both).
MAX_PROGRAMS = 16


@triton.jit
def _copy_layer_kernel(
    src_addrs,  # int64 [n]: address of each source block (pinned host memory, via UVA)
    dst_addrs,  # int64 [n]: address of each destination block
    layer_off,  # words before this layer in a block
    layer_words,
    chunks,  # chunks per block-layer
    total,  # n * chunks
    WORD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    for i in range(tl.program_id(0), total, tl.num_programs(0)):
        pair = i // chunks
        chunk = i % chunks
        src = tl.load(src_addrs + pair).to(tl.pointer_type(WORD))
        dst = tl.load(dst_addrs + pair).to(tl.pointer_type(WORD))
        within = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = within < layer_words
        offs = layer_off + within
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def copy_layer(
    src_addrs: torch.Tensor,
    dst_addrs: torch.Tensor,
    layer: int,
    layer_words: int,
    word: torch.dtype,
) -> None:
    """Copy layer ``layer`` (``layer_words`` words of type ``word``) of every block."""
    block = min(triton.next_power_of_2(layer_words), CHUNK_BYTES // word.itemsize)
    chunks = triton.cdiv(layer_words, block)
    total = src_addrs.numel() * chunks
    kernel = _copy_layer_kernel[(min(total, MAX_PROGRAMS),)]
    kernel(
        src_addrs, dst_addrs, layer * layer_words, layer_words, chunks, total,
        WORD=_TL[word], BLOCK=block, num_warps=4,
    )  # fmt: skip
