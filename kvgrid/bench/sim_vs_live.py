"""Does the fleet simulator reproduce a real run? Calibrate, replay live, simulate, compare.

    kvgrid bench sim-vs-live calibrate --out out/sim_vs_live/calibration.json
    kvgrid bench sim-vs-live run --out out/sim_vs_live       # all four steps

1. ``calibrate``: measures this machine's engine (the default model unless --model) with
   the torch threads `kvgrid serve --workers N` gives a worker (cores / N). ``--engines N``
   runs N engine processes at once, all measuring, so every step is timed while the others
   compute too: the worst case of the shared cores, where a live run has its workers busy
   at once only part of the time (docs/benchmarks.md compares both). Each process times whole
   ``LLMEngine.step()`` calls of prefill-only steps (n new tokens after ctx cached ones) and
   decode-only steps (batch B, KV K); the samples of all processes are fitted with
   non-negative least squares to kvgrid.planner.calibration's model and written in its
   JSON format (the one kvgrid.bench.gpu.engine writes for GPUs).
2. ``kvgrid serve --workers N`` on a free port, then ``kvgrid bench replay`` of a small
   seeded workload (open loop at its own times).
3. ``kvgrid sim`` of the same workload: N workers, the same policy, that calibration.
4. TTFT p50/p90/mean and request/output-token throughput of both, and their relative
   differences (the target: within 15%), printed and saved to DIR/compare.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvgrid import envs
from kvgrid.bench.procs import interrupt
from kvgrid.router.policies import DEFAULT_POLICY

DEFAULT_WORKLOAD = (
    "chat:num_sessions=12,turns=3,system_tokens=128,user_tokens=96,output_tokens=24,"
    "session_rate=0.5,think_time_s=6,seed=0"
)
KV_CACHE_GB = 0.3
MAX_MODEL_LEN = 2048
TARGET = 0.15
MEASURE = "_measure"  # the subcommand of one calibration process


# ---- 1. calibration ----------------------------------------------------------------------


def _measure(model: str | None, threads: int, kv_gb: float, start_at: float) -> dict[str, Any]:
    """One engine's step-time samples (run in its own process, next to the others)."""
    import torch

    torch.set_num_threads(threads)
    from kvgrid.engine.llm_engine import LLMEngine
    from kvgrid.engine.sampling_params import SamplingParams
    from kvgrid.models.default import ensure_default_model

    eng = LLMEngine(
        model=model or str(ensure_default_model(progress=False)),
        kv_cache_memory_gb=kv_gb,
        max_model_len=MAX_MODEL_LEN,
    )
    bs = eng.config.block_size
    rng = random.Random(os.getpid())
    vocab = min(eng.model_config.vocab_size, 32000)

    def toks(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    def timed_step() -> float:
        t0 = time.perf_counter()
        eng.step()
        return time.perf_counter() - t0

    def run_out() -> None:
        while eng.has_unfinished_requests():
            eng.step()

    # everyone starts together, so that every sample is taken with the other engines busy
    time.sleep(max(0.0, start_at - time.time()))
    eng.add_request("warm", toks(128), SamplingParams(max_tokens=4, ignore_eos=True))
    run_out()
    prefill, decode = [], []
    k = 0
    for _rep in range(2):
        for ctx in (0, 4 * bs, 8 * bs):
            for n in (32, 96, 192, 320, 512, 768):
                k += 1
                head = toks(ctx)
                if ctx:  # cache the context first (full blocks), then prefill n after it
                    eng.add_request(f"c{k}", head, SamplingParams(max_tokens=1))
                    run_out()
                eng.add_request(f"p{k}", head + toks(n), SamplingParams(max_tokens=1))
                prefill.append((n, ctx, timed_step()))
                run_out()
    for batch in (1, 2, 4, 8, 12):
        for length in (128, 448):
            k += 1
            for i in range(batch):
                eng.add_request(
                    f"d{k}-{i}", toks(length), SamplingParams(max_tokens=14, ignore_eos=True)
                )
            # prefill steps first (the step budget may take several), then decode-only ones
            while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.seqs.values()):
                eng.step()
            gen = 1
            while eng.has_unfinished_requests():
                kv = batch * (length + gen)
                decode.append((batch, kv, timed_step()))
                gen += 1
    return {
        "prefill": prefill,
        "decode": decode,
        "block_size": bs,
        "kv_capacity_tokens": eng.runner.num_blocks * bs,
        "max_num_batched_tokens": eng.config.max_num_batched_tokens,
        "max_num_seqs": eng.config.max_num_seqs,
        "kv_bytes_per_token": eng.model_config.kv_bytes_per_token(
            4 if str(eng.runner.dtype) == "torch.float32" else 2
        ),
        "model": eng.spec.name,
        "dtype": str(eng.runner.dtype).removeprefix("torch."),
    }


