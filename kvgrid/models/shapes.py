"""Named real model shapes, for random weights (``--load-format dummy``).

Each entry is the ``config.json`` of the published checkpoint (the fields the engine reads),
so a benchmark on a dummy shape moves the same bytes and FLOPs as the real model.
"""

from __future__ import annotations

import copy
from typing import Any

from kvgrid.models.config import ModelConfig, ModelError

_LLAMA3_8B: dict[str, Any] = {
    # Meta-Llama-3-8B: the original 8K-context release (no rope scaling).
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}

# Llama-3.1: same weights layout, 128K context through llama3 rope scaling.
_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

_LLAMA3_70B = dict(
    _LLAMA3_8B,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
)

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": _LLAMA3_8B,
    "llama3.1-8b": dict(
        _LLAMA3_8B,
        max_position_embeddings=131072,
        rope_scaling=_LLAMA31_ROPE,
        eos_token_id=[128001, 128008, 128009],
    ),
    "llama3-70b": _LLAMA3_70B,
    "llama3.1-70b": dict(
        _LLAMA3_70B,
        max_position_embeddings=131072,
        rope_scaling=_LLAMA31_ROPE,
        eos_token_id=[128001, 128008, 128009],
    ),
    # Qwen3-8B: RMSNorm on q and k heads, explicit head_dim, untied embeddings.
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    },
    # Qwen2.5-7B (base): bias on q/k/v; the sliding window is configured but not used.
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    },
    # Mistral-7B-v0.3: vocab 32768, no sliding window (v0.1's 4K window would cap the context).
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": 32768,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    },
    # SmolLM2-135M (base): the shape of the embedded default model, tied embeddings.
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "bfloat16",
    },
}


def shape_names() -> list[str]:
    return sorted(SHAPES)


def shape_dict(name: str) -> dict[str, Any]:
    """A copy of the HF-style config dict of a named shape (safe to mutate)."""
    try:
        return copy.deepcopy(SHAPES[name.lower()])
    except KeyError:
        raise ModelError(
            f"unknown model shape {name!r}; known shapes: {', '.join(shape_names())}"
        ) from None


def dummy_config(name: str) -> ModelConfig:
    return ModelConfig.from_hf_dict(shape_dict(name))
