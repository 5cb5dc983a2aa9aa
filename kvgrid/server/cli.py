"""`kvgrid serve`, `kvgrid worker`, `kvgrid router` and `kvgrid control-key`."""

from __future__ import annotations

import argparse
import sys


def _control_key_arg(p: argparse.ArgumentParser, who: str) -> None:
    p.add_argument(
        "--control-key-file",
        default=None,
        metavar="FILE",
        help=f"{who} (mode 0600; or env KVGRID_CONTROL_KEY_FILE, or the key itself in "
        "KVGRID_CONTROL_KEY); `kvgrid control-key new` makes one",
    )


def _frontend_args(p: argparse.ArgumentParser) -> None:
    from kvgrid.flags import add_dataclass_args
    from kvgrid.router.disagg import DISAGG_FLAG_FIELDS, DisaggConfig
    from kvgrid.router.policies import DEFAULT_POLICY, POLICIES
    from kvgrid.server.config import FrontendConfig
    from kvgrid.server.tool_parsers import PARSERS
    from kvgrid.slo import DEFAULT_ITL_TARGET_S, DEFAULT_TTFT_PERCENTILE, DEFAULT_TTFT_TARGET_S

    g = p.add_argument_group("frontend")
    g.add_argument(
        "--host",
        default=None,
        help="address to bind (default 127.0.0.1; 0.0.0.0 when API keys are set)",
    )
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="serve beyond loopback without API keys (anyone who reaches it may use it)",
    )
    g.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=10.0,
        help="seconds without a worker's heartbeat before it is marked down",
    )
    g.add_argument(
        "--policy",
        default=DEFAULT_POLICY,
        choices=list(POLICIES),
        help="routing policy (default: %(default)s)",
    )
    g.add_argument(
        "--api-keys",
        default=None,
        metavar="FILE",
        help="JSON or TOML file of API keys -> tenants (or env KVGRID_API_KEYS); "
        "none: one local tenant",
    )
    g.add_argument(
        "--max-concurrent",
        type=int,
        default=256,
        help="requests in flight across all workers; more wait in a fair queue",
    )
    g.add_argument("--served-model-name", default=None)
    add_dataclass_args(g, FrontendConfig)
    g.add_argument(
        "--tool-call-parser",
        default=FrontendConfig.tool_call_parser,
        choices=list(PARSERS),
        help="format of the model's tool calls (auto: from its tokenizer; hermes otherwise)",
    )
    g.add_argument(
        "--ttft-target",
        type=float,
        default=DEFAULT_TTFT_TARGET_S,
        help=f"seconds, at p{round(DEFAULT_TTFT_PERCENTILE * 100)}",
    )
    g.add_argument("--itl-target", type=float, default=DEFAULT_ITL_TARGET_S, help="seconds")
    g = p.add_argument_group(
        "disaggregation",
        "prefill on another worker that streams the KV to the one that decodes",
    )
    add_dataclass_args(g, DisaggConfig, DISAGG_FLAG_FIELDS)


def _autoscale_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "scaling",
        "start and drain worker processes with the SLA planner (--autoscale); with "
        "--max-workers alone, only POST /admin/scale resizes",
    )
    g.add_argument("--autoscale", action="store_true", help="run the SLA planner")
    g.add_argument("--min-workers", type=int, default=1)
    g.add_argument(
        "--max-workers", type=int, default=None, help="most worker processes (default --workers)"
    )
    for role in ("prefill", "decode"):
        g.add_argument(
            f"--min-{role}-workers",
            type=int,
            default=None,
            help=f"fewest {role} workers with role pools (default --min-workers)",
        )
        g.add_argument(
            f"--max-{role}-workers",
            type=int,
            default=None,
            help=f"most {role} workers with role pools (default --{role}-workers)",
        )
    g.add_argument("--autoscale-interval", type=float, default=10.0, help="planner interval, s")
    g.add_argument(
        "--calibration",
        default=None,
        metavar="JSON",
        help="engine step times the planner models workers with (kvgrid.bench.sim format; "
        "measure this machine's with `kvgrid bench sim-vs-live calibrate`); "
        "default: the speeds the workers measure and report",
    )
    g.add_argument(
        "--worker-startup-s",
        type=float,
        default=None,
        help="time a new worker takes to serve (default: the calibration's)",
    )
    g.add_argument("--scale-down-cooldown", type=float, default=60.0, help="s after a scale-up")
    g.add_argument(
        "--scale-down-ticks", type=int, default=12, help="intervals of headroom before draining"
    )


def _worker_transfer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device-group",
        default=None,
        metavar="NAME",
        help="name of the compute device the worker runs on, for disaggregation decisions: "
        "workers with the same name share its compute (default: the GPU's UUID, or "
        "HOST/cpu on the CPU)",
    )
    p.add_argument(
        "--allow-fault-injection",
        action="store_true",
        help="accept injected faults (drills and tests of recovery; never in production): "
        "POST /debug/faults damages, drops or stalls the next outgoing KV transfer; "
        "POST /internal/faults drops, duplicates, reorders or garbles KV event batches and "
        "slows disk-tier reads (kvgrid chaos)",
    )


