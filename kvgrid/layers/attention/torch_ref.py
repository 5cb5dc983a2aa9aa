"""Plain torch attention over the paged cache: the CPU path and the reference for kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvgrid.layers.attention.base import AttentionBackend, AttentionMetadata
from kvgrid.layers.fused_ops import write_kv_reference


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

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
        o = self._attend(q, k, v, kv_cache, layer, meta, scale, kv_written)
        return o if out is None else out.copy_(o)

    def _attend(self, q, k, v, kv_cache, layer, meta: AttentionMetadata, scale, kv_written):
        if not kv_written:
            write_kv_reference(k, v, kv_cache, layer, meta.slot_mapping)
        if meta.decode_only and meta.num_seqs > 1:
            return self._decode_batched(q, kv_cache, layer, meta, scale)
        out = torch.empty_like(q)
        block_size = kv_cache.shape[3]
        num_heads, num_kv_heads = q.shape[1], k.shape[1]
        for s in range(meta.num_seqs):
            q0, q1 = meta.query_start_loc_cpu[s], meta.query_start_loc_cpu[s + 1]
            seq_len, ctx = meta.seq_lens_cpu[s], meta.context_lens_cpu[s]
            nblk = (seq_len + block_size - 1) // block_size
            blocks = meta.block_tables[s, :nblk].long()
            kv = kv_cache[blocks, layer]  # [nblk, 2, block_size, kvh, d]
            keys = kv[:, 0].reshape(-1, num_kv_heads, kv.shape[-1])[:seq_len]
            vals = kv[:, 1].reshape(-1, num_kv_heads, kv.shape[-1])[:seq_len]
            qs = q[q0:q1].transpose(0, 1)  # [H, Lq, d]
            keys = keys.transpose(0, 1).to(q.dtype)
            vals = vals.transpose(0, 1).to(q.dtype)
            # causal with an offset: query i (position ctx + i) sees keys 0..ctx+i
            lq = q1 - q0
            mask = torch.ones(lq, seq_len, dtype=torch.bool, device=q.device).tril(diagonal=ctx)
            o = F.scaled_dot_product_attention(
                qs.unsqueeze(0),
                keys.unsqueeze(0),
                vals.unsqueeze(0),
                attn_mask=mask,
                scale=scale,
                enable_gqa=num_heads != num_kv_heads,
            )
            out[q0:q1] = o[0].transpose(0, 1)
        return out

    @staticmethod
    def _decode_batched(q, kv_cache, layer, meta: AttentionMetadata, scale: float):
        """All decode rows in one padded SDPA call: per-sequence calls dominate CPU decode."""
        block_size, kvh, d = kv_cache.shape[3], kv_cache.shape[4], kv_cache.shape[5]
        b = meta.num_seqs
        nblk = -(-meta.max_seq_len // block_size)
        kv = kv_cache[meta.block_tables[:, :nblk].long(), layer]  # [B, nblk, 2, bs, kvh, d]
        keys = kv[:, :, 0].reshape(b, nblk * block_size, kvh, d).transpose(1, 2).to(q.dtype)
        vals = kv[:, :, 1].reshape(b, nblk * block_size, kvh, d).transpose(1, 2).to(q.dtype)
        pos = torch.arange(nblk * block_size, device=q.device)
        mask = (pos.unsqueeze(0) < meta.seq_lens.unsqueeze(1)).view(b, 1, 1, -1)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [B, H, 1, d]
            keys,
            vals,
            attn_mask=mask,
            scale=scale,
            enable_gqa=q.shape[1] != kvh,
        )
        return o.squeeze(2)
