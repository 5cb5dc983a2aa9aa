"""Where a warm-cache G3 load goes: the per-block path against plain reads of the same files.

    python -m kvgrid.bench.gpu.profile_g3_load                  # 48 blocks of 8 MiB
    python -m kvgrid.bench.gpu.profile_g3_load --blocks 96 --threads 1,2,4

Objects of the Llama-3-8B block shape (8 MiB, random bf16: incompressible, so zstd stores
them raw, as real bf16 KV mostly is) are written to a G3 directory, encrypted and not, and
read back with the page cache warm. For each, with 1..N threads:
- raw: plain reads of the object files into a reused buffer (the ceiling: memcpy speed);
- load: the store's own per-block path (``ContextStore._fetch_lower``: read, verify,
  decrypt, decode, copy into a G2 slot), G2 emptied between passes;
and, on one thread, the time of each stage of that path. MB/s are of KV bytes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kvgrid import keys
from kvgrid.store import ContextStore, StoreConfig
from kvgrid.store.crypto import KeyRing
from kvgrid.store.object import decode_object, tenant_id

try:
    from kvgrid.store.transfer import host_copy as copy_into
except ImportError:  # the code before host_copy (for before/after runs)

    def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)


SHAPE = (32, 2, 64, 8, 128)  # Llama-3-8B: 8 MiB per 64-token block in bf16
TENANT = keys.PUBLIC_TENANT
KR = KeyRing({1: bytes(range(32))})  # fixed: objects kept under --root stay readable


def make_store(root: Path, encrypt: bool, n: int, codec: str) -> tuple[ContextStore, list]:
    cfg = StoreConfig(
        g2_bytes=(n + 2) * torch.Size(SHAPE).numel() * 2,
        g3_dir=root,
        g3_bytes=64 << 30,
        encrypt=encrypt,
        codec=codec,
        admit_after={"G2": 1, "G3": 1, "G4": 1},
        sweep_interval_s=0,
        io_queue=4 * n,
    )
    store = ContextStore(cfg, keyring=KR if encrypt else None)
    store.configure_blocks(SHAPE, torch.bfloat16)
    ks = keys.block_keys(list(range(64 * n)), keys.KVScope("m", "bf16").digest, 64)
    g = torch.Generator().manual_seed(0)
    for i, k in enumerate(ks):
        if not (root / "objects" / tenant_id(TENANT).hex() / (k.hex() + ".kvo")).exists():
            b = torch.randn(SHAPE, generator=g).to(torch.bfloat16)
            store.put(k, ks[i - 1] if i else None, TENANT, b, 64)
    assert store.flush(600)
    store.g2.clear()
    return store, ks


def raw(files: list[Path], threads: int) -> float:
    size = max(p.stat().st_size for p in files)
    bufs: dict[int, bytearray] = {}

    def read(p: Path) -> int:
        import threading

        b = bufs.setdefault(threading.get_ident(), bytearray(size))
        with open(p, "rb", buffering=0) as f:
            return f.readinto(b)

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(read, files[:threads]))  # buffers allocated outside the timing
        t0 = time.perf_counter()
        total = sum(ex.map(read, files))
        return total / (time.perf_counter() - t0)


def load(store: ContextStore, ks: list[bytes], threads: int, kv_bytes: int) -> float:
    tid = tenant_id(TENANT)

    def one(k: bytes) -> None:
        r = store._fetch_lower(tid, k, TENANT)
        assert r is not None and r[0] == "G3", "a load missed"
        if r[1] is not None:
            store.g2.release(r[1])

    with ThreadPoolExecutor(threads) as ex:
        best = 0.0
        for _ in range(3):
            store.g2.clear()
            t0 = time.perf_counter()
            list(ex.map(one, ks))
            best = max(best, len(ks) * kv_bytes / (time.perf_counter() - t0))
    return best


def stages(store: ContextStore, ks: list[bytes], kv_bytes: int) -> dict[str, float]:
    """One thread, per stage: MB/s of KV bytes (read, decode = verify + decrypt + codec,
    the copy into a G2 slot)."""
    tid = tenant_id(TENANT)
    tier = store.lower[0]
    t_read = t_dec = t_copy = 0.0
    slot = torch.empty(SHAPE, dtype=torch.bfloat16)
    for k in ks:
        t0 = time.perf_counter()
        blob = tier.get(tid, k)
        t1 = time.perf_counter()
        _, t = decode_object(blob, k, TENANT, store.keyring, torch.bfloat16, SHAPE)
        t2 = time.perf_counter()
        copy_into(slot, t)
        t3 = time.perf_counter()
        t_read, t_dec, t_copy = t_read + t1 - t0, t_dec + t2 - t1, t_copy + t3 - t2
    n = len(ks) * kv_bytes / 1e6
    return {"read": n / t_read, "decode": n / t_dec, "copy_to_slot": n / t_copy}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvgrid.bench.gpu.profile_g3_load")
    ap.add_argument("--blocks", type=int, default=48)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--codecs", default="none,zstd")
    ap.add_argument("--root", default=None)
    args = ap.parse_args(argv)
    threads = [int(x) for x in args.threads.split(",")]
    kv_bytes = torch.Size(SHAPE).numel() * 2
    root = Path(args.root or tempfile.mkdtemp(prefix="kvgrid-g3prof-"))
    print(f"{args.blocks} blocks of {kv_bytes >> 20} MiB under {root}")
    variants = [(e, c) for c in args.codecs.split(",") for e in (False, True)]
    for encrypt, codec in variants:
        name = ("enc" if encrypt else "plain") + f" {codec}"
        store, ks = make_store(root / name.replace(" ", "-"), encrypt, args.blocks, codec)
        files = [store.lower[0].path(tenant_id(TENANT), k) for k in ks]
        raw(files, 1)  # warm the page cache
        st = stages(store, ks, kv_bytes)
        print(
            f"{name:9s} stages, 1 thread, MB/s: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in st.items())
        )
        for th in threads:
            r = raw(files, th) / 1e6
            ld = load(store, ks, th, kv_bytes) / 1e6
            pct = f"{ld / r:.0%} of raw"
            print(f"{name:10s} {th} thread(s): raw {r:8,.0f} MB/s  load {ld:8,.0f} MB/s  ({pct})")
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
