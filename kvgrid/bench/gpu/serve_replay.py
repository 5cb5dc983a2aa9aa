"""Server-level replay of Mooncake traces against `kvgrid serve`, without and with the context
store: goodput at a TTFT limit, at offered loads that saturate the server without the store.

    # one H200, Llama-3-8B shape, random bf16 weights (the server needs fastapi, uvicorn,
    # pyzmq... on the GPU machine: see docs/benchmarks.md for the wheels to carry)
    python -m kvgrid.bench.gpu.serve_replay --model llama3-8b --load-format dummy \\
        --trace synthetic --shard 0/16 --max-input 8128 --speeds no_store=16,20,24,28 \\
        --speeds store=20,24,28,32,36,40 --out out/replay
    # CPU smoke run (default model: SmolLM2's 49,152-token vocabulary)
    python -m kvgrid.bench.gpu.serve_replay --vocab 49152 --speeds 1 --limit 12 \\
        --tokens-per-block 128 --max-input 256 --num-kv-blocks 64 --g2-gb 1 --g3-gb 2 \\
        --out out/replay-cpu

For each trace and each configuration (``no_store``: G1 only; ``store``: the same G1 with
G2 host memory and G3 on local disk; ``g2``: G2 alone) one server is started; the trace (or
one prefix-family shard of it, ``--shard``: what one of that many servers behind a
prefix-affinity router receives) is replayed open loop at each speed-up in turn (arrival
gaps divided by it), each point with its own token seed so that no point reuses another's
prefixes. A configuration's ladder stops at its first point whose p90 TTFT misses
``--ttft-limit-s`` (heavier loads miss it too; ``--all-speeds`` runs them anyway). A point
starts from a cold history; ``--warmup F`` leaves its first F of the requests out of its
figures (they load the server as usual): a long-running server's steady state; each point
and the summary then keep the figures with every request counted beside them
(``from_cold``). Per point: request rate offered, p50/p90 TTFT, goodput (requests per
second whose TTFT met the limit), the server's hit rate and counters, and a timeline of the
worker's load, sampled every second (``Timeline``). Per configuration: the best goodput
among the points within the limit and the offered rate of the first point past it; each
store configuration's ratio to no store, and its lower bound (its best goodput over the
rate at which no store first missed the limit). Prints a table last; writes JSON, the
goodput/TTFT plot and the timeline plot under --out.
"""

# ruff: noqa: E501  (table rows are long)
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kvgrid import envs
from kvgrid.bench.mooncake import load_mooncake, resolve_trace
from kvgrid.bench.procs import interrupt
from kvgrid.bench.replay import SLO, Replayer, RequestResult, compute_metrics, span_s
from kvgrid.server.auth import ControlKey

# the servers' control key, so that the benchmark may read their workers' series
CLUSTER = ControlKey.generate()
DATA = Path(__file__).resolve().parents[3] / "bench" / "data" / "mooncake_conversation_slice.jsonl"


# the configurations a replay compares: G1 only; G1 + G2 host memory + G3 local disk; G1 + G2
CONFIGS = ("no_store", "store", "g2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(args, config: str, port: int, out: Path, disk: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvgrid.cli", "serve", "--port", str(port),
           "--num-kv-blocks", str(args.num_kv_blocks), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--max-model-len", str(args.max_input + args.max_output + 64)]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model, "--load-format", args.load_format]
    cmd += args.server_arg
    if config == "no_store":
        cmd += ["--no-kv-store"]
    else:
        cmd += ["--kv-store-host-gb", str(args.g2_gb)]
    if config == "store":
        cmd += ["--kv-store-dir", str(disk), "--kv-store-disk-gb", str(args.g3_gb)]
    elif config == "g2":
        cmd += ["--kv-store-disk-gb", "0"]  # no disk tier (a server's default has one)
    env = dict(os.environ)
    env[envs.KVGRID_LOG.name] = "WARNING"
    env.pop(envs.KVGRID_API_KEYS.name, None)
    env.pop(envs.KVGRID_CONTROL_KEY_FILE.name, None)
    env[envs.KVGRID_CONTROL_KEY.name] = CLUSTER.dumps()
    log = open(out / f"serve-{config}-{port}.log", "w")  # noqa: SIM115  (the server's)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, port: int, deadline: float) -> None:
    """Until the router sees its worker up, with an exact index."""
    import httpx

    while True:
        try:
            url = f"http://127.0.0.1:{port}/debug/router"
            ws = httpx.get(url, timeout=2).json()["workers"]
            if any(w["up"] and w["freshness"] == "exact" for w in ws.values()):
                time.sleep(2.0)  # the worker's first load report is in
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server on port {port} did not start: see its log")
        time.sleep(1.0)


def stop(proc: subprocess.Popen) -> None:
    interrupt(proc, 60)


def max_input(args, url: str) -> int:
    """``--max-input``, capped to what the server's context leaves for the output (the
    model's own context may be shorter than the ``--max-model-len`` it was given): a trace's
    longer prompts are cut, not refused and counted as failures."""
    import httpx

    ctx = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0].get("max_model_len")
    return min(args.max_input, ctx - args.max_output) if ctx else args.max_input


