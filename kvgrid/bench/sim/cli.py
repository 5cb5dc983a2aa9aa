"""`kvgrid sim`: a workload through the fleet simulator (the real router and planner)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from kvgrid.bench.workloads import SPEC_HELP
from kvgrid.router.policies import DEFAULT_POLICY
from kvgrid.slo import DEFAULT_ITL_TARGET_S, DEFAULT_TTFT_TARGET_S


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``kvgrid sim``."""
    p.add_argument("--workload", required=True, help=SPEC_HELP)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--policy", default=DEFAULT_POLICY)
    p.add_argument("--calibration", default=None, help="engine calibration JSON")
    p.add_argument("--disagg", action="store_true", help="separate prefill/decode pools")
    p.add_argument("--prefill-workers", type=int, default=0)
    p.add_argument(
        "--link-gbps",
        type=float,
        default=None,
        help="prefill->decode KV transfer bandwidth (default: the calibration's)",
    )
    p.add_argument("--candidates", type=int, default=None, help="preselect K per decision")
    p.add_argument("--g2-tokens", type=int, default=0, help="host-memory tier per worker")
    p.add_argument(
        "--site",
        action="append",
        default=[],
        help="NAME:RTT_MS:COST_PER_GPU_HOUR:SHARE (repeatable)",
    )
    p.add_argument("--slo-ttft", type=float, default=2.0)
    p.add_argument("--slo-tpot", type=float, default=0.1)
    p.add_argument("--planner", action="store_true", help="scale with the SLA planner")
    p.add_argument("--ttft-target", type=float, default=DEFAULT_TTFT_TARGET_S)
    p.add_argument("--itl-target", type=float, default=DEFAULT_ITL_TARGET_S)
    p.add_argument("--out", default=None, help="JSON result file")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """``kvgrid sim``: simulate, print the result as JSON (and write it with --out)."""
    from kvgrid.bench.sim.fleet import SimConfig, Site, simulate
    from kvgrid.bench.workloads import load_workload
    from kvgrid.planner.calibration import load_calibration
    from kvgrid.planner.planner import Planner, PlannerConfig
    from kvgrid.router.sites import parse_site

    w = load_workload(args.workload)
    calib = load_calibration(args.calibration)
    sites = [parse_site(s) for s in args.site] or [Site()]
    if args.link_gbps is not None and args.link_gbps <= 0:
        raise ValueError(f"--link-gbps must be positive, got {args.link_gbps}")
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
        transfer=None
        if args.link_gbps is None
        else replace(calib.transfer, bytes_per_s=args.link_gbps * 1e9 / 8),
        sites=sites,
        candidates=args.candidates,
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
        g2_capacity_tokens=args.g2_tokens,
        planner=planner,
        seed=args.seed,
    )
    res = simulate(w, cfg)
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