def nnls(rows: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares, exact for the few coefficients of a step-time model.

    The optimum is the ordinary least-squares fit on some subset of the columns with every
    coefficient >= 0 (the others held at 0): try every subset, keep the best feasible fit.
    """
    a, b = np.asarray(rows, float), np.asarray(y, float)
    n = a.shape[1]
    if n > 12:
        raise ValueError(f"nnls over every subset is for few coefficients, not {n}")
    best, best_err = np.zeros(n), float(b @ b)
    for cols in itertools.chain.from_iterable(
        itertools.combinations(range(n), k) for k in range(1, n + 1)
    ):
        sub = list(cols)
        coef = np.linalg.lstsq(a[:, sub], b, rcond=None)[0]
        if (coef < 0).any():
            continue
        err = float(np.sum((a[:, sub] @ coef - b) ** 2))
        if err < best_err:
            best, best_err = np.zeros(n), err
            best[sub] = coef
    return [float(c) for c in best]


def fit(samples: list[dict[str, Any]], engines: int, threads: int, startup_s: float) -> dict:
    """kvgrid.planner.calibration JSON from the processes' samples."""
    s0 = samples[0]
    pre = [p for s in samples for p in s["prefill"]]
    dec = [d for s in samples for d in s["decode"]]
    p_rows = [[1.0, n, n * (ctx + n / 2)] for n, ctx, _ in pre]
    p_y = [t for *_, t in pre]
    d_rows = [[1.0, b, kv] for b, kv, _ in dec]
    d_y = [t for *_, t in dec]
    p = nnls(p_rows, p_y)
    d = nnls(d_rows, d_y)

    def err(rows, coef, y) -> float:
        pred = np.asarray(rows) @ np.asarray(coef)
        return float(np.median(np.abs(pred - np.asarray(y)) / np.asarray(y)))

    return {
        "meta": {
            "model": s0["model"],
            "gpu": f"CPU ({os.cpu_count()} cores), {engines} engines at once x {threads} threads",
            "dtype": s0["dtype"],
            "measured": True,
            "source": (
                f"kvgrid bench sim-vs-live calibrate: {len(pre)} prefill-only and {len(dec)} "
                f"decode-only LLMEngine.step() times from {engines} engine processes running "
                "at once (as `kvgrid serve` runs them)"
            ),
            "fit_median_rel_err": {"prefill": err(p_rows, p, p_y), "decode": err(d_rows, d, d_y)},
        },
        "prefill": {"step_fixed_s": p[0], "per_token_s": p[1], "attn_s": p[2]},
        "decode": {"fixed_s": d[0], "per_seq_s": d[1], "per_kv_token_s": d[2]},
        "kv_bytes_per_token": s0["kv_bytes_per_token"],
        "kv_capacity_tokens": s0["kv_capacity_tokens"],
        "max_num_batched_tokens": s0["max_num_batched_tokens"],
        "max_num_seqs": s0["max_num_seqs"],
        "tiers": {"G2": {"bytes_per_s": 5e9}, "G3": {"bytes_per_s": 0.5e9}},
        "power": {"idle_w": 10.0, "busy_w": 30.0},
        "startup_s": startup_s,
    }


def calibrate(
    out: Path, engines: int = 1, threads: int | None = None, model: str | None = None
) -> dict:
    """Measure, fit and write the calibration JSON to ``out`` (samples next to it)."""
    threads = threads or max(1, (os.cpu_count() or 1) // 2)
    start_at = time.time() + 15  # after every process has loaded its engine
    argv = [sys.executable, "-m", "kvgrid.cli", "bench", "sim-vs-live", MEASURE]
    argv += ["--threads", str(threads), "--start-at", str(start_at)]
    argv += ["--model", model] if model else []
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE) for _ in range(engines)]
    samples = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"calibration process failed ({p.returncode})")
        samples.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    calib = fit(samples, engines, threads, startup_s=15.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(calib, indent=1))
    (out.with_suffix(".samples.json")).write_text(json.dumps(samples))
    return calib