# what each point records of the server's own series (sums over tenants and models), so that
# a point's result says where its time and its lost hits went
SERIES = ("kvgrid_store_hits", "kvgrid_store_lost_hits", "kvgrid_store_g1_writebacks",
          "kvgrid_store_writes_dropped", "kvgrid_store_prefetch_blocks",
          "kvgrid_store_g2_backpressure_seconds", "kvgrid:request_queue_time_seconds",
          "kvgrid:num_preemptions",
          "kvgrid:time_to_first_token_seconds")  # fmt: skip
KEEP_LABELS = ("tier", "reason", "outcome")


def server_counters(url: str) -> dict[str, float]:
    """The router's and its workers' series of SERIES, as {name[label=value...]: total}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    sources = [(url, {})]
    try:
        ws = httpx.get(f"{url}/debug/router", timeout=10).json()["workers"]
        sources += [
            (w["url"], CLUSTER.router_headers(wid)) for wid, w in ws.items() if w.get("url")
        ]
    except (httpx.HTTPError, ValueError, KeyError, AttributeError):
        print(f"warning: {url}/debug/router lists no workers: their series are left out")
    out: dict[str, float] = {}
    for u, headers in sources:
        try:
            r = httpx.get(f"{u.rstrip('/')}/metrics", headers=headers, timeout=10)
            r.raise_for_status()
        except httpx.HTTPError as e:
            print(f"warning: {u}/metrics: {e}")
            continue
        for fam in text_string_to_metric_families(r.text):
            for smp in fam.samples:
                base = smp.name.removesuffix("_total").removesuffix("_sum").removesuffix("_count")
                if base not in SERIES or smp.name.endswith(("_bucket", "_created")):
                    continue
                labels = ",".join(f"{k}={smp.labels[k]}" for k in KEEP_LABELS if k in smp.labels)
                key = smp.name.removesuffix("_total") + (f"[{labels}]" if labels else "")
                out[key] = out.get(key, 0.0) + smp.value
    return out


# what the timeline of a point samples of the worker's load report, once a second
TIMELINE = ("num_running", "num_waiting", "kv_usage", "waiting_prefill_tokens",
            "mixed_prefill_tokens", "steps", "computed_prompt_tokens", "num_room_waits",
            "num_preemptions", "store_engine_s")  # fmt: skip
CUMULATIVE = ("steps", "computed_prompt_tokens", "num_room_waits", "num_preemptions",
              "store_engine_s")  # fmt: skip


class Timeline:
    """The worker's load over one point (from the router's view, ``/debug/router``), sampled
    every ``every_s``: where a server's time goes under a load it cannot keep up with (G1
    full, a growing queue, prompts waiting)."""

    def __init__(self, url: str, every_s: float = 1.0) -> None:
        self.url, self.every_s = url, every_s
        self.samples: dict[str, list] = {"t": [], **{k: [] for k in TIMELINE}}
        self.tiers: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Timeline:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=2) as client:
            while not self._stop.wait(self.every_s):
                try:
                    ws = client.get(f"{self.url}/debug/router").json()["workers"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                loads = [w["load"] for w in ws.values() if w.get("up")]
                if not loads:
                    continue
                self.samples["t"].append(round(time.monotonic() - self._t0, 2))
                for k in TIMELINE:
                    if k == "store_engine_s":  # per call kind
                        v: dict[str, float] = {}
                        for ld in loads:
                            for kind, sec in (ld.get(k) or {}).items():
                                v[kind] = round(v.get(kind, 0.0) + sec, 3)
                        self.samples[k].append(v)
                    else:
                        self.samples[k].append(sum(ld.get(k) or 0 for ld in loads))
                self.tiers = {t: v for ld in loads for t, v in ld["tier_bytes_per_s"].items()}

    def digest(self) -> dict:
        """Over the point: the mean of the gauges, and the cumulative series per second
        (steps, prompt tokens computed, room waits, preemptions, store seconds)."""
        t = self.samples["t"]
        if len(t) < 2:
            return {}
        span = t[-1] - t[0]
        out = {}
        for k in TIMELINE:
            v = self.samples[k]
            if isinstance(v[-1], dict):
                out[f"{k}_per_s"] = {
                    kind: round((sec - v[0].get(kind, 0.0)) / span, 3)
                    for kind, sec in v[-1].items()
                }
            elif k in CUMULATIVE:
                out[f"{k}_per_s"] = round((v[-1] - v[0]) / span, 3)
            else:
                out[f"mean_{k}"] = round(sum(v) / len(v), 3)
        return out


def after_warmup(
    results: list[RequestResult], fraction: float
) -> tuple[list[RequestResult], float]:
    """The results past the first ``fraction`` of the requests (in arrival order) and the
    time they span (first send to last completion): the server's steady state, the
    warm-up's requests loading it as usual but left out of the figures."""
    kept = results[int(fraction * len(results)) :]
    if not kept:
        raise ValueError(f"--warmup {fraction} leaves no request to measure")
    return kept, span_s(kept, min(r.sent_s for r in kept))


