"""Store configuration: tier sizes, policies, tenants. Plain data; the store reads it once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from kvgrid import envs
from kvgrid.flags import flag
from kvgrid.models.default import kvgrid_home

GiB = 1 << 30
Codec = Literal["zstd", "zlib", "none", "int8"]


def default_store_dir() -> Path:
    """Where the embedded default keeps G3 and its local master key: $KVGRID_STORE_DIR, else
    the store folder of kvgrid's cache root."""
    return envs.KVGRID_STORE_DIR.get() or kvgrid_home() / "store"


@dataclass
class TenantPolicy:
    """Retention and quotas of one tenant. ``None`` means no limit."""

    ttl_s: float | None = None  # objects older than this are never served, then deleted
    quota_bytes: dict[str, int] = field(default_factory=dict)  # tier name ("G2".."G4") -> bytes


@dataclass
class StoreConfig:
    g2_bytes: int = field(default=2 * GiB, metadata=flag("kv-store-host-gb", scale=GiB))
    """G2 host memory (pinned where CUDA is available); 0: no G2"""
    g3_dir: str | Path | None = field(default=None, metadata=flag("kv-store-dir"))
    """G3 local-disk directory (default: <store dir>/g3/<worker id>; the store dir is
    $KVGRID_STORE_DIR or $KVGRID_HOME/store)"""
    g3_bytes: int = field(default=20 * GiB, metadata=flag("kv-store-disk-gb", scale=GiB))
    """G3 size; 0: no G3"""
    # G4: a shared tier, either a POSIX directory (NFS, Lustre...) or a Redis/Valkey URL.
    g4_dir: str | Path | None = field(default=None, metadata=flag("kv-store-shared-dir"))
    """G4 on a shared filesystem path"""
    g4_redis: str | None = field(
        default=None, repr=False, metadata=flag("kv-store-redis", metavar="URL")
    )
    """G4 on Redis/Valkey: redis://[user:password@]host:port/db or rediss:// (TLS); better
    in env KVGRID_KV_STORE_REDIS, since a command line is visible to every user"""
    g4_bytes: int = field(default=100 * GiB, metadata=flag("kv-store-shared-gb", scale=GiB))
    """G4 size"""
    g4_prefix: str = "kvgrid:"
    # Watermarks (fractions of capacity): above `high` a write first evicts down to `low`.
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    # A block goes to a tier only once it has been seen this many times (lookups that wanted
    # it, counting its first save as one sighting, plus one when the engine says it belongs
    # to a context already reused). Every tier takes everything by default: what reaches
    # the disks is bounded by their bandwidth, best reuse prospects first (writedown.py);
    # 2 for G3/G4 spares an SSD the blocks nobody has asked for again.
    admit_after: dict[str, int] = field(default_factory=lambda: {"G2": 1, "G3": 1, "G4": 1})
    codec: Codec = field(default="zstd", metadata=flag("kv-store-codec"))
    """payload codec: zstd (lossless), zlib, none, or int8 (lossy, per channel, used only
    where a block's round-trip relative error is within lossy_max_rel_error, otherwise that
    block is stored lossless)"""
    compression_level: int = 1
    lossy_max_rel_error: float = 0.01
    # AES-256-GCM of objects leaving the process (G3/G4). Off only for benchmarks.
    encrypt: bool = True
    master_key_file: str | Path | None = field(default=None, metadata=flag("kv-master-key-file"))
    """master key for stored KV (or env KVGRID_MASTER_KEY; default: a local key generated
    once, mode 0600, in the store dir)"""
    model_fingerprint: str = ""
    # Writes to G3/G4 (the write-down), ranked by reuse prospects: what G2 holds waits
    # there; at most io_queue blocks with a host copy of their own wait or are written, a
    # full queue blocks the caller for at most io_block_s, then the worst-ranked candidate
    # is skipped (and counted).
    io_workers: int = 4
    io_queue: int = 32
    io_block_s: float = 0.0
    # a writer writes up to this many objects before one flush of the tier (group commit)
    io_batch: int = 8
    # Flush each batch of objects to the disk (fsync, and the directory's) before they are
    # offered as stored: they then survive a power cut. Off, the page cache writes them
    # back (a restart of the process finds them all the same); an object a power cut tore
    # fails its check when read and is dropped, counted. The flushes cost a writer about 4 ms
    # per 8 MiB object (H200 host, profile_store_write), a third of its time on raw bf16.
    sync_writes: bool = False
    # A block leaving G1 while every G2 slot is pinned waits this long (in all, per
    # hand-down) for one to be let go before it is dropped (and counted).
    g2_wait_s: float = 1.0
    # ... and while the only blocks G2 could give up wait for the write-down, it waits up
    # to this long (in all, per hand-down) for a write in flight to finish before it gives
    # up the worst-ranked of them (a busy GPU must not wait for a disk for long).
    g2_spare_s: float = 0.02
    # At start, time a few block-sized objects through each disk tier (write, then a cold
    # read) so that load-versus-recompute starts from this machine's bandwidth.
    probe_tiers: bool = True
    # Loads from G3/G4: this many threads read, verify, decrypt and decode blocks (2 per
    # thread in flight), each into a pinned G2 slot that feeds an asynchronous copy to G1.
    load_workers: int = 8
    fetch_procs: int | None = field(default=None, metadata=flag("kv-fetch-procs"))
    """processes that read, verify, decrypt and decode the disk tiers' objects for the load
    threads, started at the first load from a disk (0: the threads do it themselves, and
    every system call and decryption of theirs gives up the GIL and takes it back, holding
    up the engine's thread); default: where this process may run on 8 CPUs or more, one per
    4 CPUs up to 4, else 0 (on fewer, the processes take the CPU the loads and the engine
    need)"""
    write_procs: int | None = field(default=None, metadata=flag("kv-write-procs"))
    """processes that encode, encrypt and write the blocks going down to the disk tiers
    for the write-down's threads, started at its first write (0: the threads do it, each
    system call and encryption giving up the GIL and taking it back); default: as many as
    there are writer threads (io_workers), up to 4, where this process may run on 8 CPUs
    or more, else 0"""
    # Also save blocks right after prefill names them, not only when G1 evicts them: the
    # context is below G1 at once, and an eviction copies nothing, so a request admitted
    # into evicted blocks never waits for their write-back (a device-to-host copy per block
    # after prefill, beside the forward; H200, `kvgrid bench reuse` g2 against g2+nowt).
    # None (auto): only where G2 holds at least what G1 does; a smaller G2 gives up blocks
    # written through long before G1 evicts them, so the copies buy nothing and the
    # engine's thread pays for each.
    write_through: bool | None = None
    lease_timeout_s: float = 30.0
    # Tier load bandwidths (bytes/s) used only where neither the start-up probe nor a load
    # has measured one (probe_tiers off, or the probe failed).
    seed_bytes_per_s: dict[str, float] = field(
        default_factory=lambda: {"G2": 10e9, "G3": 1e9, "G4": 3e8}
    )
    # lookup() offers a stored prefix only while loading it is estimated to take less than
    # this fraction of recomputing it.
    max_load_ratio: float = 1.0
    sweep_interval_s: float = 60.0  # TTL sweeper period; 0 disables the thread
    redis_retry_s: float = 2.0  # after a Redis failure, treat it as down this long
    # a disk tier turned off by a fault (full, read-only, I/O error) is retried this often
    disk_retry_s: float = 10.0
    # the longest wait for a disk tier's ledger lock (another process may hold it)
    lock_timeout_s: float = 5.0
    tenants: dict[bytes, TenantPolicy] = field(default_factory=dict)
    default_tenant: TenantPolicy = field(default_factory=TenantPolicy)

    @classmethod
    def local_default(cls, **overrides) -> StoreConfig:
        """The embedded default: G2 in memory, G3 under the user's kvgrid cache dir."""
        return cls(**{"g3_dir": default_store_dir() / "g3", **overrides})

    def policy(self, tenant: bytes) -> TenantPolicy:
        return self.tenants.get(tenant, self.default_tenant)

    def validate(self) -> None:
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ValueError("watermarks need 0 < low_watermark <= high_watermark <= 1")
        if self.g4_dir and self.g4_redis:
            raise ValueError("G4 takes one backend: g4_dir or g4_redis, not both")
        if self.codec not in get_args(Codec):
            raise ValueError(f"unknown codec {self.codec!r}: zstd, zlib, none or int8")
        if self.g2_wait_s < 0 or self.g2_spare_s < 0:
            raise ValueError("g2_wait_s and g2_spare_s must be >= 0")
        if min(self.io_queue, self.io_workers, self.load_workers, self.io_batch) < 1:
            raise ValueError("io_queue, io_workers, io_batch and load_workers must be >= 1")
        for name in ("fetch_procs", "write_procs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def fetch_procs_here(self) -> int:
        """``fetch_procs``, or where unset, what suits this host's CPUs."""
        if self.fetch_procs is not None:
            return self.fetch_procs
        # as many as a load's window keeps busy (4 runs of 4), a CPU in four at most
        cpus = _cpus()
        return min(4, cpus // 4) if cpus >= 8 else 0

    def write_procs_here(self) -> int:
        """``write_procs``, or where unset, what suits this host's CPUs."""
        if self.write_procs is not None:
            return self.write_procs
        # one per writer thread, so that none waits for another's process
        return min(4, self.io_workers) if _cpus() >= 8 else 0


def _cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0))
