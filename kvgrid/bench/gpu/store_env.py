"""The store benchmark's env phase: versions, the disk under --root, and raw ceilings: pinned
and pageable host->GPU copies of one 32K prompt's KV bytes, and the layer-by-layer landing
kernel over the same bytes.

    python -m kvgrid.bench.gpu.store_env
"""

# ruff: noqa: E501  (summary rows and result records are long)
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvgrid.bench.gpu import store_common as common
from kvgrid.bench.gpu.harness import DEV, GPU, log, sync, versions

NAME = "env"


def main(argv: list[str] | None = None) -> int:
    return common.main(argv, [sys.modules[__name__]])


def phase_env(args, eng) -> dict:
    env = {
        "shape": args.shape,
        **versions(),
        "block_bytes": eng.runner.kv_cache[0].nbytes,
        "kv_blocks_g1": eng.runner.num_blocks,
        "root": str(args.root),
    }
    import cryptography

    env["cryptography"] = cryptography.__version__
    try:
        import zstandard

        env["zstandard"] = zstandard.__version__
    except ImportError:
        env["zstandard"] = None
    for cmd, k in (
        (["df", "-hT", str(args.root)], "df"),
        (["findmnt", "-T", str(args.root)], "mount"),
    ):
        with contextlib.suppress(Exception):
            env[k] = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    with contextlib.suppress(Exception):
        env["meminfo"] = Path("/proc/meminfo").read_text().splitlines()[:2]
    if GPU:  # the PCIe link the host->GPU copies go over
        with contextlib.suppress(Exception):
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
            ).stdout.strip()  # fmt: skip
    # raw host->device: one 32K prompt's KV bytes, as one copy and as per-block copies
    bb = eng.runner.kv_cache[0].nbytes
    nblk = max(args.sizes) // eng.config.block_size
    if GPU:
        host = torch.empty((nblk, bb), dtype=torch.uint8, pin_memory=True)
        host.random_(0, 255)
        dev = torch.empty((nblk, bb), dtype=torch.uint8, device=DEV)
        pageable = torch.empty((nblk, bb), dtype=torch.uint8)
        pageable.copy_(host)
        res = {}
        for name, fn in (
            ("pinned_one_copy", lambda: dev.copy_(host, non_blocking=True)),
            ("pinned_per_block", lambda: [dev[i].copy_(host[i], non_blocking=True) for i in range(nblk)]),
            ("pageable_one_copy", lambda: dev.copy_(pageable)),
        ):  # fmt: skip
            ts = []
            for _ in range(4):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                ts.append(time.perf_counter() - t0)
            res[name] = nblk * bb / min(ts[1:]) / 1e9
        env["h2d_GBps"] = res
        env["layered_landing"] = _landing_speed(eng, host, dev)
        del host, dev, pageable
        torch.cuda.empty_cache()
    log("env", json.dumps(env, default=str)[:1500])
    return env


def _landing_speed(eng, host: torch.Tensor, dev: torch.Tensor) -> dict:
    """The layer-by-layer landing kernel (kvgrid.store.landing) over the same bytes as the
    raw copies, into blocks in reverse order: bit-exact check, then device-timed GB/s."""
    from kvgrid.store.landing import land_layers

    shape, dt = eng.runner.kv_cache.shape[1:], eng.runner.kv_cache.dtype
    n = host.shape[0]
    hb, db = host.view(dt).view(n, *shape), dev.view(dt).view(n, *shape)
    si, di = list(range(n)), list(range(n - 1, -1, -1))
    stream = torch.cuda.Stream()

    def issue():  # one landing, started
        with torch.cuda.stream(stream):
            return land_layers(hb, si, db, di)

    def land():  # one landing, to completion; and the host time its issue took
        t0 = time.perf_counter()
        landing = issue()
        issue_s = time.perf_counter() - t0
        landing.synchronize()
        return landing, issue_s

    dev.zero_()
    land()
    exact = bool(torch.equal(dev.flip(0).cpu(), host))  # as bytes: random bits hold NaNs
    runs = [land() for _ in range(4)][1:]
    secs = [lnd.device_seconds() for lnd, _ in runs]
    host_s = [h for _, h in runs]
    last = runs[-1][0]
    first_layer = last.start.elapsed_time(last.events[0]) / 1e3
    from kvgrid.store import landing_kernel

    default, by_programs, alongside = landing_kernel.MAX_PROGRAMS, {}, {}
    for cap in (8, 16, 32, 48, 96, 1 << 20):
        landing_kernel.MAX_PROGRAMS = cap
        best = min(land()[0].device_seconds() for _ in range(3))
        by_programs[cap] = round(n * host.shape[1] / best / 1e9, 2)
        alongside[cap] = _work_alongside(issue)
    landing_kernel.MAX_PROGRAMS = default
    return {
        "exact": exact,
        "GBps": n * host.shape[1] / min(secs) / 1e9,
        "first_layer_s": first_layer,
        "all_s": min(secs),
        "host_issue_s": min(host_s),
        "programs": default,
        "GBps_by_programs": by_programs,
        "work_slowdown_by_programs": alongside,
    }


def _work_alongside(issue) -> float:
    """How much slower a decode-like load (bf16 matrix-vector products over 1 GiB of
    weights, on the default stream) runs while a landing ``issue()`` started copies on its
    own stream: the share of SMs a landing takes from the forward beside it."""
    w = torch.empty(16, 4096, 8192, dtype=torch.bfloat16, device=DEV).normal_()
    x = torch.randn(8, 4096, dtype=torch.bfloat16, device=DEV)

    def work() -> float:  # ~5 ms of device time, well inside one landing
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(16):
            for i in range(w.shape[0]):
                x[:, :1].copy_((x @ w[i])[:, :1])
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    work()
    alone = min(work() for _ in range(3))
    side = []
    for _ in range(3):
        landing = issue()
        side.append(work())
        landing.synchronize()
    return round(min(side) / alone, 3)


def run(args, eng, root: Path) -> dict:
    return phase_env(args, eng)


def summary(res: dict) -> list[str]:
    lines: list[str] = []
    if "h2d_GBps" in res:
        lines.append(
            "raw host->GPU GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in res["h2d_GBps"].items())
        )
    land = res.get("layered_landing")
    if land:
        lines.append(
            f"layer-by-layer landing kernel: {land['GBps']:.1f} GB/s, exact {land['exact']}, "
            f"first layer after {land['first_layer_s'] * 1e3:.1f} ms of {land['all_s'] * 1e3:.1f} ms, "
            f"issued in {land['host_issue_s'] * 1e3:.1f} ms of host time, {land['programs']} programs; "
            f"GB/s by programs {land['GBps_by_programs']}; a decode-like load beside it runs "
            f"this many times slower, by programs {land['work_slowdown_by_programs']}"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
