"""The worker actor of a kvgrid deployment on Ray, and what every actor shares.

``WorkerActor``: one engine (one GPU, or a share of a CPU node) with the worker's HTTP API
and KV event stream bound to its node's address; the RayFleet (kvgrid.server.ray.fleet)
creates and follows them for the FrontendActor (kvgrid.server.ray.frontend_actor). Each
actor serves HTTP on a thread of its own (kvgrid.server.ray.http); the actor methods only say
where it serves, wait for it to die (``watch``) and stop it. A watchdog ends the process when
the engine or the server fails, so that Ray restarts the actor: health is Ray's to act on.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from typing import Any

from kvgrid.logs import setup_logging
from kvgrid.server.ray import secrets
from kvgrid.server.ray.http import HTTPThread, bind

log = logging.getLogger(__name__)


def node_ip() -> str:
    """The address this node joined the cluster with (``ray start --node-ip-address``), the
    one other nodes reach it at."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    for n in ray.nodes():
        if n.get("NodeID") == me:
            return n["NodeManagerAddress"]
    return ray.util.getnode_ip_address()


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Served:
    """What both actors share: where they serve, a watchdog, a graceful stop."""

    http: HTTPThread
    about: dict[str, Any]

    def _start_watchdog(self, healthy, what: str) -> None:
        self._stopping = False

        def watch() -> None:
            while not self._stopping:
                time.sleep(0.5)
                if not self._stopping and not healthy():
                    # an unexpected exit: Ray restarts the actor (exit_actor would not)
                    log.critical("%s failed; exiting so that Ray restarts it", what)
                    logging.shutdown()
                    os._exit(1)

        threading.Thread(target=watch, name="kvgrid-watchdog", daemon=True).start()

    async def endpoint(self) -> dict[str, Any]:
        """Where this incarnation serves (a restarted actor serves somewhere new)."""
        return self.about

    async def watch(self) -> None:
        """Never returns: the caller's await fails when this actor dies."""
        await asyncio.Event().wait()

    async def shutdown(self) -> None:
        """Stop serving, gracefully; the actor is killed afterwards."""
        self._stopping = True
        await asyncio.to_thread(self.http.stop)


class WorkerActor(Served):
    def __init__(self, worker_id: str, args: dict[str, Any], part: secrets.WorkerSecrets) -> None:
        """``part``: this worker's key (it proves, signs and encrypts as this worker only)
        and the store's secrets."""
        import ray

        from kvgrid.router.sites import SITE_LABEL
        from kvgrid.server.worker import build_worker, create_worker_app

        if part.key.worker_id != worker_id:
            raise ValueError(f"worker {worker_id!r} was given worker {part.key.worker_id!r}'s key")
        self.worker_id = worker_id
        secrets.apply(part.env)
        setup_logging()
        ctx = ray.get_runtime_context()
        ip = node_ip()
        sock = bind(ip)
        url = http_url(ip, sock.getsockname()[1])
        ns = argparse.Namespace(**args)
        if ns.kv_store_dir:  # on every node; one G3 folder per worker (one owner per capacity)
            ns.kv_store_dir = os.path.join(ns.kv_store_dir, worker_id)
        cpus = ctx.get_assigned_resources().get("CPU")
        ns.threads = ns.threads or (max(1, int(cpus)) if cpus else None)
        site = ctx.get_node_labels().get(SITE_LABEL, "")
        # the event stream binds the node's address and is advertised there (CURVE, K_w)
        self.worker = build_worker(ns, worker_id, url, ip, part.key, site=site)
        self.http = HTTPThread(create_worker_app(self.worker), sock, f"kvgrid-{worker_id}-http")
        self.http.start_serving()
        self.about = {
            "worker_id": worker_id,
            "url": url,
            "epoch": self.worker.epoch,
            "events_endpoint": self.worker.events_endpoint,
            "node_ip": ip,
            "node_id": ctx.get_node_id(),
            "site": site,
            "pid": os.getpid(),
            "gpus": ray.get_gpu_ids(),
        }
        loop = self.worker.loop
        self._start_watchdog(
            lambda: loop.failed is None and loop.is_alive() and self.http.serving(),
            f"worker {worker_id}",
        )

    def __repr__(self) -> str:  # Ray's log prefix and error messages: the id, nothing else
        return f"WorkerActor({getattr(self, 'worker_id', '?')})"
