"""The attention-backend interface: one step's batch metadata and the op every backend provides.

KV cache layout (``KV_LAYOUT_VERSION`` 1): one tensor per engine,
``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``. Block-major so that a
block, all layers, is one contiguous slab: the context store moves it with one copy.
A layer's view ``kv_cache[:, layer]`` is strided; kernels take strides, never assume
contiguity.

A step's batch is flattened: ``T`` new tokens from ``S`` sequences, sequence ``s`` owning
tokens ``query_start_loc[s]:query_start_loc[s+1]``. Its new tokens sit at positions
``context_lens[s] .. seq_lens[s]-1``; each attends causally to every cached and new
position up to its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from kvgrid.layers import fused_ops


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # int32 [S+1] on device
    seq_lens: torch.Tensor  # int32 [S]: cached + new tokens after this step
    context_lens: torch.Tensor  # int32 [S]: tokens already in the cache before this step
    block_tables: torch.Tensor  # int32 [S, max_blocks]: physical block ids, padded with 0
    slot_mapping: torch.Tensor  # int64 [T]: block_id * block_size + offset for each new token
    max_query_len: int
    max_seq_len: int
    # host copies, for backends that loop per sequence (the torch reference)
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    context_lens_cpu: list[int]
    # kvgrid.store.landing.LayerLanding of prefixes still landing: layer l waits for its part
    landings: list = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Writes this step's K/V into the paged cache, then attends over cache + new tokens."""

    name: str = "abstract"

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, kvh, head_dim]
        layer: int,
        meta: AttentionMetadata,
        scale: float,
        kv_written: bool = False,  # the caller already stored k/v (fused with RoPE)
        out: torch.Tensor | None = None,  # [T, num_heads, head_dim] to write the result into
    ) -> torch.Tensor:  # [T, num_heads, head_dim] (``out`` when given)
        ...

    def forward_rope(
        self,
        positions: torch.Tensor,  # [T]
        q: torch.Tensor,  # unrotated; may be strided views of the fused qkv projection
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,  # [max_pos, head_dim] float32 rotate-half tables
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        layer: int,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """RoPE on q and k, K/V stored, then ``forward``. Here: one kernel rotates and stores
        (on the Triton path; the reference otherwise); a backend may fold that in too."""
        fused = fused_ops.use_triton(q)
        layer_cache = kv_cache[:, layer] if fused else None
        q, k = fused_ops.rope_kv_write(positions, q, k, v, cos, sin, layer_cache, meta.slot_mapping)
        return self.forward(q, k, v, kv_cache, layer, meta, scale, kv_written=fused)
