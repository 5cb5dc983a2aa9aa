"""`kvgrid bench ...` (workload statistics, live replay) and `kvgrid sim` (fleet simulator)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvgrid.router.policies import DEFAULT_POLICY
from kvgrid.slo import DEFAULT_ITL_TARGET_S, DEFAULT_TTFT_TARGET_S

WORKLOAD_HELP = (
    "mooncake:conversation | mooncake:synthetic | mooncake:PATH.jsonl, options after commas "
    "(tokens_per_block=64,max_input_tokens=1536,limit=200,repeat=2,speed=2); or a generator: "
    "chat, agent, system_prompt, docqa, sinusoidal, constant, no_reuse with key=value options"
)


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="workloads and replay against a live server")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    bench.set_defaults(func=lambda a: (bench.print_help(), 2)[1])

    wl = bsub.add_parser("workload", help="statistics and theoretical hit rate of a workload")
    wl.add_argument("spec", help=WORKLOAD_HELP)
    wl.add_argument("--block-size", type=int, default=None, help="engine block size")
    wl.set_defaults(func=_cmd_workload)

    rp = bsub.add_parser("replay", help="replay a workload against an OpenAI-compatible server")
    rp.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    rp.add_argument("--workload", required=True, help=WORKLOAD_HELP)
    mode = rp.add_mutually_exclusive_group()
    mode.add_argument("--speed", type=float, default=None, help="open loop, time speed-up")
    mode.add_argument("--concurrency", type=int, default=None, help="closed loop")
    rp.add_argument("--model", default=None, help="model name (default: the server's first)")
    rp.add_argument("--api-key", default=None)
    rp.add_argument("--limit", type=int, default=None, help="first N requests only")
    rp.add_argument("--slo-ttft-ms", type=float, default=None)
    rp.add_argument("--slo-tpot-ms", type=float, default=None)
    rp.add_argument("--slo-e2el-ms", type=float, default=None)
    rp.add_argument("--block-size", type=int, default=64, help="server's KV block size")
    rp.add_argument("--no-ignore-eos", action="store_true")
    rp.add_argument("--out", default=None, help="JSON file (plots next to it)")
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=_cmd_replay)

    ru = bsub.add_parser(
        "reuse",
        help="what the context store gives on this hardware: a saturating multi-turn agent "
        "workload under no store, G2, G3, G4 and an unlimited-G1 ceiling",
    )
    from kvgrid.bench.reuse_report import add_args as _reuse_args

    _reuse_args(ru)
    ru.set_defaults(func=_cmd_reuse)

    rb = bsub.add_parser("router", help="the router alone: decision latency, index update rate")
    from kvgrid.bench.router_bench import add_args as _router_args

    _router_args(rb)
    rb.set_defaults(func=_cmd_router)

    from kvgrid.bench.gpu import add_cli as _gpu_cli

    _gpu_cli(bsub)

    sim = sub.add_parser("sim", help="discrete-event fleet simulator (the real router)")
    sim.add_argument("--workload", required=True, help=WORKLOAD_HELP)
    sim.add_argument("--workers", type=int, default=16)
    sim.add_argument("--policy", default=DEFAULT_POLICY)
    sim.add_argument("--calibration", default=None, help="engine calibration JSON")
    sim.add_argument("--disagg", action="store_true", help="separate prefill/decode pools")
    sim.add_argument("--prefill-workers", type=int, default=0)
    sim.add_argument("--link-gbps", type=float, default=400.0, help="prefill->decode link")
    sim.add_argument("--candidates", type=int, default=None, help="preselect K per decision")
    sim.add_argument("--g2-tokens", type=int, default=0, help="host-memory tier per worker")
    sim.add_argument(
        "--site",
        action="append",
        default=[],
        help="NAME:RTT_MS:COST_PER_GPU_HOUR:SHARE (repeatable)",
    )
    sim.add_argument("--slo-ttft", type=float, default=2.0)
    sim.add_argument("--slo-tpot", type=float, default=0.1)
    sim.add_argument("--planner", action="store_true", help="scale with the SLA planner")
    sim.add_argument("--ttft-target", type=float, default=DEFAULT_TTFT_TARGET_S)
    sim.add_argument("--itl-target", type=float, default=DEFAULT_ITL_TARGET_S)
    sim.add_argument("--out", default=None, help="JSON result file")
    sim.add_argument("--seed", type=int, default=0)
    sim.set_defaults(func=_cmd_sim)


def _cmd_workload(args: argparse.Namespace) -> int:
    from kvgrid.bench.workloads import load_workload

    try:
        w = load_workload(args.spec)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = w.stats()
    out["theoretical_hit_rate"] = w.theoretical_hit_rate()
    if args.block_size:
        out["theoretical_hit_rate_engine_blocks"] = w.theoretical_hit_rate(args.block_size)
    print(json.dumps(out, indent=1))
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    import asyncio

    from kvgrid.bench.replay import SLO, Replayer, format_table, plot, report
    from kvgrid.bench.workloads import load_workload

    try:
        w = load_workload(args.workload)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit:
        w.requests = w.requests[: args.limit]
    slo = SLO(
        None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1000,
        None if args.slo_tpot_ms is None else args.slo_tpot_ms / 1000,
        None if args.slo_e2el_ms is None else args.slo_e2el_ms / 1000,
    )
    rep = Replayer(args.url, args.model, args.api_key, ignore_eos=not args.no_ignore_eos)
    speed = args.speed if args.concurrency is None else None
    results, duration = asyncio.run(
        rep.run(w, speed=speed or 1.0, concurrency=args.concurrency, progress=not args.no_progress)
    )
    mode = (
        {"closed_loop": True, "concurrency": args.concurrency}
        if args.concurrency
        else {"open_loop": True, "speed": speed or 1.0}
    )
    out = report(w, results, duration, slo, args.block_size, mode)
    print(format_table(out))
    if args.out:
        p = Path(args.out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=1))
        for q in plot(results, p.with_suffix(""), w.name):
            print(f"wrote {q}")
        print(f"wrote {p}")
    return 0 if out["metrics"]["failed"] == 0 else 1


def _cmd_router(args: argparse.Namespace) -> int:
    from kvgrid.bench.router_bench import run

    return run(args)


def _cmd_reuse(args: argparse.Namespace) -> int:
    from kvgrid.bench.reuse_report import main

    try:
        return main(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _parse_site(s: str):
    from kvgrid.router.sites import parse_site

    return parse_site(s)


def _cmd_sim(args: argparse.Namespace) -> int:
    from kvgrid.bench.sim.fleet import SimConfig, Site, simulate
    from kvgrid.bench.workloads import load_workload
    from kvgrid.planner.calibration import load_calibration
    from kvgrid.planner.planner import Planner, PlannerConfig

    try:
        w = load_workload(args.workload)
        calib = load_calibration(args.calibration)
        sites = [_parse_site(s) for s in args.site] or [Site()]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    planner = None
    if args.planner:
        planner = Planner(
            PlannerConfig(
                ttft_target_s=args.ttft_target, itl_target_s=args.itl_target, disagg=args.disagg
            ),
            calib,
        )
    cfg = SimConfig(
        num_workers=args.workers,
        policy=args.policy,
        calibration=calib,
        disagg=args.disagg,
        num_prefill=args.prefill_workers,
        link_bytes_per_s=args.link_gbps * 1e9 / 8,
        sites=sites,
        candidates=args.candidates,
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
        g2_capacity_tokens=args.g2_tokens,
        planner=planner,
        seed=args.seed,
    )
    try:
        res = simulate(w, cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fleet = res.pop("fleet")
    res["scale_actions_log"] = fleet.actions[:200]
    if not calib.meta.get("measured", False):
        print(
            "note: default calibration (DESIGN.md numbers, not a measured GPU run)", file=sys.stderr
        )
    print(json.dumps(res, indent=1, default=str))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    return 0
