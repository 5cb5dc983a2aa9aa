"""CUDA graphs for decode steps, one per batch-size bucket.

A decode step of a small model launches hundreds of kernels whose launch cost rivals their
run time; replaying a captured graph launches them all at once. Each bucket owns static
input buffers (token ids, positions, and the attention metadata padded to the bucket's
batch and to the longest block table); a step copies its real batch into the first rows,
marks the rest as padding (slot -1: no KV write; sequence length 0: no keys read), replays
the bucket's graph and reads the first rows of the static output.

Only decode-only batches are captured: the Triton decode path reads no host data but the
batch size, which is what makes replay valid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from kvgrid.layers.attention.base import AttentionMetadata

log = logging.getLogger(__name__)

ForwardFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def decode_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, then every 32 up to max_num_seqs (padding stays under 2x)."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32) if b < max_num_seqs]
    b = 64
    while b < max_num_seqs:
        sizes.append(b)
        b += 32
    sizes.append(max_num_seqs)
    return sorted(set(sizes))


class _Bucket:
    def __init__(self, size: int, max_blocks: int, max_seq_len: int, device: torch.device):
        i32 = dict(dtype=torch.int32, device=device)
        self.size = size
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.meta = AttentionMetadata(
            query_start_loc=torch.arange(size + 1, **i32),
            seq_lens=torch.zeros(size, **i32),
            context_lens=torch.zeros(size, **i32),
            block_tables=torch.zeros(size, max_blocks, **i32),
            slot_mapping=torch.full((size,), -1, dtype=torch.int64, device=device),
            max_query_len=1,
            # the kernel's split count is fixed at capture: size it for the longest context
            max_seq_len=max_seq_len,
            query_start_loc_cpu=list(range(size + 1)),
            seq_lens_cpu=[1] * size,
            context_lens_cpu=[0] * size,
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        n = input_ids.shape[0]
        m = self.meta
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        m.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        m.context_lens[:n].copy_(meta.context_lens, non_blocking=True)
        m.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        width = meta.block_tables.shape[1]
        m.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if n < self.size:
            self.positions[n:].zero_()
            m.seq_lens[n:].zero_()
            m.slot_mapping[n:].fill_(-1)


class DecodeGraphRunner:
    """Captures ``forward(input_ids, positions, meta) -> [B, ...]`` per bucket and replays it."""

    def __init__(
        self,
        forward: ForwardFn,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        max_seq_len: int,
        device: torch.device,
        buckets: list[int] | None = None,
    ):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.forward = forward
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = device
        self.sizes = buckets or decode_buckets(max_num_seqs)
        self.buckets = {b: _Bucket(b, max_blocks_per_seq, max_seq_len, device) for b in self.sizes}
        self.pool = None
        self.replays = 0

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        for size in reversed(self.sizes):
            bucket = self.buckets[size]
            # one warm-up run outside the graph compiles kernels and sets up library handles
            bucket.meta.seq_lens.fill_(1)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.forward(bucket.input_ids, bucket.positions, bucket.meta)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                bucket.output = self.forward(bucket.input_ids, bucket.positions, bucket.meta)
            bucket.meta.seq_lens.zero_()
            bucket.graph = graph
            if self.pool is None:
                self.pool = graph.pool()
        # a graph's first launch also uploads it to the device: do that now, not mid-run
        # (an empty batch: padding rows write no KV)
        for size in self.sizes:
            self.buckets[size].graph.replay()
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        log.info(
            "captured %d decode graphs (batch %s) in %.1fs", len(self.sizes), self.sizes, seconds
        )
        return seconds

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (
            meta.decode_only
            and meta.num_seqs <= self.max_batch
            and meta.block_tables.shape[1] <= self.max_blocks_per_seq
            and self.buckets[self.sizes[-1]].graph is not None
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        n = input_ids.shape[0]
        size = next(b for b in self.sizes if b >= n)
        bucket = self.buckets[size]
        bucket.load(input_ids, positions, meta)
        bucket.graph.replay()
        self.replays += 1
        return bucket.output[:n]
