"""Where a worker actor may run: its resources, and sites as groups of labelled nodes.

A worker needs one GPU on a GPU cluster, or a configured share of a CPU node's cores; Ray's
scheduler puts it on a node that has them free (and its autoscaler may add such a node).
A site (kvgrid.router.sites) is the set of nodes started with the label
``kvgrid.io/site=<name>`` (``ray start --labels kvgrid.io/site=east``; KubeRay:
``rayStartParams: {labels: ...}``): a worker for that site carries the label selector, so it
lands there and nowhere else. New workers go to the cheapest site with room; when no site has
room, to the cheapest one (its request stays pending until Ray's autoscaler adds a node).

Pure functions of what ``ray.nodes()`` returns, so they are tested without a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kvgrid.router.sites import SITE_LABEL, Site


@dataclass(frozen=True)
class WorkerResources:
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    custom: dict[str, float] = field(default_factory=dict)  # e.g. {"accelerator_h200": 1}
    labels: dict[str, str] = field(default_factory=dict)  # extra node labels to require

    def fits(self) -> str:
        """The resource that limits how many fit on a node."""
        return "GPU" if self.num_gpus else "CPU"

    def per_node(self, node_resources: dict[str, float]) -> int:
        """How many of these workers one node holds."""
        counts = []
        if self.num_gpus:
            counts.append(node_resources.get("GPU", 0.0) / self.num_gpus)
        if self.num_cpus:
            counts.append(node_resources.get("CPU", 0.0) / self.num_cpus)
        for name, amount in self.custom.items():
            counts.append(node_resources.get(name, 0.0) / amount if amount else math.inf)
        return int(min(counts)) if counts and min(counts) != math.inf else 0

    def actor_options(self, site: Site | None) -> dict[str, Any]:
        selector = dict(self.labels)
        if site is not None:
            selector[SITE_LABEL] = site.name
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.custom:
            opts["resources"] = dict(self.custom)
        if selector:
            opts["label_selector"] = selector
        return opts


def worker_resources(
    device: str,
    cluster_gpus: float,
    cpus_per_worker: float,
    custom: dict[str, float] | None = None,
    labels: dict[str, str] | None = None,
) -> WorkerResources:
    """One GPU per worker where the engine runs on GPUs (``--device`` cuda, or auto on a
    cluster that has GPUs), else ``cpus_per_worker`` cores."""
    if cpus_per_worker <= 0:
        raise ValueError("--ray-worker-cpus must be > 0")
    gpu = device.startswith("cuda") or (device == "auto" and cluster_gpus > 0)
    if gpu and cluster_gpus <= 0:
        raise ValueError(f"--device {device}: the Ray cluster has no GPU")
    # a GPU worker's host work (scheduling, tokens, the HTTP server) still takes a core
    return WorkerResources(1.0 if gpu else 0.0, 1.0 if gpu else cpus_per_worker,
                           dict(custom or {}), dict(labels or {}))  # fmt: skip


def site_capacity(
    nodes: Iterable[dict[str, Any]], sites: Iterable[Site], res: WorkerResources
) -> dict[str, int]:
    """Workers each site's live nodes hold (``nodes``: ``ray.nodes()``)."""
    cap = {s.name: 0 for s in sites}
    for n in nodes:
        if not n.get("Alive", n.get("alive", False)):
            continue
        labels = n.get("Labels") or {}
        if any(labels.get(k) != v for k, v in res.labels.items()):
            continue
        site = labels.get(SITE_LABEL)
        if site in cap:
            cap[site] += res.per_node(n.get("Resources") or {})
    return cap


def choose_site(sites: list[Site], capacity: dict[str, int], placed: dict[str, int]) -> Site:
    """The cheapest site with room for one more worker; with none, the cheapest site (the
    worker waits there for a node). Ties: the site with more room, then the order given."""
    if not sites:
        raise ValueError("no site configured")
    order = sorted(
        range(len(sites)),
        key=lambda i: (
            sites[i].cost_per_gpu_hour,
            -(capacity.get(sites[i].name, 0) - placed.get(sites[i].name, 0)),
            i,
        ),
    )
    for i in order:
        if placed.get(sites[i].name, 0) < capacity.get(sites[i].name, 0):
            return sites[i]
    return sites[order[0]]


def check_sites(sites: list[Site], nodes: Iterable[dict[str, Any]]) -> list[str]:
    """Warnings for sites no live node is labelled with (their workers would wait forever
    unless an autoscaler adds such nodes)."""
    seen = {
        (n.get("Labels") or {}).get(SITE_LABEL)
        for n in nodes
        if n.get("Alive", n.get("alive", False))
    }
    return [
        f"site {s.name!r}: no live Ray node has the label {SITE_LABEL}={s.name}"
        for s in sites
        if s.name not in seen
    ]
