"""EngineConfig: everything that fixes how one engine runs, frozen once built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kvgrid.flags import flag
from kvgrid.keys import DEFAULT_BLOCK_SIZE
from kvgrid.store.config import StoreConfig


@dataclass(frozen=True)
class EngineConfig:
    """Every field is also a flag of the commands that start an engine (kvgrid.flags): its
    docstring is the flag's help."""

    model: str | None = None
    """HF-format model directory, or a shape name with --load-format dummy (default: the
    embedded SmolLM2-135M-Instruct)"""
    load_format: Literal["auto", "dummy"] = "auto"
    """auto: read the weights from --model; dummy: random weights of its shape"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: float32 on the CPU, bfloat16 on CUDA"""
    device: str = "auto"
    """auto: cuda if available, else cpu"""
    seed: int = 0
    """seed of dummy weights"""
    block_size: int = DEFAULT_BLOCK_SIZE
    """tokens per KV block (a power of two)"""
    num_kv_blocks: int | None = None
    """blocks in G1 (default: from --kv-cache-memory-gb on the CPU, from
    --gpu-memory-utilization on CUDA)"""
    kv_cache_memory_gb: float = 1.0
    """CPU: memory for the KV pool when --num-kv-blocks is not given"""
    gpu_memory_utilization: float = 0.90
    """CUDA: share of the GPU's memory the engine may fill (weights, activations, KV)"""
    max_model_len: int | None = None
    """longest context (default: the model's own limit)"""
    max_num_seqs: int = 128
    """most sequences in one step"""
    max_parked_seqs: int = 4
    """with a context store: requests admitted beyond --max-num-seqs to land their stored
    prefixes in free G1 blocks while every slot is taken (they compute once one frees)"""
    max_num_batched_tokens: int = 2048
    """token budget of one step (longer prompts are prefilled in chunks)"""
    prefill_first_burst: bool = True
    """prefill a burst of arrivals before any of it decodes (steady inter-token latency)"""
    mixed_step_slowdown: float = 1.4
    """once decoding, a step carries prompt tokens up to this multiple of a decode step's
    measured time (GPU engines only; 0: the whole step budget)"""
    prompt_drain_s: float = 1.0
    """once decoding, a step carries more prompt tokens than --mixed-step-slowdown allows
    when the prompts waiting would otherwise take longer than this to compute: queued
    prompts trade inter-token latency for time to first token (GPU engines only; 0: never)"""
    enable_prefix_caching: bool = field(default=True, metadata=flag("prefix-caching"))
    """reuse the KV of prompt prefixes G1 already holds"""
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    """auto: triton on CUDA, torch on the CPU"""
    cuda_graphs: bool = True
    """replay decode steps as CUDA graphs (on a GPU)"""
    prefill_graph_tokens: int = 512
    """steps that prefill up to this many tokens replay CUDA graphs cut around their
    attention (engine/prefill_graphs.py; with CUDA graphs on a GPU); 0: eager"""
    async_scheduling: bool | None = None
    """launch each step before reading back the last one's tokens, so that host work
    overlaps the GPU's (auto: on for CUDA, off on the CPU where nothing runs asynchronously)"""
    gemv: bool = True
    """few-token projections (decode) through the Triton GEMV on CUDA (layers/gemv.py);
    --no-gemv: through cuBLAS"""
    max_logprobs: int = 20
    """most log-probabilities a request may ask for per token"""
    guided_mask_threads: int | None = None
    """threads building grammar masks for guided decoding (None: half the CPUs, at most
    8); each grammar is compiled into 8 templates a thread, so that a step's rows build in
    parallel (docs/benchmarks.md, guided decoding)"""
    kv_store: StoreConfig | None = field(default=None, metadata=flag(cli=False))
    """the context store below G1 (G2 host memory, G3 disk, G4 shared); None: G1 only
    (its flags: kvgrid.engine.args.add_store_args)"""

    def __post_init__(self) -> None:
        if self.guided_mask_threads is not None and self.guided_mask_threads < 1:
            raise ValueError(f"guided_mask_threads must be >= 1, got {self.guided_mask_threads}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_parked_seqs < 0:
            raise ValueError(f"max_parked_seqs must be >= 0, got {self.max_parked_seqs}")
        if self.prefill_graph_tokens < 0:
            raise ValueError("prefill_graph_tokens must be >= 0 (0 turns prefill graphs off)")
