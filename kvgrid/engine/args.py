"""Command-line flags shared by every command that starts an engine (generate, chat, worker)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvgrid import envs
from kvgrid.engine.config import EngineConfig
from kvgrid.store.config import GiB, StoreConfig, default_store_dir


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
    g.add_argument(
        "--prefill-graph-tokens",
        type=int,
        default=512,
        help="steps that prefill up to this many tokens replay CUDA graphs around their "
        "attention (0: eager)",
    )
    g.add_argument(
        "--async-scheduling",
        default="auto",
        choices=["auto", "on", "off"],
        help="launch each step before reading back the last one's tokens (auto: on for CUDA)",
    )
    g.add_argument(
        "--no-gemv", action="store_true", help="decode projections through cuBLAS, not Triton"
    )
    g.add_argument(
        "--guided-mask-threads",
        type=int,
        default=EngineConfig.guided_mask_threads,
        help="threads building grammar masks for guided decoding",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of dummy weights")
    add_store_args(parser)


def add_store_args(parser: argparse.ArgumentParser) -> None:
    d = StoreConfig()
    g = parser.add_argument_group("context store (tiers below G1)")
    g.add_argument("--no-kv-store", action="store_true", help="keep KV in G1 (GPU) only")
    g.add_argument(
        "--kv-store-host-gb", type=float, default=d.g2_bytes / GiB, help="G2 host memory"
    )
    g.add_argument(
        "--kv-store-dir",
        default=None,
        help="G3 local-disk directory (default: <store dir>/g3/<worker id>; the store dir is "
        "$KVGRID_STORE_DIR or $KVGRID_HOME/store)",
    )
    g.add_argument("--kv-store-disk-gb", type=float, default=d.g3_bytes / GiB, help="0: no G3")
    g.add_argument("--kv-store-shared-dir", default=None, help="G4 on a shared filesystem path")
    g.add_argument(
        "--kv-store-redis",
        default=None,
        metavar="URL",
        help="G4 on Redis/Valkey: redis://[user:password@]host:port/db or rediss:// (TLS); "
        "better in env KVGRID_KV_STORE_REDIS, since a command line is visible to every user",
    )
    g.add_argument("--kv-store-shared-gb", type=float, default=d.g4_bytes / GiB)
    g.add_argument("--kv-store-codec", default=d.codec, choices=["zstd", "zlib", "none", "int8"])
    g.add_argument(
        "--kv-master-key-file",
        default=None,
        help="master key for stored KV (or env KVGRID_MASTER_KEY; default: a local key "
        "generated once, mode 0600, in the store dir)",
    )


def store_config_from_args(args: argparse.Namespace, name: str = "local") -> StoreConfig | None:
    """The StoreConfig the flags describe; ``name`` separates the G3 folders of workers that
    share a machine (each tier has one owner that accounts for its capacity)."""
    if args.no_kv_store:
        return None
    redis_url = args.kv_store_redis or envs.KVGRID_KV_STORE_REDIS.get()
    if args.kv_store_shared_dir and redis_url:
        raise ValueError("G4 takes one backend: --kv-store-shared-dir or --kv-store-redis")
    g3 = None
    if args.kv_store_disk_gb > 0:
        g3 = Path(args.kv_store_dir) if args.kv_store_dir else default_store_dir() / "g3" / name
    return StoreConfig(
        g2_bytes=int(args.kv_store_host_gb * GiB),
        g3_dir=g3,
        g3_bytes=int(args.kv_store_disk_gb * GiB),
        g4_dir=args.kv_store_shared_dir,
        g4_redis=redis_url,
        g4_bytes=int(args.kv_store_shared_gb * GiB),
        codec=args.kv_store_codec,
        master_key_file=args.kv_master_key_file,
    )


def engine_config_from_args(args: argparse.Namespace, name: str = "local") -> EngineConfig:
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
        prefill_graph_tokens=args.prefill_graph_tokens,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
        gemv=not args.no_gemv,
        guided_mask_threads=args.guided_mask_threads,
        kv_store=store_config_from_args(args, name),
    )
