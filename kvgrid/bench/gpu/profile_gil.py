"""What a disk tier's loads, and its write-down, cost the engine's thread through the GIL.

The engine's thread launches a step as a few hundred short torch calls, each of which gives
up the GIL and takes it back. The store's fetch threads read, verify and decrypt blocks
beside it; every time one of them takes the GIL back after a system call or a decryption,
the engine's thread may have to wait for it. This measures that cost on this host.

    python -m kvgrid.bench.gpu.profile_gil                        # ~30 s, any machine
    python -m kvgrid.bench.gpu.profile_gil --dir /nvme/kvgrid --block-mb 8 --workers 2,8
    python -m kvgrid.bench.gpu.profile_gil --block-mb 8 --workers 8 --fetch-procs 0,2,4
    python -m kvgrid.bench.gpu.profile_gil --block-mb 8 --workers 4 --writes --write-procs 0,4

A probe thread makes ``torch.add`` calls on 64-element tensors (as many short calls that
give up the GIL as a step's launch makes) for ``--seconds``: alone, then while another
thread loads ``--blocks`` stored blocks from G3 (or G4) again and again, with each of
``--workers`` fetch-thread counts and each of ``--fetch-procs`` fetch-process counts (0:
the threads open the objects themselves; ``StoreConfig.fetch_procs``). Where the host has
two CPUs or more, the probe has one to itself and everything else (fetch processes
included) shares the rest: the GIL is then the only thing the probe shares.
With ``--writes``, the other thread puts blocks into G2 and waits for the write-down to
take them to the tier instead (``--workers``: writer threads; ``--write-procs``: write
processes, ``StoreConfig.write_procs``). Prints the probe's call rate
during the loads (writes) against alone, their rate, and the probe time lost per block;
writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from kvgrid.store.config import StoreConfig
from kvgrid.store.crypto import KeyRing
from kvgrid.store.object import cached_tenant_id
from kvgrid.store.store import ContextStore

TENANT = b"gil-probe"


def probe_rate(seconds: float, cpu: set[int] | None) -> float:
    """Short torch calls per second made by a new thread (on ``cpu`` if given)."""
    a, b, c = torch.ones(64), torch.ones(64), torch.empty(64)
    out: list[float] = []

    def run() -> None:
        if cpu:
            os.sched_setaffinity(0, cpu)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(100):
                torch.add(a, b, out=c)
            n += 100
        out.append(n / (time.perf_counter() - t0))

    t = threading.Thread(target=run, name="gil-probe")
    t.start()
    t.join()
    return out[0]


def open_store(root: Path, args, workers: int, procs: int = 0) -> tuple[ContextStore, list]:
    """A store whose lower tier holds ``args.blocks`` random blocks (G2 has room for them
    all: none is evicted before it is written down); ``procs``: fetch processes, or write
    processes with ``--writes``."""
    writes = getattr(args, "writes", False)
    nbytes = int(args.block_mb * (1 << 20)) // 2 * 2
    tier = {f"{args.tier}_dir": root, f"{args.tier}_bytes": 4 * args.blocks * nbytes}
    cfg = StoreConfig(
        g2_bytes=(args.blocks + 1) * nbytes, codec="none", encrypt=True, sweep_interval_s=0,
        load_workers=workers, **tier,
        **({"io_workers": workers, "write_procs": procs, "fetch_procs": 0} if writes
           else {"fetch_procs": procs, "write_procs": 0}),
    )  # fmt: skip
    store = ContextStore(cfg, keyring=KeyRing({1: os.urandom(32)}))
    keys = [os.urandom(32) for _ in range(args.blocks)]
    shape = (nbytes // 2,)
    for i in range(0, len(keys), 8):
        ks = keys[i : i + 8]
        blocks = [torch.randn(shape).to(torch.bfloat16) for _ in ks]
        store.put_many(ks, [None] * len(ks), TENANT, blocks, 64)
    store.settle()  # G2's blocks go down, as at a shutdown
    store.flush()
    return store, keys


def wait_started(procs, nbytes: int, cpus: set[int] | None) -> None:
    """Wait (60 s at most) for the store's fetch or write processes to start, then put
    them on ``cpus``: the loads (writes) are measured from their first block on."""
    end = time.monotonic() + 60
    while not procs.fits(nbytes) and time.monotonic() < end:
        time.sleep(0.05)
    for pid in procs.pids if cpus else []:
        os.sched_setaffinity(pid, cpus)


def measure(root: Path, args, workers: int, procs: int, probe_cpu, rest_cpu) -> dict:
    store, keys = open_store(root, args, workers, procs)
    tid = cached_tenant_id(TENANT)
    helpers = store.write_procs if args.writes else store._procs
    if helpers is not None:
        wait_started(helpers, store._block_bytes, rest_cpu)

    def drop_g2() -> None:  # every load reads the tier below: G2 drops its copies first
        for k in keys:
            store.g2.delete(tid, k)

    drop_g2()
    below = sum(w is not None for w in store.contains(keys, TENANT, leading=False))
    dsts = [torch.empty(store.block_shape, dtype=store.block_dtype) for _ in keys]
    blocks = [torch.randn(store.block_shape).to(store.block_dtype) for _ in range(8)]

    def load() -> int:
        drop_g2()
        return len(store.load_into(keys, TENANT, dsts))

    def write() -> int:  # blocks leaving G1 go to G2 and are written down to the tier
        ks = [os.urandom(32) for _ in blocks]
        store.put_many(ks, [None] * len(ks), TENANT, blocks, 64)
        store.flush()
        for k in ks:
            store.g2.delete(tid, k)
        return len(ks)

    try:
        alone, busy, rate = beside(write if args.writes else load, args.seconds, probe_cpu,
                                   rest_cpu)  # fmt: skip
        served = helpers.served if helpers is not None else 0
    finally:
        store.close()
    lost = 1 - busy / alone
    return {
        "workers": workers,
        "fetch_procs": 0 if args.writes else procs,
        "write_procs": procs if args.writes else 0,
        "blocks_from_procs": served,
        "blocks_below_g2": below,
        "probe_alone_per_s": alone,
        "probe_busy_per_s": busy,
        "probe_ratio": busy / alone,
        "blocks_per_s": rate,
        "gb_per_s": rate * dsts[0].nbytes / 1e9,
        "probe_us_lost_per_block": 1e6 * lost / rate if rate > 0 else None,
    }


def beside(work, seconds: float, probe_cpu, rest_cpu, pairs: int = 4) -> tuple[float, float, float]:
    """The probe's rate alone and while another thread (on ``rest_cpu``) runs ``work()``
    (which returns how many blocks it moved) again and again, in ``pairs`` alternating
    windows of ``seconds / pairs`` each (a drift of the host's speed falls on both alike);
    and those blocks per second."""
    go, stop, idle = threading.Event(), threading.Event(), threading.Event()
    moved, spent = [0], [0.0]

    def run() -> None:
        if rest_cpu:
            os.sched_setaffinity(0, rest_cpu)  # the store's threads it starts inherit this
        while not stop.is_set():
            if not go.wait(0.05):
                idle.set()
                continue
            idle.clear()
            t0 = time.perf_counter()
            moved[0] += work()
            spent[0] += time.perf_counter() - t0
        idle.set()

    thread = threading.Thread(target=run, name="gil-work")
    thread.start()
    alone, busy, n, s = [], [], 0, 0.0
    try:
        for _ in range(pairs):
            go.clear()
            if not idle.wait(120):
                raise RuntimeError("the work did not stop within 120 s")
            alone.append(probe_rate(seconds / pairs, probe_cpu))
            go.set()
            time.sleep(0.1)
            n0, s0 = moved[0], spent[0]
            busy.append(probe_rate(seconds / pairs, probe_cpu))
            n, s = n + moved[0] - n0, s + spent[0] - s0
    finally:
        stop.set()
        go.set()
        thread.join()
    return sum(alone) / pairs, sum(busy) / pairs, n / s if s > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvgrid.bench.gpu.profile_gil",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the tier's folder goes")
    ap.add_argument("--tier", choices=("g3", "g4"), default="g3")
    ap.add_argument("--blocks", type=int, default=200)
    ap.add_argument("--block-mb", type=float, default=1.0, help="8 for Llama-3-8B at block 64")
    ap.add_argument("--workers", default="1,8", help="fetch-thread counts, comma-separated")
    ap.add_argument("--fetch-procs", default="0", help="fetch-process counts (0: none)")
    ap.add_argument("--write-procs", default="0",
                    help="write-process counts, with --writes (0: none)")  # fmt: skip
    ap.add_argument("--writes", action="store_true",
                    help="measure the write-down instead (--workers: writer threads)")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=4.0, help="probe time during the loads")
    ap.add_argument("--out", help="JSON file")
    args = ap.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w]
    procs = [int(p) for p in (args.write_procs if args.writes else args.fetch_procs).split(",")
             if p]  # fmt: skip
    if args.blocks < 1 or args.block_mb <= 0 or args.seconds <= 0 or min(workers) < 1:
        ap.error("--blocks, --block-mb, --seconds and --workers must be positive")
    if not procs or min(procs) < 0:
        ap.error("--fetch-procs and --write-procs take counts >= 0")
    cpus = sorted(os.sched_getaffinity(0))
    probe_cpu, rest_cpu = ({cpus[0]}, set(cpus[1:])) if len(cpus) > 1 else (None, None)
    results = []
    for w in workers:
        for p in procs:
            root = Path(tempfile.mkdtemp(prefix="kvgrid-gil-", dir=args.dir))
            try:
                results.append(measure(root, args, w, p, probe_cpu, rest_cpu))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    what = "write-down to" if args.writes else "loads from"
    print(f"{what} {args.tier}, blocks of {args.block_mb} MiB, "
          f"probe {'on a CPU of its own' if probe_cpu else 'sharing the only CPU'}")  # fmt: skip
    print("workers | procs | probe busy / alone | blocks/s | GB/s | probe us lost per block")
    for r in results:
        lost = r["probe_us_lost_per_block"]
        n = r["write_procs"] if args.writes else r["fetch_procs"]
        print(f"{r['workers']:7d} | {n:5d} | {r['probe_ratio']:18.2f} | "
              f"{r['blocks_per_s']:8.0f} | "
              f"{r['gb_per_s']:4.2f} | {'-' if lost is None else f'{lost:.0f}'}")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        info = {"host": platform.node(), "cpus": len(cpus), "torch": torch.__version__,
                "python": platform.python_version()}  # fmt: skip
        Path(args.out).write_text(json.dumps({**vars(args), **info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
