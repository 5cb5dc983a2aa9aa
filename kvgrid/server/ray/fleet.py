"""RayFleet: the frontend's workers as Ray actors; discovery, health and restarts from Ray.

Each worker is a named actor (``<name>-w0``, ``<name>-w1``, ... in the deployment's Ray
namespace) with ``max_restarts``: when its process dies, Ray starts it again (on a node with
the resources and labels it asks for) and the router learns of it from Ray, not from a
registration of the worker's own:

- ``endpoint()`` answers once the actor's engine serves: the fleet link then follows that
  address (HTTP API, KV events, snapshots) exactly as it follows any worker;
- a ``watch()`` call stays pending for the actor's life: when it fails, the actor died, the
  router marks the worker down at once (no heartbeat timeout), and the fleet waits for Ray's
  restart, whose new address and epoch replace the old ones;
- an actor Ray will not restart (restarts used up, or its start failed) is reported with its
  cause and leaves the pool.

It is also the autoscaler's launcher (kvgrid.server.autoscale.Launcher): the planner's "add"
creates a worker actor in the cheapest site with room (kvgrid.server.ray.placement); its
"drain" lets the actor's requests finish, stops it gracefully, then kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from kvgrid.router.sites import Site
from kvgrid.server.autoscale import POOL, LiveActuator, Replica
from kvgrid.server.links import Refused
from kvgrid.server.ray.placement import WorkerResources, choose_site, site_capacity
from kvgrid.server.ray.secrets import ClusterSecrets

log = logging.getLogger(__name__)


@functools.cache
def _worker_class():
    import ray

    from kvgrid.server.ray.actors import WorkerActor

    return ray.remote(WorkerActor)


@dataclass
class _Member:
    actor_name: str
    handle: Any
    site: Site | None
    status: str = "starting"  # starting | up | restarting | dead | stopped
    restarts: int = 0  # deaths Ray has restarted it from
    about: dict[str, Any] = field(default_factory=dict)  # the incarnation's endpoint()
    error: str | None = None
    task: asyncio.Task | None = None


class RayFleet:
    def __init__(
        self,
        fe,
        name: str,
        args: dict[str, Any],
        cluster: ClusterSecrets,
        sites: list[Site],
        resources: WorkerResources,
        max_restarts: int,
        initial: int = 1,
        stop_timeout_s: float = 60.0,
    ) -> None:
        self.fe, self.name, self.args, self.cluster = fe, name, args, cluster
        self.sites, self.resources = sites, resources
        self.max_restarts, self.initial = max_restarts, initial
        self.stop_timeout_s = stop_timeout_s
        self.namespace: str = args["ray_namespace"]
        self.members: dict[str, _Member] = {}
        self.actuator: LiveActuator | None = None

    def actor_name(self, worker_id: str) -> str:
        return f"{self.name}-{worker_id}"

    def _named(self) -> list[str]:
        import ray

        prefix = f"{self.name}-w"
        return [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == self.namespace and a["name"].startswith(prefix)
        ]

    def clear_leftovers(self, timeout_s: float = 30.0) -> None:
        """Workers of this deployment's earlier life (a restarted frontend): Ray ends them
        with their owner, but their names may still be taken for a moment."""
        import ray

        names = self._named()
        for n in names:
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(n, namespace=self.namespace), no_restart=True)
        deadline = time.monotonic() + timeout_s
        while names and time.monotonic() < deadline:
            names = [n for n in self._named() if n in names]
            time.sleep(0.2)

    # ---- lifecycle (the frontend app's start and stop) -----------------------------------

    async def start(self) -> None:
        self.actuator.add_replicas(POOL, self.initial, time.monotonic())

    async def stop(self) -> None:
        live = [w for w, m in self.members.items() if m.status not in ("dead", "stopped")]
        for wid in live:
            self.detach(wid)
        await asyncio.gather(*(asyncio.to_thread(self.retire, w) for w in live))

    # ---- Launcher ------------------------------------------------------------------------

    def launch(self, worker_id: str, role: str = "both") -> Replica:
        import ray

        if role != "both":
            raise ValueError("a Ray deployment runs one pool of workers that prefill and decode")

        site = None
        if self.sites:
            placed: dict[str, int] = {}
            for m in self.members.values():
                if m.site is not None and m.status not in ("dead", "stopped"):
                    placed[m.site.name] = placed.get(m.site.name, 0) + 1
            cap = site_capacity(ray.nodes(), self.sites, self.resources)
            site = choose_site(self.sites, cap, placed)
        name = self.actor_name(worker_id)
        handle = (
            _worker_class()
            .options(
                name=name,
                namespace=self.namespace,
                max_restarts=self.max_restarts,
                max_task_retries=0,
                **self.resources.actor_options(site),
            )
            .remote(worker_id, self.args, self.cluster.worker(worker_id))
        )
        m = self.members[worker_id] = _Member(name, handle, site)
        m.task = asyncio.get_running_loop().create_task(self._follow(worker_id, m))
        log.info("ray: created actor %s%s", name, f" in site {site.name}" if site else "")
        cost = site.cost_per_gpu_hour if site else 0.0
        return Replica(worker_id, None, time.monotonic(), cost_per_hour=cost)

    def detach(self, worker_id: str) -> None:
        m = self.members[worker_id]
        if m.task is not None:
            m.task.cancel()
        if m.about.get("url"):
            self.fe.link.forget(m.about["url"])

    def retire(self, worker_id: str) -> None:
        """Graceful stop (the engine writes its cached blocks down), then kill: blocking."""
        import ray
        from ray.exceptions import RayError

        m = self.members[worker_id]
        if m.status == "up":  # one still starting holds nothing worth a graceful stop
            try:
                # on a thread of the frontend's: wait on the reference's future, not ray.get
                m.handle.shutdown.remote().future().result(timeout=self.stop_timeout_s)
            except (RayError, TimeoutError) as e:
                log.warning("ray: %s did not stop gracefully: %r", m.actor_name, e)
        ray.kill(m.handle, no_restart=True)
        m.status = "stopped"

    def describe(self, worker_id: str) -> dict[str, Any]:
        m = self.members.get(worker_id)
        if m is None:
            return {}
        a = m.about
        return {
            "actor": m.actor_name,
            "status": m.status,
            "restarts": m.restarts,
            "site": m.site.name if m.site else a.get("site", ""),
            "url": a.get("url"),
            "node_ip": a.get("node_ip"),
            "node_id": a.get("node_id"),
            "pid": a.get("pid"),
            "epoch": a.get("epoch"),
            "gpus": a.get("gpus"),
            "error": m.error,
        }

    # ---- following one actor -------------------------------------------------------------

    async def _follow(self, worker_id: str, m: _Member) -> None:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        link = self.fe.link
        while True:
            try:
                about = await m.handle.endpoint.remote()
            except ActorUnavailableError:  # between two lives
                await asyncio.sleep(0.5)
                continue
            except ActorDiedError as e:  # Ray will not restart it
                self._lost(worker_id, m, e)
                return
            old = m.about.get("url")
            if old and old != about["url"]:
                link.forget(old)
            m.about, m.status = about, "up"
            link.add_url(about["url"])
            # as the actor's id: its /info must prove that worker's key. A refusal is logged
            # by the link, which keeps trying the address.
            with contextlib.suppress(Refused):
                await link.register(about["url"], worker_id)
            log.info(
                "ray: %s serves at %s (node %s%s, epoch %s)",
                m.actor_name,
                about["url"],
                about["node_ip"],
                f", site {about['site']}" if about["site"] else "",
                about["epoch"],
            )
            try:
                await m.handle.watch.remote()
            except RayActorError as e:
                m.restarts += 1
                m.status = "restarting"
                log.warning("ray: %s died (%s); waiting for Ray to restart it", m.actor_name, e)
                if worker_id in self.fe.router.workers:
                    link.mark_down(worker_id, "its Ray actor died")

    def _lost(self, worker_id: str, m: _Member, e: Exception) -> None:
        m.status, m.error = "dead", " ".join(str(e).split())[:800] or repr(e)
        log.error("ray: %s is gone and will not be restarted: %s", m.actor_name, m.error)
        if m.about.get("url"):
            self.fe.link.forget(m.about["url"])
        if worker_id in self.fe.router.workers:
            self.fe.router.remove_worker(worker_id)
        act = self.actuator
        r = act.replicas.pop(worker_id, None) if act is not None else None
        if r is not None:
            r.where, r.stopped_at = self.describe(worker_id), time.monotonic()
            act.retired.append(r)
