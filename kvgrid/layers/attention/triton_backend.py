"""Triton attention backend: the CUDA path (also runs under ``TRITON_INTERPRET=1`` on CPU).

Per layer and step, one of
  * decode-only batch: split-KV paged decode (+ a reduction kernel when split), query
    heads grouped per KV head, which also applies RoPE to q and k and stores the new K/V
    (``forward_rope``); the only path CUDA graphs capture, so it reads nothing from the
    host but the batch size;
  * fresh prefill (no cached prefix in any sequence) of long enough chunks: torch SDPA
    (flash / cuDNN) on the new tokens, which need not touch the cache at all;
  * anything else (prefill over a cached prefix, chunked prefill, mixed decode + prefill):
    the varlen paged prefill kernel, causal with each sequence's context offset. From
    ``mixed_decode_min_rows`` on, the decode rows of a mixed batch (the scheduler puts them
    first) go to the decode kernel instead: the prefill kernel gives each a whole query
    tile and one program per KV head over its entire context (the store replay's largest
    GPU cost).
In the last two, one fused kernel first rotates q/k and stores the new K/V in their slots.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kvgrid.layers.attention import triton_kernels as tk
from kvgrid.layers.attention.base import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(
        self,
        sdpa_min_query_len: int = 512,
        max_decode_splits: int = 32,
        fuse_decode_rope: bool = True,
        mixed_decode_min_rows: int = 16,
    ):
        # SDPA pays a launch per sequence; below this length the one varlen kernel wins
        self.sdpa_min_query_len = sdpa_min_query_len
        self.max_decode_splits = max_decode_splits
        self.fuse_decode_rope = fuse_decode_rope
        # decode rows of a mixed batch go through the decode kernel from this many rows on
        # (more than max_num_seqs: never). Each layer then launches two kernels
        # more (~0.14 ms of host time), which 8 rows at 4K context do not repay (0.3 ms
        # less GPU time per step) and 16-32 rows do (3-10 ms); H200, 8B shape,
        # kvgrid.bench.gpu.mixed_step
        self.mixed_decode_min_rows = mixed_decode_min_rows
        self._split: tuple[AttentionMetadata, MixedSplit] | None = None
        self._num_sms: int | None = None
        # per thread, as cuDNN keeps its plans (a set of thread ids would trust a reused id)
        self._sdpa_warm = threading.local()

    def num_sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            if device.type == "cuda":
                self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
            else:
                self._num_sms = 8
        return self._num_sms

    def decode_splits(self, num_seqs: int, num_kv_heads: int, max_seq_len: int, device) -> int:
        n = tk.decode_num_splits(num_seqs, num_kv_heads, max_seq_len, self.num_sms(device))
        return min(n, self.max_decode_splits)

    def forward_rope(self, positions, q, k, v, cos, sin, kv_cache, layer, meta, scale):
        """Decode steps rotate q/k and store K/V inside the decode kernel (one kernel per
        layer fewer); other steps take the separate RoPE + KV-write kernel first."""
        if not (meta.decode_only and self.fuse_decode_rope):
            return super().forward_rope(positions, q, k, v, cos, sin, kv_cache, layer, meta, scale)
        layer_cache = kv_cache[:, layer]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        rope = tk.DecodeRope(k, v, positions, cos, sin, meta.slot_mapping)
        return self._decode(q, layer_cache, meta, None, scale, out, rope)

    def _decode(self, q, layer_cache, meta: AttentionMetadata, n, scale, out, rope=None):
        """One query row per sequence: every row (``n`` None: a decode-only batch, padding
        rows of a CUDA graph included), or the first ``n`` sequences of a mixed batch."""
        bt, lens, max_len = meta.block_tables, meta.seq_lens, meta.max_seq_len
        if n is not None:
            q, out, bt, lens = q[:n], out[:n], bt[:n], lens[:n]
            max_len = self._mixed_split(meta).decode_max_len
        splits = self.decode_splits(q.shape[0], layer_cache.shape[3], max_len, q.device)
        dot = _dot(q, layer_cache)
        tk.paged_decode(q, layer_cache, bt, lens, scale, splits, out, dot, rope)
        return out

    def warm_up(self, kv_cache: torch.Tensor, num_heads: int) -> None:
        """Compile now what a step may pick at run time: the decode kernel without RoPE (the
        decode rows of mixed steps) and the prefill kernel, each for every split count, and
        their reduction. A variant met first while serving would compile on the engine
        thread, stalling every request. Only reads the cache; the results are discarded."""
        layer_cache, dev = kv_cache[:, 0], kv_cache.device
        block_size, d = layer_cache.shape[2], layer_cache.shape[-1]
        dot = tk.dot_dtype_for(kv_cache.dtype)
        splits = [1, 2, 4, 8, 16, 32]  # what decode_num_splits and prefill_num_splits pick
        q = torch.zeros(128, num_heads, d, dtype=kv_cache.dtype, device=dev)
        out = torch.empty_like(q)
        tables = torch.zeros(1, 128 // block_size + 1, dtype=torch.int32, device=dev)
        lens = torch.ones(1, dtype=torch.int32, device=dev)
        ctx = torch.zeros(1, dtype=torch.int32, device=dev)
        # the prefill kernel's two tile shapes: short and long queries
        qsls = {r: torch.tensor([0, r], dtype=torch.int32, device=dev) for r in (1, 128)}
        for n in splits:
            if n <= self.max_decode_splits:
                tk.paged_decode(q[:1], layer_cache, tables, lens, 1.0, n, out[:1], dot)
            for rows, qsl in qsls.items():
                tk.paged_prefill(q[:rows], layer_cache, tables, qsl, ctx, rows, 1.0, out[:rows],
                                 dot, num_splits=n)  # fmt: skip
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def use_sdpa(self, meta: AttentionMetadata) -> bool:
        return (
            meta.max_query_len >= self.sdpa_min_query_len
            and not any(meta.context_lens_cpu)
            and meta.query_start_loc_cpu[-1] == sum(meta.seq_lens_cpu)
        )

    def forward(
        self,
        q,
        k,
        v,
        kv_cache,
        layer,
        meta: AttentionMetadata,
        scale: float,
        kv_written=False,
        out=None,
    ):
        layer_cache = kv_cache[:, layer]
        if not kv_written:
            tk.kv_write(k, v, layer_cache, meta.slot_mapping)
        if out is None:
            out = torch.empty_like(q)
        if meta.decode_only:
            return self._decode(q, layer_cache, meta, None, scale, out)
        if self.use_sdpa(meta):
            return self._sdpa_fresh(q, k, v, meta, scale, out)
        split = self._mixed_split(meta)
        if split.decode_rows:
            self._decode(q, layer_cache, meta, split.decode_rows, scale, out)
        return tk.paged_prefill(
            q,
            layer_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.context_lens,
            max(split.query_lens),
            scale,
            out,
            _dot(q, layer_cache),
            max_seq_len=split.prefill_max_len,
            num_sms=self.num_sms(q.device),
            query_lens=split.query_lens,
            first_seq=split.decode_rows,
        )

    def _mixed_split(self, meta: AttentionMetadata) -> MixedSplit:
        """How a mixed step divides between the two kernels: once per step, not per layer."""
        if self._split is not None and self._split[0] is meta:
            return self._split[1]
        qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        n = leading_decodes(qsl)
        if n < self.mixed_decode_min_rows:
            n = 0
        split = MixedSplit(
            n,
            max(lens[:n], default=0),
            [b - a for a, b in zip(qsl[n:-1], qsl[n + 1 :])],
            max(lens[n:]),
        )
        self._split = (meta, split)
        return split

    def warm_sdpa(
        self, num_heads: int, num_kv_heads: int, head_dim: int, max_len: int, dtype, device
    ) -> bool:
        """Build, on the calling thread, cuDNN's attention plan for every padded length a
        fresh prefill of up to ``max_len`` tokens can use; False if this thread has them.

        cuDNN builds a plan per shape and keeps it per thread: the first step at a new
        length paid ~45 ms of host time for it (each of the engine's-choice splits of an
        8K prompt on an H200, whose recomputed part met a new length), before any of the
        step's kernels ran. The engine therefore calls this on the thread that steps."""
        if getattr(self._sdpa_warm, "done", False) or torch.device(device).type != "cuda":
            return False
        self._sdpa_warm.done = True
        top = sdpa_padded_len(max_len)
        q = torch.zeros(top, num_heads, head_dim, dtype=dtype, device=device)
        kv = torch.zeros(top, num_kv_heads, head_dim, dtype=dtype, device=device)
        for n in sdpa_lengths(max_len):
            _sdpa(q[:n], kv[:n], kv[:n], 1.0)
        torch.cuda.synchronize(device)
        return True

    @staticmethod
    def _sdpa_fresh(q, k, v, meta: AttentionMetadata, scale: float, out: torch.Tensor):
        qsl = meta.query_start_loc_cpu
        for s in range(meta.num_seqs):
            a, b = qsl[s], qsl[s + 1]
            # always a contiguous padded copy (q/k/v are views of one projection): the
            # layout is part of cuDNN's plan key, and warm_sdpa built plans for this one
            padded = sdpa_padded_len(b - a)
            qs, ks, vs = (_pad_rows(x[a:b], padded) for x in (q, k, v))
            out[a:b] = _sdpa(qs, ks, vs, scale)[: b - a]
        return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of one sequence: q [L, H, D], k/v [L, KVH, D]; out [L, H, D]."""
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        is_causal=True,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return o[0].transpose(0, 1)


class MixedSplit(NamedTuple):
    decode_rows: int  # leading sequences that go through the decode kernel
    decode_max_len: int
    query_lens: list[int]  # of the sequences after them (the prefill kernel's)
    prefill_max_len: int


def leading_decodes(query_start_loc: list[int]) -> int:
    """How many sequences at the front of the batch have one new token each; all but one
    at most (the rest of the batch must keep a sequence for the prefill kernel)."""
    n, last = 0, len(query_start_loc) - 2
    while n < last and query_start_loc[n + 1] - query_start_loc[n] == 1:
        n += 1
    return n


def _dot(q: torch.Tensor, layer_cache: torch.Tensor):
    """The tl.dot operand dtype: the cache's when q shares it, else q's."""
    return tk.dot_dtype_for(layer_cache.dtype if q.dtype == layer_cache.dtype else q.dtype)


def sdpa_padded_len(n: int) -> int:
    """``n`` rounded up to 1/16 of its power of two (64 at least): at most 6.25% more work.

    cuDNN's attention builds an execution plan per sequence length (a profile of a 1K-token
    prefill at a new length on an H100 showed ~70 ms of host time in it) and caches it by
    shape: with every prompt length
    distinct, each prefill would pay for a new plan. Causal attention makes padding at the
    end exact: real rows never see the padded keys after them.
    """
    if n <= 64:
        return 64
    step = (1 << (n.bit_length() - 1)) // 16
    return -(-n // step) * step


def sdpa_lengths(max_len: int) -> list[int]:
    """Every length ``sdpa_padded_len`` gives for 1..``max_len`` tokens, in order."""
    out = [sdpa_padded_len(1)]
    while out[-1] < max_len:
        out.append(sdpa_padded_len(out[-1] + 1))
    return out


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    p = x.new_empty((rows, *x.shape[1:]))
    p[: x.shape[0]] = x
    p[x.shape[0] :].zero_()
    return p
