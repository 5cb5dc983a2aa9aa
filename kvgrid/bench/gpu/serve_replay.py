"""Server-level replay of Mooncake traces against `kvgrid serve`, without and with the context
store: goodput at a TTFT limit, at offered loads that saturate the server without the store.

    # one H200, Llama-3-8B shape, random bf16 weights (the server needs fastapi, uvicorn,
    # pyzmq... on the GPU machine: see docs/benchmarks.md for the wheels to carry)
    python -m kvgrid.bench.gpu.serve_replay --model llama3-8b --load-format dummy \\
        --trace conversation=bench/data/mooncake_conversation_slice.jsonl \\
        --trace toolagent=/path/to/toolagent_trace.jsonl --speeds 10,20,40 --out out/replay
    # CPU smoke run (default model: SmolLM2's 49,152-token vocabulary)
    python -m kvgrid.bench.gpu.serve_replay --vocab 49152 --speeds 1 --limit 12 \\
        --max-input 256 --num-kv-blocks 64 --g2-gb 1 --g3-gb 2 --out out/replay-cpu

For each trace and each configuration (``no_store``: G1 only; ``store``: the same G1 with G2
host memory and G3 on local disk) one server is started; the trace is replayed open loop at
each speed-up (arrival gaps divided by it), each point with its own token seed so that no
point reuses another's prefixes. Per point: request rate offered, p50/p90 TTFT, goodput
(requests per second whose TTFT met ``--ttft-limit-s``) and the server's hit rate. Per
configuration: the best goodput among the points whose p90 TTFT stays within the limit,
and the store's ratio to no store. Prints a table last; writes JSON and a PNG under --out.
"""

# ruff: noqa: E501  (table rows are long)
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from kvgrid import envs
from kvgrid.bench.mooncake import load_mooncake
from kvgrid.bench.procs import interrupt
from kvgrid.bench.replay import SLO, Replayer, compute_metrics

DATA = Path(__file__).resolve().parents[3] / "bench" / "data" / "mooncake_conversation_slice.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, config: str, port: int, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvgrid.cli", "serve", "--port", str(port),
           "--num-kv-blocks", str(args.num_kv_blocks), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--max-model-len", str(args.max_input + args.max_output + 64)]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model, "--load-format", args.load_format]
    if config == "no_store":
        cmd += ["--no-kv-store"]
    else:
        d = out / f"g3-{port}"
        cmd += ["--kv-store-host-gb", str(args.g2_gb), "--kv-store-dir", str(d),
                "--kv-store-disk-gb", str(args.g3_gb)]  # fmt: skip
    env = dict(os.environ)
    env[envs.KVGRID_LOG.name] = "WARNING"
    env.pop(envs.KVGRID_API_KEYS.name, None)
    log = open(out / f"serve-{config}-{port}.log", "w")  # noqa: SIM115  (the server's)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + args.start_timeout_s
    try:
        while True:
            try:  # ready once the router sees its worker up, with an exact index
                url = f"http://127.0.0.1:{port}/debug/router"
                ws = httpx.get(url, timeout=2).json()["workers"]
                if any(w["up"] and w["freshness"] == "exact" for w in ws.values()):
                    time.sleep(2.0)  # the worker's first load report is in
                    return proc
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server ({config}) did not start: see {log.name}")
            time.sleep(1.0)
    except BaseException:  # interrupted or failed while it starts: it goes too
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> None:
    interrupt(proc, 60)


def max_input(args, url: str) -> int:
    """``--max-input``, capped to what the server's context leaves for the output (the
    model's own context may be shorter than the ``--max-model-len`` it was given): a trace's
    longer prompts are cut, not refused and counted as failures."""
    import httpx

    ctx = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0].get("max_model_len")
    return min(args.max_input, ctx - args.max_output) if ctx else args.max_input