# ---- 2. live -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_replay(workload: str, workers: int, policy: str, out: Path) -> dict:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, envs.KVGRID_LOG.name: "WARNING"}
    env.pop(envs.KVGRID_API_KEYS.name, None)
    cmd = [sys.executable, "-m", "kvgrid.cli", "serve", "--workers", str(workers),
           "--port", str(port), "--policy", policy, "--max-model-len", str(MAX_MODEL_LEN),
           "--kv-cache-memory-gb", str(KV_CACHE_GB)]  # fmt: skip
    log = open(out / "serve.log", "w")  # noqa: SIM115  (closed below)
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                ws = httpx.get(f"{url}/debug/router", timeout=2).json()["workers"]
                if sum(w["up"] and w["freshness"] == "exact" for w in ws.values()) >= workers:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"server did not start; see {out / 'serve.log'}")
            time.sleep(0.5)
        time.sleep(2.0)  # first load reports in, engines idle
        rc = subprocess.run(
            [sys.executable, "-m", "kvgrid.cli", "bench", "replay", "--url", url,
             "--workload", workload, "--speed", "1", "--out", str(out / "live.json"),
             "--no-progress"],
            env=env,
        ).returncode  # fmt: skip
        if rc not in (0, 1):
            raise RuntimeError(f"replay failed ({rc})")
    finally:
        interrupt(server, 30)
        log.close()
    return json.loads((out / "live.json").read_text())


# ---- 3. simulated ------------------------------------------------------------------------


def simulated(workload: str, workers: int, policy: str, calib_path: Path, out: Path) -> dict:
    from kvgrid.bench.sim.fleet import SimConfig, simulate
    from kvgrid.bench.workloads import load_workload
    from kvgrid.planner.calibration import load_calibration

    w = load_workload(workload)
    res = simulate(
        w, SimConfig(num_workers=workers, policy=policy, calibration=load_calibration(calib_path))
    )
    fleet = res.pop("fleet")
    t = fleet.ttft[~np.isnan(fleet.ttft)]
    res["ttft_mean_s"] = float(t.mean())
    res["request_throughput"] = res["completed"] / max(res["sim_duration_s"], 1e-9)
    (out / "sim.json").write_text(json.dumps(res, indent=1, default=str))
    return res


# ---- 4. compare --------------------------------------------------------------------------


def compare(live: dict, sim: dict) -> dict:
    m = live["metrics"]
    rows = {
        "ttft_p50_s": (m["ttft_ms"]["p50"] / 1000, sim["ttft_p50_s"]),
        "ttft_p90_s": (m["ttft_ms"]["p90"] / 1000, sim["ttft_p90_s"]),
        "ttft_mean_s": (m["ttft_ms"]["mean"] / 1000, sim["ttft_mean_s"]),
        "request_throughput": (m["request_throughput"], sim["request_throughput"]),
        "output_throughput": (m["output_throughput"], sim["output_tokens_per_s"]),
        "hit_rate": (m["measured_hit_rate"], sim["hit_rate"]),
    }
    out = {}
    for k, (lv, sv) in rows.items():
        rel = (sv - lv) / lv if lv else None
        out[k] = {"live": lv, "sim": sv, "rel_diff": rel}
    gated = ("ttft_p50_s", "ttft_p90_s", "ttft_mean_s", "request_throughput", "output_throughput")
    out["within_15pct"] = {
        k: out[k]["rel_diff"] is not None and abs(out[k]["rel_diff"]) <= TARGET for k in gated
    }
    out["live_failed"] = m["failed"]
    return out


