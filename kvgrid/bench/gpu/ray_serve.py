"""`kvgrid serve --ray` against `kvgrid serve` on the same GPU, the same replay, in one run.

Ray places and supervises; it is not on the data path (HTTP and ZeroMQ between frontend and
worker, as without Ray). This measures that claim: a one-node Ray cluster started here (the
head, with this machine's GPUs), one worker either way, the same closed-loop replay of a
Mooncake conversation slice, output throughput and latencies side by side, and their ratio.

    python -m kvgrid.bench.gpu.ray_serve                        # H200: Llama-3.1-8B shape, dummy
    # a CPU trial at tiny size (prompts and answers within --max-model-len)
    python -m kvgrid.bench.gpu.ray_serve --model PATH --load-format auto --limit 24 \\
        --concurrency 4 --serve-arg=--max-model-len=1024 --workload \\
        mooncake:bench/data/mooncake_conversation_slice.jsonl,max_input_tokens=768,max_output_tokens=128

Prints a table and writes ``gpu_ray.json`` (every run's replay report) and ``gpu_ray.png``
under ``--out`` (default ``$OUT`` or bench/results/ray-<date>).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

from kvgrid.bench.procs import interrupt
from kvgrid.bench.replay import Replayer, format_table, report
from kvgrid.bench.workloads import load_workload
from kvgrid.server.ray.local import free_port, start_node

ROOT = Path(__file__).resolve().parents[3]  # the repository: traces and results

WORKLOAD = (
    f"mooncake:{ROOT}/bench/data/mooncake_conversation_slice.jsonl,tokens_per_block=128,"
    "max_input_tokens=16384,max_output_tokens=256"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count(),
    }
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError:
        env["ray"] = None
    return env


def absolute_pythonpath() -> dict[str, str]:
    """Ray's workers start in their own folders: every path they import from is absolute."""
    parts = [str(ROOT)] + [
        str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(":") if p
    ]
    return {**os.environ, "PYTHONPATH": ":".join(dict.fromkeys(parts))}


class Server:
    """One `kvgrid serve` (or `kvgrid serve --ray ADDRESS`) process."""

    def __init__(
        self, mode: str, args, ray_address: str | None, env, log_dir: Path, store_dir: Path
    ) -> None:
        self.mode = mode
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "kvgrid.cli", "serve", "--port", str(self.port),
               "--model", args.model, "--load-format", args.load_format,
               "--kv-store-dir", str(store_dir), *args.serve_arg]  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if mode == "ray":
            cmd += ["--ray", ray_address, "--ray-worker-cpus", str(args.threads or 1)]
        self.log = log_dir / f"serve_{mode}.log"
        self.t0 = time.monotonic()
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> float:
        deadline = self.t0 + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.mode}: serve exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        tail = self.log.read_text()[-3000:]
        raise RuntimeError(f"{self.mode}: not ready in {timeout_s}s:\n{tail}")

    def stop(self) -> None:
        interrupt(self.proc, 120)


def replay(url: str, spec: str, concurrency: int, limit: int | None, progress: bool) -> dict:
    w = load_workload(spec)
    if limit:
        w.requests = w.requests[:limit]
    rep = Replayer(url)
    results, duration = asyncio.run(rep.run(w, concurrency=concurrency, progress=progress))
    return report(w, results, duration, None, 64, {"closed_loop": True, "concurrency": concurrency})


def one_run(mode: str, args, ray_address, env, out: Path, store_dir: Path) -> dict:
    """One server's replay. ``store_dir``: its own, empty G3 (the embedded default's folder
    persists across runs, and a later run would load what an earlier one stored)."""
    log(f"{mode}: starting the server")
    srv = Server(mode, args, ray_address, env, out, store_dir)
    try:
        ready_s = srv.wait_ready(args.ready_timeout_s)
        log(f"{mode}: ready in {ready_s:.1f}s; warm-up")
        # fresh prompts, nothing the measured replay could reuse
        warm = f"no_reuse:num_requests={args.warmup},input_tokens=512,output_tokens=32,seed=99"
        replay(srv.url, warm, min(args.concurrency, args.warmup), None, False)
        log(f"{mode}: replay")
        rep = replay(srv.url, args.workload, args.concurrency, args.limit, True)
        rep.pop("requests", None)
        m = rep["metrics"]
        log(f"{mode}: {m['output_throughput']:.1f} output tok/s, {m['completed']} ok, "
            f"{m['failed']} failed")  # fmt: skip
        print(format_table(rep), flush=True)
        return {**rep, "server": mode, "ready_s": ready_s}
    finally:
        srv.stop()


