"""ModelRunner: owns the weights and the KV pool, turns a scheduled batch into one forward pass."""

from __future__ import annotations

import logging
import time

import torch

from kvgrid.engine.attention.base import AttentionBackend, AttentionMetadata
from kvgrid.engine.config import EngineConfig
from kvgrid.engine.scheduler import ScheduledSeq
from kvgrid.models.llama import LlamaForCausalLM, RotaryEmbedding
from kvgrid.models.loader import ModelSpec, iter_weights

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if config.dtype == "auto":
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif config.dtype in _DTYPES:
        dtype = _DTYPES[config.dtype]
    else:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {config.dtype!r}")
    return dev, dtype


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from kvgrid.engine.attention.torch_ref import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from kvgrid.engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r} (torch, triton)")


class ModelRunner:
    def __init__(self, config: EngineConfig, spec: ModelSpec, max_model_len: int):
        self.config = config
        self.spec = spec
        self.device, self.dtype = resolve_device_dtype(config)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.model = self._load_model()
        self.backend = make_backend(config.attention_backend, self.device)
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.num_blocks = self._num_kv_blocks()
        cfg = spec.config
        self.kv_cache = torch.zeros(
            self.num_blocks,
            cfg.num_hidden_layers,
            2,
            self.block_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def _load_model(self) -> LlamaForCausalLM:
        cfg = self.spec.config
        # build on the meta device: no time spent initialising weights that get overwritten
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg, self.max_model_len)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.rope = RotaryEmbedding(cfg, self.max_model_len).to(self.device)
        t0 = time.perf_counter()
        if self.spec.load_format == "dummy":
            model.init_dummy(self.config.seed)
        else:
            model.load_weights(iter_weights(self.spec))
        log.info("weights ready in %.1fs", time.perf_counter() - t0)
        return model.eval()

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        per_block = self.spec.config.kv_bytes_per_token(self.dtype.itemsize) * self.block_size
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            # leave room for activations of one full step and the logits
            budget = free - (1 - self.config.gpu_memory_utilization) * total - 2 * 1024**3
        else:
            budget = self.config.kv_cache_memory_gb * 1024**3
        num = int(budget // per_block)
        if num < self.max_blocks_per_seq:
            raise ValueError(
                f"KV cache too small: {num} blocks of {self.block_size} tokens cannot hold one "
                f"{self.max_model_len}-token sequence; raise kv_cache_memory_gb or lower "
                "max_model_len"
            )
        return num

    # ---- one step ----------------------------------------------------------------------

    def prepare(
        self, batch: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens, ctx_lens, sample_idx = [], [], []
        max_blocks = 1
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            tokens = seq.all_token_ids
            input_ids += tokens[start : start + n]
            positions += range(start, start + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            ctx_lens.append(start)
            max_blocks = max(max_blocks, len(table))
            if start + n == seq.num_tokens:  # prefill complete (or decode): sample from the last
                sample_idx.append(qsl[-1] - 1)
        tables = torch.zeros(len(batch), max_blocks, dtype=torch.int32)
        for i, item in enumerate(batch):
            t = item.seq.block_table
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        dev = self.device

        def i32(x):
            return torch.tensor(x, dtype=torch.int32).to(dev, non_blocking=True)

        meta = AttentionMetadata(
            query_start_loc=i32(qsl),
            seq_lens=i32(seq_lens),
            context_lens=i32(ctx_lens),
            block_tables=tables.to(dev, non_blocking=True),
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            max_query_len=max(item.num_tokens for item in batch),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
            context_lens_cpu=ctx_lens,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        return ids, pos, meta, sample_idx

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor | None, list[int]]:
        """Run one forward pass; logits [n_sampled, vocab] for the rows that sample."""
        ids, pos, meta, sample_idx = self.prepare(batch)
        hidden = self.model(ids, pos, self.kv_cache, meta, self.backend)
        if not sample_idx:
            return None, sample_idx
        idx = torch.tensor(sample_idx, device=self.device)
        return self.model.compute_logits(hidden[idx]), sample_idx