def _print(cmp: dict) -> None:
    print(f"{'metric':22s} {'live':>10s} {'sim':>10s} {'diff':>8s}")
    for k, v in cmp.items():
        if isinstance(v, dict) and "live" in v:
            d = "-" if v["rel_diff"] is None else f"{100 * v['rel_diff']:+.1f}%"
            print(f"{k:22s} {v['live']:10.3f} {v['sim']:10.3f} {d:>8s}")
    ok = all(cmp["within_15pct"].values())
    print(f"within 15%: {'all' if ok else cmp['within_15pct']}")


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``kvgrid bench sim-vs-live``."""
    sub = p.add_subparsers(dest="step", required=True, metavar="{calibrate,run}")
    c = sub.add_parser("calibrate", help="measure this machine's engine, write the calibration")
    c.add_argument("--out", default="out/sim_vs_live/calibration.json")
    c.add_argument("--engines", type=int, default=1, help="engine processes measuring at once")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--model", default=None)
    r = sub.add_parser("run", help="calibrate, replay live, simulate, compare")
    r.add_argument("--out", default="out/sim_vs_live")
    r.add_argument("--calibration", default=None, help="reuse one (default: calibrate now)")
    r.add_argument("--calibrate-engines", type=int, default=1)
    r.add_argument("--workload", default=DEFAULT_WORKLOAD)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--policy", default=DEFAULT_POLICY)
    m = sub.add_parser(MEASURE)  # one calibration process (started by calibrate)
    m.add_argument("--threads", type=int, required=True)
    m.add_argument("--start-at", type=float, required=True)
    m.add_argument("--model", default=None)


def _preflight(args: argparse.Namespace) -> None:
    """What the later steps need, checked before minutes of calibration: the workload, the
    calibration given, the policy, the output folder, the model, the plotting library."""
    import matplotlib  # noqa: F401  (the live replay's plots)

    from kvgrid.bench.workloads import load_workload
    from kvgrid.planner.calibration import load_calibration
    from kvgrid.router.policies import make_policy

    load_workload(args.workload)
    if args.calibration:
        load_calibration(args.calibration)
    make_policy(args.policy)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not args.calibration:
        from kvgrid.models.default import ensure_default_model

        ensure_default_model()


def run(args: argparse.Namespace) -> int:
    """``kvgrid bench sim-vs-live {calibrate,run}``."""
    if args.step == MEASURE:
        print(json.dumps(_measure(args.model, args.threads, KV_CACHE_GB, args.start_at)))
        return 0
    if args.step == "calibrate":
        cal = calibrate(Path(args.out), args.engines, args.threads, args.model)
        print(json.dumps(cal, indent=1))
        return 0
    try:
        _preflight(args)
    except (ImportError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    calib_path = Path(args.calibration) if args.calibration else out / "calibration.json"
    if not args.calibration:
        print("calibrating ...", flush=True)
        threads = max(1, (os.cpu_count() or 1) // args.workers)  # as serve gives a worker
        calibrate(calib_path, args.calibrate_engines, threads)
    print("live replay ...", flush=True)
    live = live_replay(args.workload, args.workers, args.policy, out)
    print("simulating ...", flush=True)
    sim = simulated(args.workload, args.workers, args.policy, calib_path, out)
    cmp = compare(live, sim)
    cmp["setup"] = {
        "workload": args.workload,
        "workers": args.workers,
        "policy": args.policy,
        "calibration": str(calib_path),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "compare.json").write_text(json.dumps(cmp, indent=1))
    _print(cmp)
    return 0