def replay_point(args, url: str, trace: str, speed: float, seed: int) -> dict:
    cap = max_input(args, url)
    wl = load_mooncake(trace, tokens_per_block=args.tokens_per_block,
                       max_input_tokens=cap, max_output_tokens=args.max_output,
                       limit=args.limit, vocab_size=args.vocab, seed=seed)  # fmt: skip
    rep = Replayer(url, None, None, ignore_eos=True)
    results, duration = asyncio.run(rep.run(wl, speed=speed, progress=False))
    m = compute_metrics(results, duration, SLO(ttft_s=args.ttft_limit_s))
    offered = len(wl.requests) / max(wl.duration_s / speed, 1e-9)
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens or 0 for r in results)
    return {
        "speed": speed,
        "max_input_tokens": cap,
        "requests": len(results),
        "failed": sum(not r.success for r in results),
        "first_error": next((r.error for r in results if not r.success), "")[:300],
        "offered_req_s": offered,
        "completed_req_s": m["request_throughput"],
        "goodput_req_s": m["request_goodput"],
        "ttft_p50_s": (m["ttft_ms"]["p50"] or 0) / 1000,
        "ttft_p90_s": (m["ttft_ms"]["p90"] or 0) / 1000,
        "hit_rate": cached / prompt if prompt else None,
        "output_tok_s": m["output_throughput"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kvgrid.bench.gpu.serve_replay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--trace", action="append", default=[], help="NAME=PATH.jsonl (repeatable)")
    ap.add_argument("--configs", default="no_store,store")
    ap.add_argument("--speeds", default="10,20,40", help="arrival speed-ups, one point each")
    ap.add_argument("--ttft-limit-s", type=float, default=2.0)
    ap.add_argument("--limit", type=int, default=None, help="first N requests of the trace")
    ap.add_argument(
        "--tokens-per-block", type=int, default=128, help="of each 512-token hash block"
    )
    ap.add_argument("--max-input", type=int, default=16384)
    ap.add_argument("--max-output", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--num-kv-blocks", type=int, default=1100, help="G1, small enough to evict")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--g2-gb", type=float, default=24.0)
    ap.add_argument("--g3-gb", type=float, default=40.0)
    ap.add_argument("--start-timeout-s", type=float, default=600.0)
    ap.add_argument("--out", default="out/replay-store")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    traces = dict(t.split("=", 1) for t in args.trace) or {"conversation": str(DATA)}
    for name, path in traces.items():
        if not Path(path).exists():
            print(f"error: trace {name}: {path} not found", file=sys.stderr)
            return 2
    speeds = [float(s) for s in args.speeds.split(",")]
    res: dict = {"args": vars(args), "points": {}, "summary": {}}
    for trace_name, path in traces.items():
        for config in args.configs.split(","):
            port = free_port()
            proc = start_server(args, config, port, out)
            try:
                pts = []
                for i, sp in enumerate(speeds):
                    pts.append(replay_point(args, f"http://127.0.0.1:{port}", path, sp, seed=i + 1))
                    print(f"{trace_name} {config} x{sp}: {pts[-1]}", flush=True)
            finally:
                stop(proc)
            res["points"][f"{trace_name}/{config}"] = pts
            (out / "replay_store.json").write_text(json.dumps(res, indent=1))
        best = {}
        for config in args.configs.split(","):
            ok = [
                p
                for p in res["points"][f"{trace_name}/{config}"]
                if p["ttft_p90_s"] <= args.ttft_limit_s and not p["failed"]
            ]
            best[config] = max((p["goodput_req_s"] for p in ok), default=0.0)
        saturated = [
            p["speed"]
            for p in res["points"].get(f"{trace_name}/no_store", [])
            if p["ttft_p90_s"] > args.ttft_limit_s
        ]
        ratio = best.get("store", 0.0) / best["no_store"] if best.get("no_store") else None
        res["summary"][trace_name] = {"best_goodput_req_s": best, "store_vs_no_store": ratio,
                                      "speeds_saturating_no_store": saturated}  # fmt: skip
    (out / "replay_store.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "replay_store.png")
    print(f"\nTTFT limit (p90) {args.ttft_limit_s} s")
    print(
        f"{'trace':14} {'config':9} {'speed':>6} {'offered/s':>9} {'done/s':>7} {'goodput/s':>9} {'p90 TTFT':>8} {'hit':>6}"
    )
    for key, pts in res["points"].items():
        t, c = key.split("/")
        for p in pts:
            print(
                f"{t:14} {c:9} {p['speed']:6.1f} {p['offered_req_s']:9.2f} {p['completed_req_s']:7.2f} "
                f"{p['goodput_req_s']:9.2f} {p['ttft_p90_s']:8.2f} {p['hit_rate'] or 0:6.3f}"
            )
    for t, s in res["summary"].items():
        print(
            f"{t}: best goodput within the limit {s['best_goodput_req_s']}, store / no store = {s['store_vs_no_store']}"
        )
    print(f"wrote {out / 'replay_store.json'}")
    return 0


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for key, pts in res["points"].items():
        x = [p["offered_req_s"] for p in pts]
        ax[0].plot(x, [p["goodput_req_s"] for p in pts], "o-", label=key)
        ax[1].plot(x, [p["ttft_p90_s"] for p in pts], "o-", label=key)
    ax[0].set(xlabel="offered requests/s", ylabel="goodput (requests/s within the TTFT limit)")
    ax[1].axhline(res["args"]["ttft_limit_s"], color="k", ls="--")
    ax[1].set(xlabel="offered requests/s", ylabel="p90 TTFT (s)", yscale="log")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
