"""The driver of a kvgrid deployment on Ray: `kvgrid serve --ray [ADDRESS]`, ``start_on_ray``.

It connects to the cluster, reads once what every actor must share (ClusterSecrets), works
out a worker's resources from the cluster's, and starts the frontend actor on its own node
(so the API answers where the command ran, e.g. on the head host). The frontend starts and
follows the workers. The driver owns the frontend and the frontend its workers: when the
driver ends, for whatever reason, Ray ends the whole deployment with it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import asdict
from typing import Any

import httpx

log = logging.getLogger(__name__)


class RayServer:
    """A running deployment, as its driver sees it."""

    def __init__(self, frontend: Any, about: dict[str, Any], name: str, namespace: str) -> None:
        self.frontend, self.about = frontend, about
        self.url: str = about["url"]
        self.name, self.namespace = name, namespace

    @classmethod
    def start(cls, args: argparse.Namespace, ready_timeout_s: float = 600.0) -> RayServer:
        """Start the frontend actor (which starts the workers); returns once its HTTP API
        answers. Raises ValueError for a configuration the cluster cannot run."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from kvgrid.router.sites import parse_site
        from kvgrid.server.ray.frontend_actor import FrontendActor
        from kvgrid.server.ray.placement import check_sites, worker_resources
        from kvgrid.server.ray.secrets import ClusterSecrets, actor_config
        from kvgrid.server.serve import frontend_host

        if getattr(args, "prefill_workers", 0) or getattr(args, "decode_workers", 0):
            raise ValueError(
                "--ray runs one pool of workers (--workers): prefill and decode pools run "
                "with kvgrid serve, or kvgrid worker --role"
            )
        if args.workers is None:
            args.workers = 1
        if args.workers < 1:
            raise ValueError("--workers must be at least 1")
        sites = [parse_site(s) for s in args.site]
        if len({s.name for s in sites}) != len(sites):
            raise ValueError("--site: each site name once")
        frontend_host(args)  # an unsafe bind address fails here, not in the actor
        cluster = ClusterSecrets.from_driver(args)
        if not ray.is_initialized():
            ray.init(
                address=args.ray or None,
                namespace=args.ray_namespace,
                logging_level=logging.WARNING,
            )
        total = ray.cluster_resources()
        res = worker_resources(
            args.device,
            total.get("GPU", 0.0),
            args.ray_worker_cpus,
            _pairs(args.ray_worker_resource, float, "--ray-worker-resource"),
            _pairs(args.ray_node_label, str, "--ray-node-label"),
        )
        for warning in check_sites(sites, ray.nodes()):
            log.warning("%s", warning)
        config = actor_config(args)
        config["ray_worker_resources"] = asdict(res)
        node = ray.get_runtime_context().get_node_id()
        name = args.ray_name
        try:
            frontend = (
                ray.remote(FrontendActor)
                .options(
                    name=f"{name}-frontend",
                    namespace=args.ray_namespace,
                    num_cpus=0,
                    max_restarts=args.ray_max_restarts,
                    max_task_retries=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                )
                .remote(name, config, cluster)
            )
        except ValueError as e:
            raise ValueError(
                f"a kvgrid deployment named {name!r} already runs in Ray namespace "
                f"{args.ray_namespace!r} (stop it, or choose --ray-name): {e}"
            ) from None
        about = ray.get(frontend.endpoint.remote(), timeout=ready_timeout_s)
        log.info(
            "kvgrid on Ray: %s at %s; %d worker(s) of %s starting",
            about["model"],
            about["url"],
            args.workers,
            f"{res.num_gpus:g} GPU" if res.num_gpus else f"{res.num_cpus:g} CPU",
        )
        return cls(frontend, about, name, args.ray_namespace)

    # ---- what an operator does, through the same admin API ---------------------------------

    def _admin_headers(self) -> dict[str, str]:
        from kvgrid.server.auth import admin_token

        token = admin_token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def state(self) -> dict[str, Any]:
        """Workers (where each runs, restarts), draining and retired ones, scaling actions."""
        r = httpx.get(f"{self.url}/admin/scale", headers=self._admin_headers(), timeout=10)
        r.raise_for_status()
        return r.json()

    def scale(self, workers: int) -> dict[str, Any]:
        r = httpx.post(
            f"{self.url}/admin/scale",
            json={"workers": workers},
            headers=self._admin_headers(),
            timeout=30,
        )
        r.raise_for_status()
        return r.json()

    # ---- lifetime ------------------------------------------------------------------------

    def wait(self, stop: threading.Event) -> int:
        """Until ``stop`` is set (0), or the frontend is gone for good (1)."""
        import ray
        from ray.exceptions import ActorDiedError, RayActorError

        ref = self.frontend.watch.remote()
        while not stop.is_set():
            done, _ = ray.wait([ref], timeout=0.5)
            if not done:
                continue
            try:
                ray.get(ref)
            except ActorDiedError as e:
                log.error("the frontend actor is gone and will not be restarted: %s", e)
                return 1
            except RayActorError as e:
                log.warning("the frontend actor died; Ray restarts it: %s", e)
                stop.wait(1.0)
            ref = self.frontend.watch.remote()
        return 0

    def stop(self, timeout_s: float = 120.0) -> None:
        """Stop gracefully (workers drain nothing: the server is going away; each engine
        writes its blocks down), then end the actors."""
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        try:
            ray.get(self.frontend.shutdown.remote(), timeout=timeout_s)
        except (RayError, GetTimeoutError) as e:
            log.warning("the frontend did not stop gracefully: %s", e)
        ray.kill(self.frontend, no_restart=True)

    def __enter__(self) -> RayServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_on_ray(address: str | None = None, **options: Any) -> RayServer:
    """`kvgrid serve --ray ADDRESS` from Python. ``options`` are `kvgrid serve`'s flags by
    their Python names (``workers=2``, ``model="/models/llama"``, ``site=["east:0:2.5"]``,
    ``kv_store_redis="redis://..."``); unknown names are an error. ``address`` None:
    ``RAY_ADDRESS``, else the cluster `ray start` made on this host, else a new local one."""
    from kvgrid.cli import build_parser

    args = build_parser().parse_args(["serve"])
    unknown = sorted(k for k in options if k in ("func", "ray") or not hasattr(args, k))
    if unknown:
        raise TypeError(f"start_on_ray: unknown option(s) {', '.join(unknown)}")
    for k, v in options.items():
        setattr(args, k, v)
    args.ray = address or ""
    return RayServer.start(args)


def run_serve_ray(args: argparse.Namespace) -> int:
    """`kvgrid serve --ray [ADDRESS]`: until Ctrl-C or SIGTERM."""
    import ray
    from ray.exceptions import RayError

    try:
        server = RayServer.start(args)
    except (ValueError, OSError, RayError) as e:
        print(f"error: {e}", file=sys.stderr)
        if ray.is_initialized():
            ray.shutdown()
        return 2
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return server.wait(stop)
    finally:
        log.info("stopping the deployment")
        server.stop()
        for s, h in old.items():
            signal.signal(s, h)
        ray.shutdown()


def _pairs(items: list[str], cast, flag: str) -> dict[str, Any]:
    out = {}
    for item in items or ():
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"{flag} wants NAME=VALUE, got {item!r}")
        try:
            out[k] = cast(v)
        except ValueError:
            raise ValueError(f"{flag} {item!r}: {v!r} is not a {cast.__name__}") from None
    return out
