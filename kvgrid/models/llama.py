"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm), SmolLM2.

Runs over a flattened batch of new tokens with a paged KV cache; attention is delegated to
an AttentionBackend so the same module runs on the CPU (torch) and the GPU (Triton).
Projections are fused (qkv, gate_up) so each layer does four matrix products.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kvgrid.engine.attention.base import AttentionBackend, AttentionMetadata
from kvgrid.models.config import ModelConfig, ModelError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 and scale after casting back, as the reference does, so bf16
        # results round the same way
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    factor = float(rs["factor"])
    if rs["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between
    low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old_len = float(rs["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, rope_inv_freq(cfg))
        # [max_pos, head_dim]: cos/sin duplicated over both halves (rotate-half layout)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.head_dim**-0.5

    def forward(self, positions, x, kv_cache, meta, backend: AttentionBackend, rope):
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(positions, q, k)
        o = backend.forward(q, k, v, kv_cache, self.layer, meta, self.scale)
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.inter, bias=False)
        self.down_proj = nn.Linear(self.inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, kv_cache, meta, backend, rope):
        x = x + self.self_attn(positions, self.input_layernorm(x), kv_cache, meta, backend, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg, max_positions)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of the new tokens (their K/V land in `kv_cache`)."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, kv_cache, meta, backend, self.rope)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w).float()

    # ---- weights -------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors, fusing q/k/v and gate/up into their packed projections."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        qkv_parts = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied checkpoints sometimes carry a copy of the embedding
            target = name.removeprefix("model.")
            part = None
            for proj, idx in qkv_parts.items():
                if f"self_attn.{proj}." in target:
                    target, part = target.replace(proj, "qkv_proj"), ("qkv", idx)
            for proj, idx in (("gate_proj", 0), ("up_proj", 1)):
                if f"mlp.{proj}." in target:
                    target, part = target.replace(proj, "gate_up_proj"), ("gate_up", idx)
            if target not in params:
                raise ModelError(f"unexpected weight {name!r} for {self.config.architecture}")
            param = params[target]
            dst = param.data if part is None else self._shard(param.data, *part)
            if dst.shape != tensor.shape:
                raise ModelError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            loaded.add(f"{target}#{part}" if part else target)
        expected = set()
        for pname in params:
            if "qkv_proj" in pname:
                expected |= {f"{pname}#('qkv', {i})" for i in range(3)}
            elif "gate_up_proj" in pname:
                expected |= {f"{pname}#('gate_up', {i})" for i in range(2)}
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        if missing:
            raise ModelError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")

    def _shard(self, data: torch.Tensor, kind: str, idx: int) -> torch.Tensor:
        if kind == "gate_up":
            inter = self.config.intermediate_size
            return data[idx * inter : (idx + 1) * inter]
        cfg = self.config
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        start = (0, q, q + kv)[idx]
        return data[start : start + (q if idx == 0 else kv)]

    @torch.no_grad()
    def init_dummy(self, seed: int) -> None:
        """Random weights of the real shape, for benchmarks (`--load-format dummy`)."""
        g = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under HF names (unfused): hands our weights to transformers as an oracle."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters():
            hf = name if name.startswith("lm_head") else f"model.{name}"
            if "qkv_proj" in name:
                for proj, idx in (("q_proj", 0), ("k_proj", 1), ("v_proj", 2)):
                    out[hf.replace("qkv_proj", proj)] = self._shard(p.data, "qkv", idx)
            elif "gate_up_proj" in name:
                for proj, idx in (("gate_proj", 0), ("up_proj", 1)):
                    out[hf.replace("gate_up_proj", proj)] = self._shard(p.data, "gate_up", idx)
            else:
                out[hf] = p.data
        return out
