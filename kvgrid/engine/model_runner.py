"""ModelRunner: owns the weights and the KV pool, turns a scheduled batch into one forward pass."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from kvgrid.engine.config import EngineConfig
from kvgrid.engine.sampler import argmax_rows
from kvgrid.engine.scheduler import ScheduledSeq
from kvgrid.layers import gemv
from kvgrid.layers.attention.base import AttentionBackend, AttentionMetadata
from kvgrid.models.llama import LlamaForCausalLM, RotaryEmbedding, materialize
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
        from kvgrid.layers.attention.torch_ref import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from kvgrid.layers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r} (torch, triton)")


# Views into the packed step inputs start on 16-byte boundaries. Triton specialises a
# kernel on each pointer argument's 16-byte alignment: views at offsets that follow the
# batch's size would compile a new variant of the attention and K/V kernels (about half a
# second on the engine thread) at the first step of each new alignment, mid-serving.
ALIGN_BYTES = 16


def pack_aligned(parts: list[np.ndarray], dtype) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``parts`` in one array of ``dtype``, each starting at a multiple of ``ALIGN_BYTES``;
    and each part's (start, end) in it."""
    step = ALIGN_BYTES // np.dtype(dtype).itemsize
    spans, at = [], 0
    for p in parts:
        spans.append((at, at + p.size))
        at += -(-p.size // step) * step
    out = np.zeros(at, dtype=dtype)
    for (a, b), p in zip(spans, parts):
        out[a:b] = p.ravel()
    return out, spans


class ModelRunner:
    def __init__(self, config: EngineConfig, spec: ModelSpec, max_model_len: int):
        self.config = config
        self.spec = spec
        self.device, self.dtype = resolve_device_dtype(config)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.model = self._load_model()
        self._tune_gemv()
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
        # ---- CUDA path (owner: cuda_graphs.py): decode steps replay captured graphs ----
        self.staging_in = self.staging_out = None
        self.extra_hidden: torch.Tensor | None = None  # see execute
        if self.device.type == "cuda":
            from kvgrid.engine.staging import PinnedRing

            # the largest step's packed inputs (see prepare) and sampled tokens
            tok, seqs = config.max_num_batched_tokens, config.max_num_seqs
            i64 = 8 * (3 * tok + 3 * seqs)
            i32 = 4 * (3 * seqs + 1 + seqs * self.max_blocks_per_seq)
            self.staging_in = PinnedRing(max(i64, i32), depth=8)  # two buffers per step
            self.staging_out = PinnedRing(8 * seqs, depth=4)
        triton_gpu = self.device.type == "cuda" and self.backend.name == "triton"
        # what warm_thread builds per thread (it runs at every step: decided once here)
        self._sdpa_shape = None
        if triton_gpu:
            top = min(config.max_num_batched_tokens, max_model_len)
            self._sdpa_shape = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, top)
        self.graphs = None
        if config.cuda_graphs and triton_gpu:
            from kvgrid.engine.cuda_graphs import DecodeGraphRunner

            self.graphs = DecodeGraphRunner(
                lambda ids, pos, meta: self.model(ids, pos, self.kv_cache, meta, self.backend),
                config.max_num_seqs,
                self.max_blocks_per_seq,
                max_model_len,
                self.device,
            )
            self.graphs.capture()
        self.prefill_graphs = None
        max_tokens = min(config.prefill_graph_tokens, config.max_num_batched_tokens)
        if self.graphs is not None and max_tokens >= 16:
            from kvgrid.engine.prefill_graphs import PrefillGraphRunner

            self.prefill_graphs = PrefillGraphRunner(
                self.model, self.backend, self.kv_cache, max_tokens, self.device, self.dtype
            )
            self.prefill_graphs.capture()
        if self.device.type == "cuda":
            self._warm_logits(config.max_num_seqs)
            if self.backend.name == "triton":
                self.backend.warm_up(self.kv_cache, self.spec.config.num_attention_heads)
        # ---- end CUDA path ----

    def warm_thread(self) -> None:
        """What must be warmed on the thread that steps, which need not be the one that built
        the runner (the server's engine loop): cuDNN's attention plans, which it keeps per
        thread (``TritonAttentionBackend.warm_sdpa``). A no-op once done on a thread."""
        if self._sdpa_shape is None:
            return
        t0 = time.perf_counter()
        if self.backend.warm_sdpa(*self._sdpa_shape, self.dtype, self.device):
            log.info(
                "attention plans to %d tokens: %.1fs",
                self._sdpa_shape[-1],
                time.perf_counter() - t0,
            )

    @torch.inference_mode()
    def _warm_logits(self, max_rows: int) -> None:
        """Run the logits projection (and greedy pick) once for every row count a decode step
        can have. Each time the batch shrinks onto a new multiple of 8 the logits GEMM meets a new
        shape, and cuBLAS loads its kernel at first use, which waits for the device to go
        idle; with asynchronous scheduling that costs the step in flight (on an H200, once
        every 20-40 steps of a 256-request load: ITL p99 twice p50). Loading them all here
        keeps that out of serving."""
        hidden = torch.zeros(
            max_rows, self.spec.config.hidden_size, dtype=self.dtype, device=self.device
        )
        for m in range(1, max_rows + 1):
            argmax_rows(self.model.compute_logits(hidden[:m]))
        torch.cuda.synchronize(self.device)

    def _load_model(self) -> LlamaForCausalLM:
        cfg = self.spec.config
        # build on the meta device: no time spent initialising weights that get overwritten
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg, self.max_model_len)
        model = materialize(model, self.device, self.dtype)
        model.rope = RotaryEmbedding(cfg, self.max_model_len).to(self.device)
        t0 = time.perf_counter()
        if self.spec.load_format == "dummy":
            model.init_dummy(self.config.seed)
        else:
            model.load_weights(iter_weights(self.spec))
        log.info("weights ready in %.1fs", time.perf_counter() - t0)
        return model.eval()

    def _tune_gemv(self) -> None:
        """Choose the GEMV's configs for this model's projections at every decode batch it
        may take, now: tuning times kernels, which must not happen inside graph capture
        (and before the KV pool, so the tuner's scratch weights find room)."""
        self.model.set_gemv(self.config.gemv)
        if not (self.config.gemv and gemv.ENABLED and self.device.type == "cuda"):
            return
        if self.dtype not in (torch.bfloat16, torch.float16):
            return
        top = min(gemv.MAX_M, self.config.max_num_seqs)
        ms = sorted({gemv.m_bucket(m) for m in range(1, top + 1)})
        t0 = time.perf_counter()
        gemv.tune(self.spec.config.projection_shapes().values(), ms, self.dtype, self.device)
        torch.cuda.empty_cache()
        log.info("GEMV configs ready in %.1fs", time.perf_counter() - t0)

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
        self, batch: list[ScheduledSeq], prev_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flatten a scheduled batch into model inputs. Host work here is per sequence, not
        per token, so a large decode batch costs well under a millisecond. ``prev_tokens``:
        the sampled tokens of the step still in flight, for inputs not yet read back."""
        bs = self.block_size
        n_seq = len(batch)
        counts = np.fromiter((item.num_tokens for item in batch), np.int64, n_seq)
        starts = np.fromiter((item.seq.num_computed_tokens for item in batch), np.int64, n_seq)
        max_blocks = max(len(item.seq.block_table) for item in batch)
        tables = np.zeros((n_seq, max_blocks), dtype=np.int32)
        input_ids: list[int] = []
        # inputs that are the last step's tokens, still on the device (asynchronous
        # scheduling): (position in this batch, row of that step's sampled tokens)
        pending_at, pending_rows = [], []
        for i, item in enumerate(batch):
            seq, start = item.seq, int(starts[i])
            tables[i, : len(seq.block_table)] = seq.block_table
            if seq.num_pending:
                at = seq.num_known_tokens - start
                if 0 <= at < item.num_tokens:
                    pending_at.append(len(input_ids) + at)
                    pending_rows.append(seq.pending_rows[0])
            input_ids += seq.token_ids[start : start + item.num_tokens]
        qsl = np.zeros(n_seq + 1, dtype=np.int64)
        np.cumsum(counts, out=qsl[1:])
        seq_of_token = np.repeat(np.arange(n_seq), counts)
        positions = starts[seq_of_token] + (np.arange(qsl[-1]) - qsl[:-1][seq_of_token])
        slots = tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = starts + counts
        # a sequence samples when this chunk reaches its last token (prefill done, or decode)
        done = seq_lens == np.fromiter((item.seq.num_tokens for item in batch), np.int64, n_seq)
        sample_idx = (qsl[1:][done] - 1).tolist()

        # two packed host buffers (int64, int32), two copies: each separate small copy costs
        # a pinned allocation and a launch, and a decode step is a few milliseconds
        i64, at64 = pack_aligned(
            [
                np.asarray(input_ids, dtype=np.int64),
                positions,
                slots,
                np.asarray(pending_at, np.int64),
                np.asarray(pending_rows, np.int64),
                np.asarray(sample_idx, np.int64),
            ],
            np.int64,
        )
        i32, at32 = pack_aligned([qsl, seq_lens, starts, tables.ravel()], np.int32)
        d64, d32 = self._to_device(i64), self._to_device(i32)
        ids, pos, slot_map, at, rows, self._sample_rows = (d64[a:b] for a, b in at64)
        qsl_d, lens_d, ctx_d, tables_d = (d32[a:b] for a, b in at32)
        meta = AttentionMetadata(
            query_start_loc=qsl_d,
            seq_lens=lens_d,
            context_lens=ctx_d,
            block_tables=tables_d.view(n_seq, max_blocks),
            slot_mapping=slot_map,
            max_query_len=int(counts.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            context_lens_cpu=starts.tolist(),
        )
        if len(pending_at):
            if prev_tokens is None:
                raise RuntimeError("a batch input is a pending token but no step is in flight")
            ids[at] = prev_tokens[rows]  # on the device: the host has not seen them yet
        return ids, pos, meta, sample_idx

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        if self.staging_in is None:
            return torch.from_numpy(a)
        return self.staging_in.to_device(a, self.device)

    @torch.inference_mode()
    def execute(
        self,
        batch: list[ScheduledSeq],
        prev_tokens: torch.Tensor | None = None,
        *,
        extra_rows: list[int] | None = None,
    ) -> tuple[torch.Tensor | None, list[int]]:
        """Run one forward pass; logits [n_sampled, vocab] for the rows that sample. With
        ``extra_rows`` (rows of the flattened batch: prompt positions whose logprobs a request
        asked for), their hidden states are left in ``extra_hidden`` for the caller to turn
        into logits a few at a time (a vocabulary-wide row each)."""
        self.warm_thread()
        ids, pos, meta, sample_idx = self.prepare(batch, prev_tokens)
        # prefixes still landing from the store: this forward waits for them layer by layer
        # (all at once before a graph replay); afterwards the stream is ordered behind them
        landings = [item.seq.kv_landing for item in batch if item.seq.kv_landing is not None]
        for item in batch:
            item.seq.kv_landing = None
        if self.graphs is not None and self.graphs.can_run(meta):  # CUDA path: graph replay
            for landing in landings:
                landing.wait_all()
            hidden = self.graphs.run(ids, pos, meta)
        elif self.prefill_graphs is not None and self.prefill_graphs.can_run(meta, len(ids)):
            hidden = self.prefill_graphs.run(ids, pos, meta, landings)
        else:
            meta.landings = landings
            hidden = self.model(ids, pos, self.kv_cache, meta, self.backend)
        self.extra_hidden = None
        if extra_rows:
            self.extra_hidden = hidden[torch.tensor(extra_rows, device=hidden.device)]
        if not sample_idx:
            return None, sample_idx
        if len(sample_idx) < hidden.shape[0]:  # decode-only steps sample every row
            hidden = hidden[self._sample_rows]
        return self.model.compute_logits(hidden), sample_idx
