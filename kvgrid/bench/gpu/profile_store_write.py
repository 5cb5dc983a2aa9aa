"""Where the write-down's time goes: G2 -> G3 on a real directory, stage by stage, and end to end.

    python -m kvgrid.bench.gpu.profile_store_write                       # default model's block
    python -m kvgrid.bench.gpu.profile_store_write --shape llama3-8b --blocks 64 --threads 1,2,4

Blocks of the chosen shape (the default model's, SmolLM2-135M: 1.4 MiB per 64-token block;
or Llama-3-8B's, 8 MiB) hold random bf16 values (what a model with random weights produces:
zstd shrinks them by about a fifth, at about 0.5 GB/s) or, with ``--data zeros-ish``, a
compressible pattern. Measured, on one thread, median over the blocks:

- stages of one object: codec (the sample test and compression), AES-256-GCM, CRC-32, the
  object's assembly, the temp file's write, its fsync, the rename and directory fsync, and
  the tier's ledger update (lock, read, write);
- end to end: the store's write-down (blocks put into G2, then ``ContextStore.settle``
  sends all of them through the ranked writer threads to G3), bytes of KV per second, for
  each thread count;
- the disk's own ceiling: the same bytes written as plain files, as durably (write, fsync,
  rename, a directory fsync per 8 files), by the same number of threads;
- the CPU seconds the process spent per GB of KV written down (robust to a busy machine).

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kvgrid import keys
from kvgrid.store import ContextStore, StoreConfig
from kvgrid.store import codec as codecs
from kvgrid.store.crypto import KeyRing
from kvgrid.store.disk_io import fsync_dir
from kvgrid.store.disk_tier import DiskTier
from kvgrid.store.object import encode_object
from kvgrid.store.probe import probe_tier

SHAPES = {
    "smollm2-135m": (30, 2, 64, 3, 64),  # the default model: 1.4 MiB per block
    "llama3-8b": (32, 2, 64, 8, 128),  # 8 MiB per block
}
TENANT = keys.PUBLIC_TENANT
KR = KeyRing({1: bytes(range(32))})


def make_blocks(shape: tuple[int, ...], n: int, data: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(shape, generator=g)
        if data == "zeros-ish":  # mostly zeros with a few values: compresses well
            x = torch.where(torch.rand(shape, generator=g) < 0.05, x, torch.zeros(()))
        out.append(x.to(torch.bfloat16))
    return out


def stages(root: Path, blocks: list[torch.Tensor], codec: str) -> dict[str, float]:
    """Median seconds per block of each stage of one object's write (one thread)."""
    tier = DiskTier(root / "stages", 1 << 40)
    ks = keys.block_keys(list(range(64 * len(blocks))), os.urandom(16), 64)
    tid = os.urandom(16)
    aead = KR.aead(1, TENANT)
    t: dict[str, list[float]] = {}

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        t.setdefault(name, []).append(now - t0)
        return now

    for k, b in zip(ks, blocks):
        t0 = time.perf_counter()
        try:  # the sample alone: what a block costs when compressing does not pay
            codecs.encode(b, codec, 1, write_bytes_per_s=1e12)
            lap("codec_sample_only", t0)
        except TypeError:  # a store without the rule
            pass
        t0 = time.perf_counter()
        cid, payload = codecs.encode(b, codec, 1)
        t0 = lap("codec", t0)
        ct = aead.encrypt(os.urandom(12), payload, b"header")
        t0 = lap("encrypt", t0)
        zlib.crc32(ct)
        t0 = lap("crc32", t0)
        blob = b"".join((b"h" * 200, b"crc4", ct))
        t0 = lap("assemble", t0)
        tmp = tier.tmp / f"profile-{k.hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view) :]
        t0 = lap("file_write", t0)
        os.fsync(fd)
        os.close(fd)
        t0 = lap("fsync_file", t0)
        dst = tier.path(tid, k)
        dst.parent.mkdir(exist_ok=True)
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
        t0 = lap("rename_fsync_dir", t0)
        with tier._locked():
            led = tier._read_ledger()
            led["used"] += len(blob)
            tier._write_ledger(led)
        t0 = lap("ledger", t0)
        t.setdefault("codec_compressed", []).append(float(cid != codecs.NONE))
        t.setdefault("object_ratio", []).append(len(blob) / b.nbytes)
        t0 = time.perf_counter()
        encode_object(b, k, None, TENANT, 64, KR, codec, 1)
        lap("encode_object", t0)
    tier.close()
    return {k: statistics.median(v) for k, v in t.items()}