def _ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "Ray cluster",
        "run the frontend and the workers as Ray actors, placed and restarted by Ray "
        "(pip install 'kvgrid[ray]')",
    )
    g.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="on the Ray cluster at ADDRESS (alone: $RAY_ADDRESS, else the cluster `ray start` "
        "made on this host, else a new local one)",
    )
    g.add_argument("--ray-name", default="kvgrid", help="prefix of the deployment's actor names")
    g.add_argument("--ray-namespace", default="kvgrid")
    g.add_argument(
        "--ray-worker-cpus",
        type=float,
        default=1.0,
        help="cores per worker on CPU nodes (on a cluster with GPUs: one GPU per worker)",
    )
    g.add_argument(
        "--ray-worker-resource",
        action="append",
        default=[],
        metavar="NAME=AMOUNT",
        help="a custom Ray resource each worker needs (repeatable)",
    )
    g.add_argument(
        "--ray-node-label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a node label each worker needs (repeatable)",
    )
    g.add_argument(
        "--ray-max-restarts",
        type=int,
        default=8,
        help="times Ray restarts a dead actor (-1: always)",
    )
    g.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="NAME:RTT_MS:COST",
        help="a site: the Ray nodes labelled kvgrid.io/site=NAME, RTT_MS away from the router, "
        "at COST per GPU-hour (repeatable; the router weighs the round trip, new workers go "
        "to the cheapest site with room)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    from kvgrid.engine.args import add_engine_args

    p = sub.add_parser("serve", help="OpenAI-compatible server: router plus worker processes")
    _frontend_args(p)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes that prefill and decode (default 1, or 0 with role pools)",
    )
    p.add_argument(
        "--prefill-workers", type=int, default=0, help="worker processes that only prefill"
    )
    p.add_argument(
        "--decode-workers",
        type=int,
        default=0,
        help="worker processes that decode (and prefill themselves when that is faster)",
    )
    _worker_transfer_args(p)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: cores / max workers)",
    )
    _autoscale_args(p)
    _control_key_arg(p, "cluster control key (default: one generated for this run)")
    _ray_args(p)
    add_engine_args(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("worker", help="one engine worker (internal HTTP API + KV events)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (anything beyond loopback needs a control key)",
    )
    p.add_argument("--port", type=int, default=8100)
    p.add_argument(
        "--advertise-url",
        default=None,
        help="URL the router reaches this worker at (default http://HOST:PORT)",
    )
    p.add_argument("--worker-id", default=None, help="stable name (default HOST:PORT)")
    p.add_argument(
        "--events-port",
        type=int,
        default=0,
        help="ZeroMQ PUB port for KV events (default: any free port)",
    )
    p.add_argument(
        "--advertise-events",
        default=None,
        metavar="tcp://HOST:PORT",
        help="event stream address routers connect to (default: the advertise URL's host "
        "and the events port)",
    )
    p.add_argument(
        "--router", default=None, metavar="URL", help="announce this worker to a router at URL"
    )
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument(
        "--role",
        default="both",
        choices=["prefill", "decode", "both"],
        help="what the router uses this worker for (POST /role changes it)",
    )
    p.add_argument(
        "--transfer-port",
        type=int,
        default=0,
        help="TCP port KV transfers from prefill workers arrive on (default: any free port)",
    )
    p.add_argument(
        "--advertise-transfers",
        default=None,
        metavar="HOST:PORT",
        help="address prefill workers send KV transfers to (default: the advertise URL's "
        "host and the transfer port)",
    )
    _worker_transfer_args(p)
    _control_key_arg(p, "this worker's key, or the cluster key")
    p.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop (as on SIGTERM) when the process that started this one dies",
    )
    p.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=60.0,
        help="seconds in one engine step, with requests waiting, after which /health "
        "reports the worker unhealthy",
    )
    add_engine_args(p)
    p.set_defaults(func=_worker)

    p = sub.add_parser("router", help="the frontend and router alone, for separate workers")
    _frontend_args(p)
    p.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="URL",
        help="a worker URL (repeatable); workers may also announce themselves",
    )
    p.add_argument(
        "--model", default=None, help="model whose tokenizer to use (default: the embedded default)"
    )
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    _control_key_arg(p, "cluster control key")
    p.set_defaults(func=_router)

    p = sub.add_parser("control-key", help="make control-plane keys (router and workers)")
    ksub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    k = ksub.add_parser("new", help="a new cluster key (for routers, or workers)")
    k.add_argument("--out", required=True, metavar="FILE", help="written with mode 0600")
    k.set_defaults(func=_control_key)
    k = ksub.add_parser("worker", help="one worker's key, derived from the cluster key")
    k.add_argument("worker_id")
    k.add_argument("--cluster", required=True, metavar="FILE", help="the cluster key file")
    k.add_argument("--out", required=True, metavar="FILE", help="written with mode 0600")
    k.set_defaults(func=_control_key)


def _serve(args: argparse.Namespace) -> int:
    if args.ray is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("error: --ray needs Ray: pip install 'kvgrid[ray]'", file=sys.stderr)
            return 2
        from kvgrid.server.ray.serve import run_serve_ray

        return run_serve_ray(args)
    if args.site:
        print("error: --site places workers on a Ray cluster: add --ray", file=sys.stderr)
        return 2
    from kvgrid.server.serve import run_serve

    return run_serve(args)


def _worker(args: argparse.Namespace) -> int:
    from kvgrid.server.worker import run_worker

    return run_worker(args)


def _router(args: argparse.Namespace) -> int:
    from kvgrid.server.serve import run_router

    return run_router(args)


def _control_key(args: argparse.Namespace) -> int:
    from kvgrid.server.auth import ControlKey, CredentialError, load_control_key, write_secret_file

    try:
        if args.action == "new":
            key = ControlKey.generate()
        else:
            cluster = load_control_key(args.cluster)
            if cluster is None or not cluster.is_cluster:
                raise CredentialError(f"{args.cluster} does not hold a cluster key")
            key = cluster.for_worker(args.worker_id)
        if not write_secret_file(args.out, key.dumps() + "\n"):
            raise CredentialError(f"{args.out} exists; not overwriting it")
    except (CredentialError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0
