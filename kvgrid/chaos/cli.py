"""`kvgrid chaos`: run a fault-injection campaign against a live `kvgrid serve`.

Needs root (tmpfs mounts for full and read-only store directories, a network namespace for
the partition) and redis-server for G4 on Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import tempfile
from dataclasses import replace
from pathlib import Path


def register(subparsers) -> None:
    from kvgrid.chaos.faults import all_faults
    from kvgrid.chaos.system import SystemConfig

    d = SystemConfig()
    p = subparsers.add_parser(
        "chaos",
        help="fault-injection campaign: every answer identical to a fault-free run, or a "
        "clean error",
    )
    p.add_argument("--requests", type=int, default=2000, help="requests under faults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--faults",
        default="all",
        help=f"comma-separated, or 'all': {', '.join(all_faults())}",
    )
    p.add_argument("--g4", default="redis,fs", help="G4 backends to run under: redis, fs")
    p.add_argument("--workers", type=int, default=d.workers, help="workers of kvgrid serve")
    p.add_argument("--no-netns", action="store_true", help="no worker in its own namespace")
    p.add_argument("--model", default=None, help="model (default: the embedded default)")
    p.add_argument("--concurrency", type=int, default=8, help="conversations at once")
    p.add_argument("--conversations", type=int, default=48)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--deadline", type=float, default=300.0, help="s before a request is hung")
    p.add_argument("--workdir", default=None, help="where the system runs (default: a temp dir)")
    p.add_argument("--reference", default=None, help="cache file of the reference answers")
    p.add_argument("--out", default="chaos.json", help="JSON results")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from kvgrid.chaos.campaign import Campaign, CampaignConfig
    from kvgrid.chaos.faults import all_faults
    from kvgrid.chaos.system import SystemConfig

    faults = tuple(all_faults()) if args.faults == "all" else tuple(args.faults.split(","))
    workdir = args.workdir or tempfile.mkdtemp(prefix="kvgrid-chaos-")
    system = replace(
        SystemConfig(), workers=args.workers, netns_worker=not args.no_netns, model=args.model
    )
    cfg = CampaignConfig(
        requests=args.requests,
        seed=args.seed,
        faults=faults,
        g4=tuple(args.g4.split(",")),
        system=system,
        concurrency=args.concurrency,
        conversations=args.conversations,
        turns=args.turns,
        max_tokens=args.max_tokens,
        deadline_s=args.deadline,
        workdir=workdir,
        reference=args.reference,
    )
    console = Console()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("chaos", total=None)
        try:
            camp = Campaign(cfg, lambda done, total: bar.update(task, completed=done, total=total))
        except ValueError as e:
            console.print(f"[red]{e}[/red]")
            return 2
        result = asyncio.run(_until_signalled(camp.run()))
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print_table(result, console)
    console.print(f"JSON: {args.out}   system logs: {workdir}")
    t = result["total"]
    ok = not t["wrong"] and not t["hung"] and not result["leaks"]
    return 0 if ok else 1


async def _until_signalled(coro):
    """Run ``coro``; SIGTERM cancels it like Ctrl-C does, so the system under test (its
    processes, mounts and namespace) is taken down either way."""
    task = asyncio.ensure_future(coro)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


def print_table(result: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"kvgrid chaos ({result['seconds']:.0f} s)")
    for c in ("fault", "G4", "requests", "identical", "clean errors", "wrong", "hung", "idle"):
        t.add_column(c, justify="left" if c in ("fault", "G4") else "right", no_wrap=True)
    for r in result["rows"]:
        t.add_row(r["fault"], r["g4"], str(r["requests"]), str(r["identical"]),
                  str(r["clean_errors"]), str(r["wrong"]), str(r["hung"]),
                  "yes" if r["idle"] else "[red]no[/red]")  # fmt: skip
    tot = result["total"]
    t.add_row("total", "", *(str(tot[k]) for k in ("requests", "identical", "clean_errors",
                                                   "wrong", "hung")),
              "yes" if not result["leaks"] else "[red]no[/red]")  # fmt: skip
    console.print(t)
    m = result["migration"]
    if m["requests_hit_by_worker_loss"]:
        console.print(
            f"requests that lost their worker: {m['requests_hit_by_worker_loss']:.0f}, "
            f"completed by migration: {m['completed_by_migration']:.0f} "
            f"({100 * m['share']:.1f}%)"
        )
    for line in result["leaks"]:
        console.print(f"[red]not idle after {line}[/red]")
