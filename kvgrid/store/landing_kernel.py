"""Triton kernel of kvgrid.store.landing (imported on first GPU use: a CPU-only run never
imports triton)."""

from __future__ import annotations

import numpy as np
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


_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.int8))


def copy_blocks(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> bool:
    """``dst.copy_(src)`` for every (dst, src) pair in one launch on the current stream of
    ``device``, where each is one contiguous block of the same size (G1 blocks and pinned G2
    slots: under UVA the kernel addresses both). False, with nothing copied, where that does
    not hold. Write-backs of scattered blocks otherwise take one copy-engine call each, and
    every call gives up and retakes the GIL on the engine's thread."""
    nbytes = pairs[0][0].nbytes
    if not all(d.nbytes == s.nbytes == nbytes and d.is_contiguous() and s.is_contiguous()
               for d, s in pairs):  # fmt: skip
        return False
    n = len(pairs)
    addrs = np.empty(2 * n, np.int64)
    addrs[:n] = [s.data_ptr() for _, s in pairs]
    addrs[n:] = [d.data_ptr() for d, _ in pairs]
    align = int(np.bitwise_or.reduce(addrs)) | nbytes
    word, wdtype = next((w, t) for w, t in _WORDS if align % w == 0)
    a = torch.from_numpy(addrs)
    if device.type == "cuda":
        a = a.pin_memory().to(device, non_blocking=True)
    copy_layer(a[:n], a[n:], 0, nbytes // word, wdtype)
    return True
