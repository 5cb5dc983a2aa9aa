"""EngineConfig: everything that fixes how one engine runs, frozen once built."""

from __future__ import annotations

from dataclasses import dataclass

from kvgrid.keys import DEFAULT_BLOCK_SIZE
from kvgrid.store.config import StoreConfig


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF-format directory, a dummy shape name, or None for the default
    load_format: str = "auto"  # "auto": read weights from `model`; "dummy": random weights
    dtype: str = "auto"  # "auto": float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # "auto": cuda if available else cpu
    seed: int = 0  # for dummy weights
    block_size: int = DEFAULT_BLOCK_SIZE
    num_kv_blocks: int | None = None  # G1 size; None: from kv_cache_memory / gpu_memory_utilization
    kv_cache_memory_gb: float = 1.0  # CPU: memory for the KV pool when num_kv_blocks is None
    gpu_memory_utilization: float = 0.90
    max_model_len: int | None = None  # None: the model's own limit
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill)
    # a burst of arrivals is prefilled before any of it decodes (steady inter-token latency)
    prefill_first_burst: bool = True
    # once decoding, a step may carry prompt tokens up to this multiple of a decode step's
    # time (measured; GPU engines only); 0: the whole step budget
    mixed_step_slowdown: float = 1.4
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # "torch" | "triton"; auto picks triton on CUDA
    cuda_graphs: bool = True
    # steps that prefill, up to this many tokens, run as CUDA graphs cut around attention
    # (engine/prefill_graphs.py; with cuda_graphs on a GPU); 0: launched eagerly
    prefill_graph_tokens: int = 512
    # launch each step before reading back the last one's tokens (host work overlaps the
    # GPU's); None: on for CUDA, off on the CPU where nothing runs asynchronously
    async_scheduling: bool | None = None
    # few-token projections (decode) through the Triton GEMV on CUDA (layers/gemv.py)
    gemv: bool = True
    max_logprobs: int = 20
    # threads building grammar masks (llguidance's executor; None: its default, 80% of the
    # CPUs). One: a batch of 64 JSON-schema masks is built faster on one thread than on
    # llguidance's pool of 12 (docs/benchmarks.md, guided decoding)
    guided_mask_threads: int | None = 1
    # The context store below G1 (G2 host memory, G3 disk, G4 shared); None: G1 only.
    kv_store: StoreConfig | None = None

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
        if self.prefill_graph_tokens < 0:
            raise ValueError("prefill_graph_tokens must be >= 0 (0 turns prefill graphs off)")
