"""Piecewise CUDA graphs for steps with prefill tokens (chunks, mixed prefill + decode).

Decode-only steps replay one graph each (engine/cuda_graphs.py). Steps that prefill were
launched eagerly: a few hundred kernels from Python, which on an 8B model take 15-20 ms of
host time per step (H200, kvgrid.bench.gpu.mixed_step), longer than the GPU needs for a chunk
of a few hundred tokens, so the GPU idled inside every such step. Their attention cannot be
captured: its grid and its choice of kernel follow the batch's sequence lengths. Everything
around it can, per token-count bucket: piece ``i`` is layer ``i-1``'s output projection,
norm and MLP followed by layer ``i``'s norm, projections, RoPE and K/V store; piece ``L``
ends with the final norm. A step replays ``L + 1`` graphs with the attention of each layer
launched eagerly between them, on the real rows only.

Each bucket's graphs read and write views of one set of static buffers sized for the largest
bucket (ids, positions, slots, the residual stream, q/k/v, the attention output, the final
hidden states). Padding rows carry slot -1 (no K/V store) and are never attended: every
operation inside the pieces is row-wise, so they cannot change the real rows.
"""

from __future__ import annotations

import logging
import time

import torch

from kvgrid.layers.attention.base import AttentionBackend, AttentionMetadata

log = logging.getLogger(__name__)


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token counts: every 16 up to 128, every 32 up to 256, every 64 up to 512, every 128
    beyond: a step is padded by under 16 tokens, or by under a quarter above 128."""
    sizes, t = [], 16
    while t < max_tokens:
        sizes.append(t)
        t += 16 if t < 128 else 32 if t < 256 else 64 if t < 512 else 128
    sizes.append(max_tokens)
    return sorted(set(sizes))


class PrefillGraphRunner:
    """Runs a model's forward for a non-decode step as ``L + 1`` captured pieces with eager
    attention between them. ``capture=False`` runs the same pieces without graphs (the
    CPU tests check the buffer plumbing and the padding that way)."""

    def __init__(
        self,
        model,
        backend: AttentionBackend,
        kv_cache: torch.Tensor,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        capture: bool = True,
        buckets: list[int] | None = None,
    ):
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        cfg = model.config
        self.model, self.backend, self.kv_cache = model, backend, kv_cache
        self.layers = list(model.layers)
        self.sizes = buckets or prefill_buckets(max_tokens)
        self.use_graphs = capture
        t, h, d = self.sizes[-1], cfg.num_attention_heads, cfg.head_dim
        kvh, hidden = cfg.num_key_value_heads, cfg.hidden_size
        i64 = dict(dtype=torch.int64, device=device)
        act = dict(dtype=dtype, device=device)
        self.ids = torch.zeros(t, **i64)
        self.positions = torch.zeros(t, **i64)
        self.slots = torch.full((t,), -1, **i64)
        self.residual = torch.zeros(t, hidden, **act)
        self.q = torch.zeros(t, h, d, **act)
        self.k = torch.zeros(t, kvh, d, **act)
        self.v = torch.zeros(t, kvh, d, **act)
        self.attn = torch.zeros(t, h, d, **act)
        self.hidden = torch.zeros(t, hidden, **act)
        self.kv_written = False
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.replays = 0

    # ---- the pieces ------------------------------------------------------------------------

    def _piece(self, i: int, t: int) -> None:
        """Piece ``i`` of a ``t``-token bucket: reads and writes the static buffers' first
        ``t`` rows only (the same addresses at every replay)."""
        layers = self.layers
        if i == 0:
            x, residual = self.model.embed_tokens(self.ids[:t]), None
        else:
            x, residual = layers[i - 1].post_attention(self.attn[:t], self.residual[:t])
        if i == len(layers):
            self.hidden[:t].copy_(self.model.norm.add_forward(x, residual)[0])
            return
        q, k, v, residual, written = layers[i].pre_attention(
            self.positions[:t], x, residual, self.kv_cache, self.slots[:t], self.model.rope
        )
        self.q[:t].copy_(q)
        self.k[:t].copy_(k)
        self.v[:t].copy_(v)
        self.residual[:t].copy_(residual)
        self.kv_written = written

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket's pieces, largest bucket first, all in one memory pool:
        pieces replay one after another on one stream, so what one frees the next reuses."""
        if not self.use_graphs:
            return 0.0
        t0 = time.perf_counter()
        dev = self.ids.device
        torch.cuda.synchronize(dev)
        pool = None
        n = len(self.layers) + 1
        for t in reversed(self.sizes):
            # one warm-up of each piece outside the graphs: kernels compiled, handles made
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                for i in range(n):
                    self._piece(i, t)
            torch.cuda.current_stream(dev).wait_stream(stream)
            graphs = []
            for i in range(n):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self._piece(i, t)
                pool = pool or g.pool()
                graphs.append(g)
            self.graphs[t] = graphs
        for graphs in self.graphs.values():  # first launches upload the graphs: not mid-run
            for g in graphs:
                g.replay()
        torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        log.info(
            "captured %d prefill pieces x %d buckets (up to %d tokens) in %.1fs",
            n,
            len(self.sizes),
            self.sizes[-1],
            seconds,
        )
        return seconds

    # ---- a step ------------------------------------------------------------------------------

    def can_run(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        return not meta.decode_only and num_tokens <= self.sizes[-1]

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        landings: list | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of the step's tokens, as the eager forward computes
        them (prefixes still landing from the store: layer ``i`` waits for its part)."""
        n = input_ids.shape[0]
        t = next(b for b in self.sizes if b >= n)
        self.ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slots[:n].copy_(meta.slot_mapping, non_blocking=True)
        if n < t:
            self.slots[n:t].fill_(-1)
        graphs = self.graphs.get(t)
        scale = self.layers[0].self_attn.scale
        for i in range(len(self.layers) + 1):
            if i < len(self.layers):
                for landing in landings or ():
                    landing.wait_layer(i)
            if graphs is not None:
                graphs[i].replay()
            else:
                self._piece(i, t)
            if i < len(self.layers):
                self.backend.forward(
                    self.q[:n],
                    self.k[:n],
                    self.v[:n],
                    self.kv_cache,
                    i,
                    meta,
                    scale,
                    kv_written=self.kv_written,
                    out=self.attn[:n],
                )
        self.replays += graphs is not None
        return self.hidden[:n]
