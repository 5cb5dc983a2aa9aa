"""The simulator experiments of docs/benchmarks.md, one subcommand each.

    kvgrid bench experiments policy   [--out DIR]   # policy table, Mooncake traces
    kvgrid bench experiments balance  [--out DIR]   # shared system prompt / no reuse
    kvgrid bench experiments planner  [--out DIR]   # SLA planner vs static pools
    kvgrid bench experiments scale    [--out DIR]   # 1,000 workers, 1,000,000 requests

Each prints a table and writes JSON (and PNGs where useful) under DIR ($OUT or ./out/sim).
Simulated workers are Llama-3-8B on H100 from the default calibration (reference figures,
not a measured GPU run) unless --calibration names another file.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvgrid.bench.mooncake import load_mooncake
from kvgrid.bench.sim.fleet import SimConfig, quiet_gc, simulate
from kvgrid.bench.workloads import bursty_sinusoidal, constant_rate, no_reuse, shared_system_prompt
from kvgrid.planner.calibration import load_calibration
from kvgrid.planner.planner import Planner, PlannerConfig
from kvgrid.router.policies import DEFAULT_POLICY
from kvgrid.slo import DEFAULT_TTFT_TARGET_S

POLICIES = ("round_robin", "least_load", "prefix_affinity", "dynamo_cost", "ttft")


def _out_dir(arg: str | None) -> Path:
    d = Path(arg or os.environ.get("OUT") or "out/sim")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _row(res: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "hit_rate",
        "ttft_p50_s",
        "ttft_p99_s",
        "tpot_p99_s",
        "goodput_fraction",
        "goodput_rps",
        "load_skew_max_over_mean",
        "load_max_over_min",
        "busy_skew_max_over_mean",
        "wall_s",
    )
    return {k: res.get(k) for k in keys}


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


# ---- policy table ------------------------------------------------------------------------

# Load per fleet size: Mooncake copies overlaid (independent user populations) and a time
# speed-up, chosen so the fleet runs busy (TTFT queues form) without being overloaded.
POLICY_SETUPS = {
    ("conversation", 16): {"repeat": 1, "speed": 4.0},
    ("synthetic", 16): {"repeat": 1, "speed": 4.0},
    ("conversation", 256): {"repeat": 4, "speed": 16.0},
    ("synthetic", 256): {"repeat": 4, "speed": 16.0},
}


def run_policy(args: argparse.Namespace) -> int:
    out = _out_dir(args.out)
    calib = load_calibration(args.calibration)
    rows = []
    for (trace, n), setup in POLICY_SETUPS.items():
        if args.workers and n not in args.workers:
            continue
        if args.trace and trace not in args.trace:
            continue
        w = load_mooncake(trace, **setup)
        theo = w.theoretical_hit_rate()["token_weighted"]
        for pol in args.policies or POLICIES:
            t0 = time.perf_counter()
            res = simulate(
                w,
                SimConfig(
                    num_workers=n,
                    policy=pol,
                    calibration=calib,
                    slo_ttft_s=args.slo_ttft,
                    slo_tpot_s=args.slo_tpot,
                ),
            )
            res.pop("fleet")
            row = {"trace": trace, "workers": n, "policy": pol, "theoretical_hit": theo}
            row.update(_row(res))
            row["requests"] = res["requests"]
            rows.append(row)
            print(
                f"{trace:12s} {n:4d} {pol:16s} hit {row['hit_rate']:.3f} "
                f"ttft p50 {row['ttft_p50_s']:.3f} p99 {row['ttft_p99_s']:.3f} "
                f"good {row['goodput_fraction']:.3f} skew {row['load_skew_max_over_mean']:.2f}"
                f"  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    cols = [
        "trace",
        "workers",
        "policy",
        "hit_rate",
        "ttft_p50_s",
        "ttft_p99_s",
        "goodput_fraction",
        "load_skew_max_over_mean",
    ]
    print(_table(rows, cols))
    meta = {
        "setups": {f"{t}/{n}": s for (t, n), s in POLICY_SETUPS.items()},
        "slo_ttft_s": args.slo_ttft,
        "slo_tpot_s": args.slo_tpot,
        "calibration": calib.meta,
    }
    (out / "policy_table.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


# ---- balance: shared system prompt and no reuse -------------------------------------------


def run_balance(args: argparse.Namespace) -> int:
    out = _out_dir(args.out)
    calib = load_calibration(args.calibration)
    n = args.workers[0] if args.workers else 16
    loads = {
        "shared_system_prompt": shared_system_prompt(
            num_requests=20_000,
            system_tokens=4096,
            user_tokens=512,
            output_tokens=256,
            rate=60.0,
            num_users=2000,
            block_tokens=64,
            seed=0,
        ),
        "no_reuse": no_reuse(
            num_requests=20_000,
            input_tokens=4096,
            output_tokens=256,
            rate=40.0,
            block_tokens=64,
            seed=0,
        ),
    }
    rows = []
    for name, w in loads.items():
        for pol in args.policies or POLICIES:
            res = simulate(
                w,
                SimConfig(
                    num_workers=n,
                    policy=pol,
                    calibration=calib,
                    slo_ttft_s=args.slo_ttft,
                    slo_tpot_s=args.slo_tpot,
                ),
            )
            res.pop("fleet")
            row = {"workload": name, "workers": n, "policy": pol}
            row.update(_row(res))
            rows.append(row)
            print(
                f"{name:22s} {pol:16s} hit {row['hit_rate']:.3f} ttft p99 "
                f"{row['ttft_p99_s']:.3f} good {row['goodput_fraction']:.3f} max/mean "
                f"{row['load_skew_max_over_mean']:.3f} max/min {row['load_max_over_min']:.3f}",
                flush=True,
            )
    cols = [
        "workload",
        "policy",
        "hit_rate",
        "ttft_p50_s",
        "ttft_p99_s",
        "goodput_fraction",
        "load_skew_max_over_mean",
        "load_max_over_min",
    ]
    print(_table(rows, cols))
    (out / "balance_table.json").write_text(json.dumps({"rows": rows}, indent=1))
    return 0


# ---- planner ---------------------------------------------------------------------------


def _within(fleet, w, target: float, after_s: float) -> float:
    arr = np.array([r.arrival_s for r in w.requests]) - w.requests[0].arrival_s
    m = arr >= after_s
    t = fleet.ttft[m]
    return float(np.mean(t <= target))


def run_planner(args: argparse.Namespace) -> int:
    out = _out_dir(args.out)
    calib = load_calibration(args.calibration)
    target = DEFAULT_TTFT_TARGET_S
    period = 1200.0
    w = bursty_sinusoidal(
        duration_s=3 * period,
        min_rate=1.0,
        max_rate=24.0,
        period_s=period,
        input_tokens=8192,
        output_tokens=1024,
        block_tokens=512,
        seed=0,
    )
    after = period / 2  # the first ramp ends at the first peak
    rows = []
    pl = Planner(PlannerConfig(ttft_target_s=target, interval_s=10.0), calib)
    res = simulate(
        w,
        SimConfig(
            num_workers=2,
            policy=DEFAULT_POLICY,
            calibration=calib,
            planner=pl,
            slo_ttft_s=target,
            slo_tpot_s=1e9,
            planner_interval_s=10.0,
        ),
    )
    fleet = res.pop("fleet")
    within = _within(fleet, w, target, after)
    rows.append(
        {
            "setup": "planner",
            "within_target_after_ramp": within,
            "gpu_hours": res["gpu_hours"],
            "completed": res["completed"],
            "requests": res["requests"],
            "scale_actions": res["scale_actions"],
            "ttft_p99_s": res["ttft_p99_s"],
            "tpot_p99_s": res["tpot_p99_s"],
            "peak_replicas": max(sum(s.values()) for _, s in fleet.pool_sizes),
        }
    )
    print(f"planner: {rows[-1]}", flush=True)
    sizes = fleet.pool_sizes
    # the smallest static pool that meets the same goal (searched upward), and a few around it
    static_ok = None
    for n in range(args.static_from, args.static_to + 1):
        r = simulate(
            w,
            SimConfig(
                num_workers=n,
                policy=DEFAULT_POLICY,
                calibration=calib,
                slo_ttft_s=target,
                slo_tpot_s=1e9,
            ),
        )
        f = r.pop("fleet")
        wi = _within(f, w, target, after)
        rows.append(
            {
                "setup": f"static {n}",
                "within_target_after_ramp": wi,
                "gpu_hours": r["gpu_hours"],
                "completed": r["completed"],
                "requests": r["requests"],
                "scale_actions": 0,
                "ttft_p99_s": r["ttft_p99_s"],
                "tpot_p99_s": r["tpot_p99_s"],
                "peak_replicas": n,
            }
        )
        print(f"static {n}: within {wi:.4f} gpu_h {r['gpu_hours']:.2f}", flush=True)
        if wi >= 0.95 and static_ok is None:
            static_ok = n
            break
    # constant load: after settling, no scaling actions
    wc = constant_rate(
        duration_s=3600, rate=12.0, input_tokens=8192, output_tokens=1024, block_tokens=512, seed=1
    )
    plc = Planner(PlannerConfig(ttft_target_s=target, interval_s=10.0), calib)
    rc = simulate(
        wc,
        SimConfig(
            num_workers=2,
            policy=DEFAULT_POLICY,
            calibration=calib,
            planner=plc,
            slo_ttft_s=target,
            slo_tpot_s=1e9,
        ),
    )
    fc = rc.pop("fleet")
    settle = 900.0
    late = [a for a in fc.actions if a["t"] >= settle]
    const = {
        "rate": 12.0,
        "actions_total": len(fc.actions),
        "actions_after_settle": len(late),
        "settle_s": settle,
        "completed": rc["completed"],
        "requests": rc["requests"],
        "final_replicas": sum(fc.pool_sizes[-1][1].values()),
    }
    print(f"constant load: {const}", flush=True)
    cols = [
        "setup",
        "within_target_after_ramp",
        "gpu_hours",
        "peak_replicas",
        "completed",
        "requests",
        "scale_actions",
        "ttft_p99_s",
    ]
    print(_table(rows, cols))
    _plot_planner(w, fleet, sizes, out / "planner.png", target)
    (out / "planner.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "constant": const,
                "static_needed": static_ok,
                "actions": fleet.actions[:500],
            },
            indent=1,
        )
    )
    return 0


def _plot_planner(w, fleet, sizes, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = np.array([r.arrival_s for r in w.requests])
    fig, ax = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    bins = np.arange(0, arr.max() + 30, 30)
    h, _ = np.histogram(arr, bins)
    ax[0].plot(bins[:-1], h / 30)
    ax[0].set_ylabel("arrivals (req/s)")
    ts = [t for t, _ in sizes]
    ax[1].step(ts, [sum(s.values()) for _, s in sizes], where="post")
    ax[1].set_ylabel("replicas")
    ax[2].plot(arr, fleet.ttft, ".", ms=1)
    ax[2].axhline(target, color="r", lw=0.8)
    ax[2].set_yscale("log")
    ax[2].set_ylabel("TTFT (s)")
    ax[2].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- scale -------------------------------------------------------------------------------


def run_scale(args: argparse.Namespace) -> int:
    out = _out_dir(args.out)
    calib = load_calibration(args.calibration)
    t0 = time.perf_counter()
    with quiet_gc():  # loading builds a million long-lived requests: no full collections
        res = _scale_run(args, calib, t0)
    print(json.dumps({k: v for k, v in res.items() if k != "config"}, indent=1))
    (out / "scale.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


def _scale_run(args: argparse.Namespace, calib, t0: float) -> dict[str, Any]:
    # 84 overlaid copies of the conversation trace (independent user populations) = 1.01M
    # requests, at twice the trace's speed: ~570 req/s on 1,000 workers
    w = load_mooncake("conversation", repeat=args.repeat, speed=2.0)
    if args.limit:
        w.requests = w.requests[: args.limit]
    load_s = time.perf_counter() - t0
    res = simulate(
        w,
        SimConfig(
            num_workers=args.workers[0] if args.workers else 1000,
            policy=DEFAULT_POLICY,
            calibration=calib,
            candidates=args.candidates,
        ),
    )
    res.pop("fleet")
    res["load_s"] = load_s
    res["total_wall_s"] = time.perf_counter() - t0
    return res


EXPERIMENTS = {
    "policy": run_policy,
    "balance": run_balance,
    "planner": run_planner,
    "scale": run_scale,
}


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``kvgrid bench experiments``."""
    p.add_argument("experiment", choices=list(EXPERIMENTS))
    p.add_argument("--out", default=None)
    p.add_argument("--calibration", default=None)
    p.add_argument("--workers", type=int, nargs="*", default=None)
    p.add_argument("--trace", nargs="*", default=None)
    p.add_argument("--policies", nargs="*", default=None)
    p.add_argument("--slo-ttft", type=float, default=2.0)
    p.add_argument("--slo-tpot", type=float, default=0.1)
    p.add_argument("--repeat", type=int, default=84)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--static-from", type=int, default=14)
    p.add_argument("--static-to", type=int, default=32)


def run(args: argparse.Namespace) -> int:
    """``kvgrid bench experiments NAME``."""
    return EXPERIMENTS[args.experiment](args)