def write_down(
    root: Path, blocks: list[torch.Tensor], threads: int, codec: str, sync: bool = True
) -> dict:
    """The store's own write-down: G2 -> G3 with ``threads`` writers, until flushed
    (``sync``: each batch flushed to the disk, as ``StoreConfig.sync_writes`` does)."""
    n, nbytes = len(blocks), blocks[0].nbytes
    d = root / f"g3-{threads}-{os.urandom(3).hex()}"
    cfg = StoreConfig(
        g2_bytes=(n + 2) * nbytes, g3_dir=d, g3_bytes=64 << 30, codec=codec,
        io_workers=threads, io_queue=n + 2, io_block_s=60.0, probe_tiers=False, sync_writes=sync,
        sweep_interval_s=0, high_watermark=1.0, low_watermark=1.0,
        admit_after={"G2": 1, "G3": 2, "G4": 2},  # into G2 only, until settle()
    )  # fmt: skip
    store = ContextStore(cfg, keyring=KR)
    ks = keys.block_keys(list(range(64 * n)), os.urandom(16), 64)
    store.put_blocks(ks, [None, *ks[:-1]], TENANT, blocks, 64)
    store.flush(60)
    probe_tier(store, store.tier("G3"), threads)  # as at start: load and write bandwidth
    t0, c0 = time.perf_counter(), time.process_time()
    store.settle(600)  # G2 -> G3 alone: every block G2 holds, through the writers
    ok = store.flush(600)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    written = store.metrics.total("writedown", outcome="written")
    stored = sum(i.size for i in store.tier("G3").list())
    store.close()
    return {"threads": threads, "blocks": n, "written": written, "flushed": ok, "seconds": dt,
            "kv_bytes_per_s": written * nbytes / dt, "stored_bytes": stored,
            "cpu_s_per_gb": cpu / max(written * nbytes / 1e9, 1e-9)}  # fmt: skip


def disk_ceiling(root: Path, nbytes: int, n: int, threads: int, batch: int = 8) -> float:
    """Plain files of ``nbytes`` each, as durable as the store's (write, fsync, rename, one
    directory fsync per ``batch`` files), by ``threads`` threads: bytes/s."""
    d = root / f"raw-{threads}-{os.urandom(3).hex()}"
    d.mkdir()
    data = os.urandom(nbytes)

    def some(first: int) -> None:
        names = range(first, min(n, first + batch))
        for i in names:
            fd = os.open(d / f"{i}.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        for i in names:
            os.rename(d / f"{i}.tmp", d / f"{i}.obj")
        fsync_dir(d)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(some, range(0, n, batch)))
    return n * nbytes / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kvgrid.bench.gpu.profile_store_write", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--blocks", type=int, default=96)
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--data", choices=["random", "zeros-ish"], default="random")
    ap.add_argument("--codec", default="zstd")
    ap.add_argument("--root", default=None, help="a directory on the disk to measure")
    ap.add_argument(
        "--no-sync",
        action="store_true",
        help="write down as the store does by default (no flush per batch; the disk "
        "ceiling is still timed as durably)",
    )
    ap.add_argument("--out", default="store_write_profile.json")
    a = ap.parse_args(argv)
    shape = SHAPES[a.shape]
    blocks = make_blocks(shape, a.blocks, a.data)
    nbytes = blocks[0].nbytes
    root_ctx = tempfile.TemporaryDirectory(dir=a.root, prefix="kvgrid-write-profile-")
    with root_ctx as r:
        root = Path(r)
        st = stages(root, blocks[: min(len(blocks), 24)], a.codec)
        runs, ceil = [], {}
        for th in [int(x) for x in a.threads.split(",")]:
            runs.append(write_down(root, blocks, th, a.codec, not a.no_sync))
            ceil[th] = disk_ceiling(root, nbytes, a.blocks, th)
    print(f"block {list(shape)} bf16 = {nbytes / 2**20:.2f} MiB, {a.data} data, codec {a.codec}")
    print("one object, one thread (ms, median):")
    for k, v in st.items():
        if k in ("codec_compressed", "object_ratio"):
            print(f"  {k:18s} {v:8.3f}")
        else:
            print(f"  {k:18s} {v * 1e3:8.2f} ms  ({nbytes / max(v, 1e-9) / 1e9:6.2f} GB/s)")
    print("threads  write-down GB/s  CPU s/GB  disk ceiling GB/s  fraction")
    for r in runs:
        c = ceil[r["threads"]]
        r["disk_bytes_per_s"] = c
        print(f"{r['threads']:7d}  {r['kv_bytes_per_s'] / 1e9:15.3f}  {r['cpu_s_per_gb']:8.2f}  "
              f"{c / 1e9:17.3f}  {r['kv_bytes_per_s'] / c:8.2f}")  # fmt: skip
    out = {
        "shape": list(shape), "block_bytes": nbytes, "data": a.data, "codec": a.codec,
        "stages_s": st, "write_down": runs, "machine": platform.node(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
    }  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