def offered(arrivals_s: list[float]) -> float:
    """Requests per second offered by these arrival times."""
    return len(arrivals_s) / max(arrivals_s[-1] - arrivals_s[0], 1e-9)


def request_figures(results: list[RequestResult], duration: float, limit_s: float) -> dict:
    """Rates, TTFT percentiles and the hit rate of these requests over ``duration``."""
    m = compute_metrics(results, duration, SLO(ttft_s=limit_s))
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens or 0 for r in results)
    return {
        "requests": len(results),
        "failed": sum(not r.success for r in results),
        "first_error": next((r.error for r in results if not r.success), "")[:300],
        "completed_req_s": m["request_throughput"],
        "goodput_req_s": m["request_goodput"],
        "ttft_p50_s": (m["ttft_ms"]["p50"] or 0) / 1000,
        "ttft_p90_s": (m["ttft_ms"]["p90"] or 0) / 1000,
        "hit_rate": cached / prompt if prompt else None,
        "output_tok_s": m["output_throughput"],
    }


def replay_point(args, url: str, trace: str, speed: float, seed: int) -> dict:
    cap = max_input(args, url)
    before = server_counters(url)
    shard, shards = args.shard
    wl = load_mooncake(trace, tokens_per_block=args.tokens_per_block,
                       max_input_tokens=cap, max_output_tokens=args.max_output,
                       limit=args.limit, shards=shards, shard=shard,
                       vocab_size=args.vocab, seed=seed)  # fmt: skip
    rep = Replayer(url, None, None, ignore_eos=True)
    with Timeline(url) as timeline:
        results, duration = asyncio.run(rep.run(wl, speed=speed, progress=False))
    warm = int(args.warmup * len(results))
    arrivals = [r.arrival_s / speed for r in wl.requests]

    def figures(rs: list[RequestResult], span: float, skip: int) -> dict:
        return {"offered_req_s": offered(arrivals[skip:]),
                **request_figures(rs, span, args.ttft_limit_s)}  # fmt: skip

    measured = figures(results, duration, 0)
    if warm:  # the same point with every request counted stays beside the steady state
        measured = {**figures(*after_warmup(results, args.warmup), warm), "from_cold": measured}
    after = server_counters(url)
    server = {k: round(v - before.get(k, 0.0), 3) for k, v in sorted(after.items())}
    return {
        "speed": speed,
        "max_input_tokens": cap,
        "warmup_requests": warm,
        **measured,
        "server": {k: v for k, v in server.items() if v},
        "tier_bytes_per_s": timeline.tiers,
        "load": timeline.digest(),
        "timeline": timeline.samples,
    }


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (shard I of N) as (I, N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants I/N, e.g. 0/16, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: I must be in 0..N-1")
    return i, n


def parse_speeds(specs: list[str], configs: list[str]) -> dict[str, list[float]]:
    """Each configuration's speed-ups, ascending: ``LIST`` sets every configuration's,
    ``CONFIG=LIST`` one's."""
    out: dict[str, list[float]] = {}
    for spec in specs:
        name, _, values = spec.rpartition("=")
        if name and name not in configs:
            raise ValueError(f"{name!r} is not one of --configs ({', '.join(configs)})")
        try:
            speeds = sorted(float(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"{spec!r}: speed-ups are numbers separated by commas") from None
        if not speeds or speeds[0] <= 0:
            raise ValueError(f"{spec!r}: speed-ups must be positive")
        for c in [name] if name else configs:
            out[c] = speeds
    missing = [c for c in configs if c not in out]
    if missing:
        raise ValueError(f"no speed-ups for {', '.join(missing)}")
    return out


def within_limit(p: dict, limit_s: float) -> bool:
    return not p["failed"] and p["ttft_p90_s"] <= limit_s


def summarize(points: dict[str, list[dict]], limit_s: float) -> dict:
    """Per configuration the best goodput within the limit and the offered rate where it was
    first missed; each store configuration's ratio to no store, and its lower bound (its
    best goodput over the rate at which no store first missed: no store's capacity lies
    below that). Points measured after a warm-up also give the same from a cold start."""
    best, miss = {}, {}
    for config, pts in points.items():
        best[config] = max(
            (p["goodput_req_s"] for p in pts if within_limit(p, limit_s)), default=0.0
        )
        miss[config] = next((p["offered_req_s"] for p in pts if not within_limit(p, limit_s)), None)
    none_best, none_miss = best.get("no_store"), miss.get("no_store")
    others = [c for c in points if c != "no_store"]
    out = {
        "best_goodput_req_s": best,
        "first_missed_at_offered_req_s": miss,
        "vs_no_store": {c: best[c] / none_best if none_best else None for c in others},
        "vs_no_store_lower_bound": {c: best[c] / none_miss if none_miss else None for c in others},
    }
    if all("from_cold" in p for pts in points.values() for p in pts):  # after a warm-up
        cold = {c: [p["from_cold"] for p in pts] for c, pts in points.items()}
        out["from_cold"] = summarize(cold, limit_s)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kvgrid.bench.gpu.serve_replay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--trace", action="append", default=[],
                    help="conversation | synthetic | NAME=PATH.jsonl (repeatable; default: "
                         "the conversation slice in bench/data)")  # fmt: skip
    ap.add_argument("--shard", type=parse_shard, default=(0, 1),
                    help="I/N: replay prefix-family shard I of N (mooncake.load_mooncake)")  # fmt: skip
    ap.add_argument("--configs", default="no_store,store",
                    help=f"some of {', '.join(CONFIGS)} (no_store: G1 only; store: G1 + G2 + "
                    "G3 on local disk; g2: G1 + G2)")  # fmt: skip
    ap.add_argument("--speeds", action="append", default=[],
                    help="arrival speed-ups, one point each: LIST for every configuration, or "
                         "CONFIG=LIST for one (repeatable; default 10,20,40)")  # fmt: skip
    ap.add_argument("--all-speeds", action="store_true",
                    help="run every speed, also past a configuration's first point over the limit")  # fmt: skip
    ap.add_argument("--ttft-limit-s", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=0.0,
                    help="share of each point's requests (the first, by arrival) replayed but "
                         "left out of its figures: the steady state of a server whose "
                         "history is warm (default 0: from a cold start)")  # fmt: skip
    ap.add_argument("--limit", type=int, default=None, help="first N requests of the trace")
    ap.add_argument("--tokens-per-block", type=int, default=512,
                    help="of each 512-token hash block (512: the trace's own lengths)")  # fmt: skip
    ap.add_argument("--max-input", type=int, default=16384)
    ap.add_argument("--max-output", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--num-kv-blocks", type=int, default=1100, help="G1, small enough to evict")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--g2-gb", type=float, default=48.0)
    ap.add_argument("--g3-gb", type=float, default=40.0)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="one more argument for every `kvgrid serve`, e.g. "
                         "--server-arg=--prompt-drain-s=0 (repeatable)")  # fmt: skip
    ap.add_argument("--disk-dir", default=None,
                    help="where G3 lives (default: a temporary folder, removed afterwards)")  # fmt: skip
    ap.add_argument("--start-timeout-s", type=float, default=600.0)
    ap.add_argument("--out", default="out/replay-store")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    traces = {}
    for t in args.trace or [f"conversation={DATA}"]:
        name, _, path = t.partition("=")
        try:
            traces[name] = str(resolve_trace(path or name))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: trace {name}: {e}", file=sys.stderr)
            return 2
    if not 0 <= args.warmup < 1:
        print(f"error: --warmup {args.warmup}: a share in [0, 1)", file=sys.stderr)
        return 2
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"error: --configs: {', '.join(unknown)} not among {', '.join(CONFIGS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        speeds = parse_speeds(args.speeds or ["10,20,40"], configs)
    except ValueError as e:
        print(f"error: --speeds: {e}", file=sys.stderr)
        return 2
    res: dict = {
        "args": {**vars(args), "shard": "{}/{}".format(*args.shard)},
        "points": {},
        "summary": {},
    }
    for trace_name, path in traces.items():
        # every configuration's server starts at once (they share the GPU; only one replays
        # at a time, the others idle)
        servers: dict[str, tuple[subprocess.Popen, int, Path]] = {}
        try:
            for config in configs:
                port = free_port()
                disk = Path(args.disk_dir or tempfile.mkdtemp(prefix="kvgrid-replay-"))
                servers[config] = (launch_server(args, config, port, out, disk / f"g3-{port}"),
                                   port, disk)  # fmt: skip
            deadline = time.monotonic() + args.start_timeout_s
            for proc, port, _ in servers.values():
                wait_ready(proc, port, deadline)
            for config in configs:
                proc, port, _ = servers[config]
                pts: list[dict] = []
                res["points"][f"{trace_name}/{config}"] = pts
                for i, sp in enumerate(speeds[config]):
                    pts.append(replay_point(args, f"http://127.0.0.1:{port}", path, sp, seed=i + 1))
                    shown = {k: v for k, v in pts[-1].items() if k != "timeline"}
                    print(f"{trace_name} {config} x{sp}: {shown}", flush=True)
                    (out / "replay_store.json").write_text(json.dumps(res, indent=1))
                    if not args.all_speeds and not within_limit(pts[-1], args.ttft_limit_s):
                        break
            res["summary"][trace_name] = summarize(
                {c: res["points"][f"{trace_name}/{c}"] for c in configs}, args.ttft_limit_s
            )
            (out / "replay_store.json").write_text(json.dumps(res, indent=1))
        finally:  # each server goes, with its disk tier (a store's shutdown writes G2 down)
            for proc, port, disk in servers.values():
                stop(proc)
                shutil.rmtree(disk / f"g3-{port}" if args.disk_dir else disk, ignore_errors=True)
    plot(res, out / "replay_store.png")
    plot_timeline(res, out / "replay_timeline.png")
    print(f"\nTTFT limit (p90) {args.ttft_limit_s} s, shard {res['args']['shard']}")
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
            f"{t}: best goodput within the limit {s['best_goodput_req_s']}, first missed at "
            f"{s['first_missed_at_offered_req_s']} req/s offered; over no store: "
            f"{s['vs_no_store']} (lower bounds {s['vs_no_store_lower_bound']})"
        )
        if "from_cold" in s:
            print(f"{t}, every request counted (from a cold start): over no store "
                  f"{s['from_cold']['vs_no_store']}")  # fmt: skip
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


def plot_timeline(res: dict, path: Path) -> None:
    """Per point, the worker's G1 use, queue and steps a second over the replay: where a
    configuration that misses the limit loses its time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = (("kv_usage", "G1 blocks in use (share)"), ("num_waiting", "requests queued"),
            ("steps", "engine steps / s"),
            ("store_engine_s", "engine thread in the store (s / s)"))  # fmt: skip
    fig, ax = plt.subplots(len(rows), 1, figsize=(10, 10), sharex=True)
    for key, pts in res["points"].items():
        for p in pts:
            tl = p.get("timeline") or {}
            t = tl.get("t") or []
            if len(t) < 2:
                continue
            label = f"{key.split('/')[1]} x{p['speed']:g}"
            for a, (k, name) in zip(ax, rows):
                v = [sum(x.values()) if isinstance(x, dict) else x for x in tl[k]]
                if k in CUMULATIVE:  # per second between samples
                    v = [(b - a_) / max(t2 - t1, 1e-9) for a_, b, t1, t2 in zip(v, v[1:], t, t[1:])]
                    a.plot(t[1:], v, label=label)
                else:
                    a.plot(t, v, label=label)
                a.set(ylabel=name)
    ax[-1].set(xlabel="seconds into the point")
    ax[0].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