def summarize(runs: list[dict]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["server"], []).append(r["metrics"])

    def mean(mode: str, key: str) -> float | None:
        xs = [m[key] for m in by.get(mode, []) if m.get(key) is not None]
        return sum(xs) / len(xs) if xs else None

    keys = ("output_throughput", "request_throughput")
    s = {mode: {k: mean(mode, k) for k in keys} for mode in by}
    for mode in by:
        for k in ("ttft_ms", "tpot_ms", "itl_ms"):
            vals = [m[k]["p50"] for m in by[mode] if m.get(k) and m[k].get("p50") is not None]
            s[mode][f"{k}_p50"] = sum(vals) / len(vals) if vals else None
    if "ray" in s and "plain" in s and s["plain"]["output_throughput"]:
        s["ray_over_plain_output_throughput"] = (
            s["ray"]["output_throughput"] / s["plain"]["output_throughput"]
        )
    return s


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("plain", "ray") if m in summary]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    labels = {"plain": "kvgrid serve", "ray": "kvgrid serve --ray"}
    for ax, (key, title) in zip(
        axes, (("output_throughput", "output tok/s"), ("ttft_ms_p50", "TTFT p50 (ms)"))
    ):
        vals = [summary[m][key] or 0 for m in modes]
        ax.bar([labels[m] for m in modes], vals, color=["#4c72b0", "#dd8452"][: len(modes)])
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kvgrid.bench.gpu.ray_serve", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", default="llama3.1-8b", help="Llama-3-8B layout, 128K context")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--workload", default=WORKLOAD)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="first N requests of the workload")
    p.add_argument("--warmup", type=int, default=16, help="requests before each measured replay")
    p.add_argument("--order", default="ray,plain", help="runs, in order (e.g. ray,plain,plain,ray)")
    p.add_argument("--threads", type=int, default=8, help="torch threads (and Ray CPUs) per worker")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the Ray node (default all)")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=["--max-model-len=16640"],
        help="a flag for both servers (repeatable), e.g. --serve-arg=--no-kv-store",
    )
    p.add_argument("--ready-timeout-s", type=float, default=600.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or ROOT / f"bench/results/ray-{date.today()}")
    out.mkdir(parents=True, exist_ok=True)
    env = absolute_pythonpath()
    os.environ.update(env)
    info = environment()
    log(f"environment: {info}")
    modes = [m.strip() for m in args.order.split(",") if m.strip()]
    if set(modes) - {"ray", "plain"}:
        p.error("--order lists ray and plain runs")
    head = None
    tmp = Path(tempfile.mkdtemp(prefix="kvgrid-ray-bench-", dir="/tmp"))
    runs: list[dict] = []
    try:
        if "ray" in modes:
            head = start_node(
                "127.0.0.1",
                tmp / "head",
                num_cpus=args.ray_cpus or os.cpu_count() or 1,
                num_gpus=info["gpus"],
                object_store_bytes=256 << 20,
                env=env,
            )
            head.wait_started()
            log(f"Ray head at {head.address}")
        for i, mode in enumerate(modes):
            address = head.address if head else None
            runs.append(one_run(mode, args, address, env, out, tmp / f"store-{i}-{mode}"))
    finally:
        if head is not None:
            head.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(runs)
    result = {"environment": info, "args": vars(args), "summary": summary, "runs": runs}
    (out / "gpu_ray.json").write_text(json.dumps(result, indent=1, default=str))
    plot(summary, out / "gpu_ray.png")
    print("\n| server | output tok/s | req/s | TTFT p50 ms | TPOT p50 ms |")
    print("| --- | --- | --- | --- | --- |")
    for mode in ("plain", "ray"):
        if mode in summary:
            s = summary[mode]
            print(f"| {mode} | {s['output_throughput']:.1f} | {s['request_throughput']:.2f} | "
                  f"{s['ttft_ms_p50'] or 0:.0f} | {s['tpot_ms_p50'] or 0:.1f} |")  # fmt: skip
    ratio = summary.get("ray_over_plain_output_throughput")
    if ratio is not None:
        print(f"ray / plain output throughput: {ratio:.3f} (target >= 0.95)")
    print(f"wrote {out / 'gpu_ray.json'} and {out / 'gpu_ray.png'}")
    failed = sum(r["metrics"]["failed"] for r in runs)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
