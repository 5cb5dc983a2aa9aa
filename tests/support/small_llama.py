"""A two-layer Llama of real structure (GQA, RoPE tables in float32) for kernel and graph tests."""

from __future__ import annotations

import torch

from kvgrid.models.config import ModelConfig
from kvgrid.models.llama import LlamaForCausalLM, RotaryEmbedding

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 32, 512


def small_llama(device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    cfg = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(cfg, 1024).to(device, dtype)
    model.rope = RotaryEmbedding(cfg, 1024).to(device)  # float32 tables, as the runner keeps
    model.init_dummy(0)
    return model
