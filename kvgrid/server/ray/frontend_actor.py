"""The frontend actor of a kvgrid deployment on Ray: the OpenAI API, the router and the
planner, whose workers are WorkerActors that its RayFleet (kvgrid.server.ray.fleet) starts
and follows. It serves HTTP as every actor does (kvgrid.server.ray.actors.Served)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from kvgrid.logs import setup_logging
from kvgrid.server.ray import secrets
from kvgrid.server.ray.actors import Served, http_url, node_ip
from kvgrid.server.ray.fleet import RayFleet
from kvgrid.server.ray.http import HTTPThread, bind


class FrontendActor(Served):
    def __init__(self, name: str, args: dict[str, Any], cluster: secrets.ClusterSecrets) -> None:
        """``cluster``: the deployment's secrets; the frontend keeps the cluster key (its
        router checks every worker with it) and hands each worker actor its own part."""
        import ray

        from kvgrid.router.sites import parse_site
        from kvgrid.server.autoscale import LiveActuator
        from kvgrid.server.frontend import create_frontend_app
        from kvgrid.server.ray.placement import WorkerResources
        from kvgrid.server.serve import frontend_from_args, planner_loop

        self.name = name
        secrets.apply(cluster.frontend())
        setup_logging()
        ns = argparse.Namespace(**args)
        fe = frontend_from_args(ns, [], cluster.control_key)
        sites = [parse_site(s) for s in ns.site]
        fe.router.site_rtt_s = {s.name: s.rtt_s for s in sites}
        max_workers = max(ns.workers, ns.max_workers or ns.workers)
        fleet = RayFleet(
            fe,
            name,
            args,
            cluster,
            sites,
            WorkerResources(**ns.ray_worker_resources),
            ns.ray_max_restarts,
            initial=ns.workers,
        )
        fleet.clear_leftovers()
        fleet.actuator = LiveActuator(fe, fleet, max_workers)
        fe.fleet = fleet
        if ns.autoscale or max_workers > ns.workers:
            fe.autoscaler = planner_loop(ns, fleet.actuator, max_workers)
        host = fe.bind_host
        ip = node_ip()
        sock = bind(host, ns.port)
        self.http = HTTPThread(create_frontend_app(fe), sock, "kvgrid-frontend-http")
        self.http.start_serving()
        shown = ip if host in ("0.0.0.0", "::") else host
        self.about = {
            "url": http_url(shown, self.http.port),
            "node_ip": ip,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "model": fe.config.model_name,
        }
        self._start_watchdog(self.http.serving, "frontend")

    def __repr__(self) -> str:
        return f"FrontendActor({getattr(self, 'name', '?')})"
