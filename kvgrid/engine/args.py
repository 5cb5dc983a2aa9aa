"""Command-line flags shared by every command that starts an engine (generate, chat, worker)."""

from __future__ import annotations

import argparse

from kvgrid.engine.config import EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=None,
        help="HF-format model directory, or a shape name with --load-format dummy "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto")
    g.add_argument("--block-size", type=int, default=EngineConfig.block_size)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--kv-cache-memory-gb", type=float, default=EngineConfig.kv_cache_memory_gb)
    g.add_argument(
        "--gpu-memory-utilization", type=float, default=EngineConfig.gpu_memory_utilization
    )
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    g.add_argument(
        "--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens
    )
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    g.add_argument("--no-cuda-graphs", action="store_true")
    g.add_argument("--seed", type=int, default=0, help="seed of dummy weights")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        attention_backend=args.attention_backend,
        cuda_graphs=not args.no_cuda_graphs,
    )
