"""What a disk tier's lookup costs the engine's thread while the tier is busy: the tier's
owner (answers from memory) against a tier looked up with a stat per block (a folder another
process owns, or G4 on a shared path).

    python -m kvgrid.bench.gpu.profile_disk_lookup                  # ~20 s, any machine
    python -m kvgrid.bench.gpu.profile_disk_lookup --dir /nvme/kvgrid --seconds 20

For each mode, on a fresh folder under ``--dir``: ``--writers`` threads stage and commit
objects of ``--object-mb`` MiB into the tier (the write-down's renames, flushes and
evictions), ``--spinners`` threads run Python loops (the GIL work of decoding, verifying and
bookkeeping beside them), and the calling thread, as the engine's does at an admission,
looks up ``--blocks`` blocks the tier lacks every 5 ms for ``--seconds``. Prints the
lookups' p50/p90/p99 per mode; writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

from kvgrid.stats import percentile
from kvgrid.store.disk_tier import DiskTier


def lookups(root: Path, sole: bool, args) -> list[float]:
    """Seconds of each lookup of ``args.blocks`` absent blocks while the tier is busy."""
    holder = None if sole else DiskTier(root, 1 << 40, "G3", sole=True)  # owns the folder
    tier = DiskTier(root, int(args.capacity_gb * (1 << 30)), "G3", sole=True)
    assert tier.sole == sole, "the folder's ownership is not what the mode needs"
    tid, blob = secrets.token_bytes(16), os.urandom(int(args.object_mb * (1 << 20)))
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            tier.commit([tier.stage(tid, secrets.token_bytes(32), blob) for _ in range(4)])

    def spin() -> None:
        while not stop.is_set():
            sum(range(2000))

    threads = [threading.Thread(target=write) for _ in range(args.writers)]
    threads += [threading.Thread(target=spin) for _ in range(args.spinners)]
    for t in threads:
        t.start()
    out: list[float] = []
    try:
        time.sleep(1.0)  # the writers fill the tier past its watermark: evictions too
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            keys = [secrets.token_bytes(32) for _ in range(args.blocks)]
            t0 = time.perf_counter()
            tier.created_many(tid, keys)
            out.append(time.perf_counter() - t0)
            time.sleep(0.005)
    finally:
        stop.set()
        for t in threads:
            t.join()
        tier.close()
        if holder is not None:
            holder.close()
    return out


def percentiles(xs: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": 1e3 * percentile(xs, q, "rank") for q in (50, 90, 99)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvgrid.bench.gpu.profile_disk_lookup",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--dir", default=None, help="where the tiers' folders go (default: /tmp)")
    ap.add_argument("--writers", type=int, default=3)
    ap.add_argument("--spinners", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=80, help="blocks per lookup (a prompt's)")
    ap.add_argument("--object-mb", type=float, default=8.0, help="8: a Llama-3-8B block")
    ap.add_argument("--capacity-gb", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", default=None, help="JSON file")
    args = ap.parse_args(argv)
    res: dict = {"args": vars(args), "host": platform.node(), "cpus": os.cpu_count()}
    for mode, sole in (("stat", False), ("owner", True)):
        root = Path(tempfile.mkdtemp(prefix=f"kvgrid-lookup-{mode}-", dir=args.dir))
        try:
            lat = lookups(root, sole, args)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        res[mode] = {"lookups": len(lat), **percentiles(lat)}
    print(f"{args.blocks} absent blocks per lookup; {args.writers} writers of "
          f"{args.object_mb:g} MiB objects, {args.spinners} Python threads")  # fmt: skip
    print(f"{'mode':6} {'lookups':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for mode in ("stat", "owner"):
        r = res[mode]
        ms = " ".join(f"{r[k]:8.2f}" for k in ("p50_ms", "p90_ms", "p99_ms"))
        print(f"{mode:6} {r['lookups']:8d} {ms}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
