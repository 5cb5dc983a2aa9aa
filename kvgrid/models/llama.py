"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm), SmolLM2.

Runs over a flattened batch of new tokens with a paged KV cache; attention is delegated to
an AttentionBackend so the same module runs on the CPU (torch) and the GPU (Triton).
Projections are fused (qkv, gate_up) so each layer does four matrix products; at a few
tokens they are matrix-vector products, which run the Triton GEMV on the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kvgrid.layers import fused_ops, gemv
from kvgrid.layers.attention.base import AttentionBackend, AttentionMetadata
from kvgrid.models.config import ModelConfig, ModelError


class Linear(nn.Linear):
    """nn.Linear whose few-token products on the GPU run the Triton GEMV (layers/gemv.py);
    on the CPU, and with ``use_gemv`` off, exactly F.linear."""

    use_gemv = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_gemv:
            return gemv.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def silu_mul_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of this ``[gate; up]`` projection's output."""
        if self.use_gemv and self.bias is None:
            return gemv.linear_silu_mul(x, self.weight)
        return fused_ops.silu_mul(self(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_ops.rms_norm_ref(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``: the residual add fused into the norm."""
        return fused_ops.add_rms_norm(x, residual, self.weight, self.eps)


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


def _skeleton() -> bool:
    """Is the model being built on the meta device (a skeleton whose weights are loaded
    later)? Meta tensors run torch's Python reference ops, and their first use imports
    torch._dynamo: seconds of a worker's start-up, for numbers nobody reads."""
    return torch.get_default_device().type == "meta"


def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A skeleton's tensors as uninitialised storage on ``device`` (floating ones in
    ``dtype``), allocated once: what ``to_empty(device).to(dtype)`` does, without the meta
    reference ops behind ``to_empty`` (they import torch.fx's symbolic shapes and sympy).
    A tensor two modules share stays shared."""
    made: dict[int, torch.Tensor] = {}

    def empty(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            kind = dtype if t.is_floating_point() else t.dtype
            new = torch.empty(t.shape, dtype=kind, device=device)
            if isinstance(t, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            made[id(t)] = new
        return made[id(t)]

    for mod in model.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is not None:
                    table[name] = empty(t)
    return model


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        where = torch.get_default_device()
        with torch.device("cpu" if _skeleton() else where):
            t = torch.arange(max_positions, dtype=torch.float32)
            freqs = torch.outer(t, rope_inv_freq(cfg))
            # [max_pos, head_dim]: cos/sin duplicated over both halves (rotate-half layout)
            emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().to(where), persistent=False)
        self.register_buffer("sin", emb.sin().to(where), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return (
            fused_ops.rope_ref(positions, q, self.cos, self.sin),
            fused_ops.rope_ref(positions, k, self.cos, self.sin),
        )


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
        self.qkv_proj = Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.head_dim**-0.5

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unrotated q [T, H, D], k and v [T, KVH, D] (views of one projection's output)."""
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, positions, x, kv_cache, meta, backend: AttentionBackend, rope):
        q, k, v = self.qkv(x)
        o = backend.forward_rope(
            positions, q, k, v, rope.cos, rope.sin, kv_cache, self.layer, meta, self.scale
        )
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * self.inter, bias=False)
        self.down_proj = Linear(self.inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_mul_forward(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, kv_cache, meta, backend, rope):
        """``x`` is the previous layer's MLP output, ``residual`` the stream before it (None
        at the first layer); returns this layer's pair. Each residual add is fused into
        the RMSNorm that follows it."""
        h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(positions, h, kv_cache, meta, backend, rope)
        return self._mlp_block(h, residual)

    # The same layer cut around its attention, for steps that run the rest of the model as
    # CUDA graphs (engine/prefill_graphs.py): the cut pieces hold no host data.

    def pre_attention(self, positions, x, residual, kv_cache, slots, rope):
        """Norm, projections, RoPE and (on the Triton path) the K/V store at ``slots``:
        ``(q, k, v, residual, kv_written)`` for ``AttentionBackend.forward``."""
        h, residual = self.input_layernorm.add_forward(x, residual)
        q, k, v = self.self_attn.qkv(h)
        fused = fused_ops.use_triton(q)
        cache = kv_cache[:, self.self_attn.layer] if fused else None
        q, k = fused_ops.rope_kv_write(positions, q, k, v, rope.cos, rope.sin, cache, slots)
        return q, k, v, residual, fused

    def post_attention(self, o, residual) -> tuple[torch.Tensor, torch.Tensor]:
        """Output projection of the attention ``o`` [T, H, D], norm, MLP: ``(x, residual)``."""
        h = self.self_attn.o_proj(o.reshape(-1, self.self_attn.q_size))
        return self._mlp_block(h, residual)

    def _mlp_block(self, h, residual) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    use_gemv = True  # the logits too (see Linear, set_gemv)

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.config = cfg
        # a skeleton's embedding skips its random init (see _skeleton)
        shape = (cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(
            *shape, _weight=torch.empty(shape) if _skeleton() else None
        )
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
        residual = None
        for i, layer in enumerate(self.layers):
            for landing in meta.landings:
                landing.wait_layer(i)
            x, residual = layer(positions, x, residual, kv_cache, meta, backend, self.rope)
        return self.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return (gemv.linear if self.use_gemv else F.linear)(hidden, w).float()

    def set_gemv(self, enabled: bool) -> None:
        """Route the projections and the logits through the Triton GEMV (few tokens, CUDA)."""
        self.use_gemv = enabled
        for module in self.modules():
            if isinstance(module, Linear):
                module.use_gemv = enabled

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
        """Random weights of the real shape, for benchmarks (`--load-format dummy`).

        Scale-preserving, so that 16-bit arithmetic behaves as it does on trained weights:
        every projection has std 1/sqrt(fan_in) (unit-variance inputs give unit-variance
        outputs); the two projections that write into the residual stream (o_proj,
        down_proj) are further scaled by 1/sqrt(2 * num_layers), so the stream's variance
        stays O(1) over depth; embeddings have std 1/sqrt(hidden) (scale-preserving
        as a tied output projection too); norms 1, biases 0. Under the earlier flat
        N(0, 0.02) init of the Llama-3-8B shape, transformers' bf16 logits differed from
        themselves by 8e-2 between two attention implementations (H100 run, 2026-11-24):
        too ill-conditioned to check anything against.
        Deterministic for a given seed and device (the generator lives on the device).
        """
        g = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        depth_scale = (2 * self.config.num_hidden_layers) ** -0.5
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif "embed_tokens" in name:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
            else:
                std = p.shape[1] ** -0.5
                if "o_proj" in name or "down_proj" in name:
                    std *= depth_scale
                p.normal_(0.0, std, generator=g)

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
