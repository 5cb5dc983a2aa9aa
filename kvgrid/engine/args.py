"""Command-line flags shared by every command that starts an engine (generate, chat, worker):
EngineConfig's fields, and the context store's StoreConfig fields that a command sets."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvgrid import envs
from kvgrid.engine.config import EngineConfig
from kvgrid.flags import add_dataclass_args, dataclass_kwargs
from kvgrid.store.config import StoreConfig, default_store_dir

STORE_FLAG_FIELDS = (
    "g2_bytes",
    "g3_dir",
    "g3_bytes",
    "g4_dir",
    "g4_redis",
    "g4_bytes",
    "codec",
    "master_key_file",
    "fetch_procs",
    "write_procs",
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser.add_argument_group("engine"), EngineConfig)
    add_store_args(parser)


def add_store_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("context store (tiers below G1)")
    g.add_argument("--no-kv-store", action="store_true", help="keep KV in G1 (GPU) only")
    add_dataclass_args(g, StoreConfig, STORE_FLAG_FIELDS)


def store_config_from_args(args: argparse.Namespace, name: str = "local") -> StoreConfig | None:
    """The StoreConfig the flags describe; ``name`` separates the G3 folders of workers that
    share a machine (each tier has one owner that accounts for its capacity)."""
    if args.no_kv_store:
        return None
    kw = dataclass_kwargs(StoreConfig, args, STORE_FLAG_FIELDS)
    kw["g4_redis"] = kw["g4_redis"] or envs.KVGRID_KV_STORE_REDIS.get()
    if kw["g4_dir"] and kw["g4_redis"]:
        raise ValueError("G4 takes one backend: --kv-store-shared-dir or --kv-store-redis")
    if args.kv_store_disk_gb <= 0:
        kw["g3_dir"] = None
    else:
        kw["g3_dir"] = Path(kw["g3_dir"]) if kw["g3_dir"] else default_store_dir() / "g3" / name
    return StoreConfig(**kw)


def engine_config_from_args(args: argparse.Namespace, name: str = "local") -> EngineConfig:
    kw = dataclass_kwargs(EngineConfig, args)
    return EngineConfig(**{**kw, "kv_store": store_config_from_args(args, name)})
