"""A real two-node Ray cluster on this machine: the head in the root network namespace, a
second node in a namespace of its own (its own address, reached over a veth pair), one CPU
each (kvgrid.server.ray.local starts and ends the nodes)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvgrid.router.sites import SITE_LABEL
from kvgrid.server.ray.local import RAY_ENV, RayNode, start_node


class Unavailable(RuntimeError):
    """Network namespaces cannot be made on this machine."""


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise Unavailable(f"{' '.join(cmd)}: {r.stderr.strip()}")


def _subnet() -> str:
    """A /24 of 10.0.0.0/8 no interface or route of this machine uses."""
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for _ in range(100):
        net = f"10.{random.randint(160, 250)}.{random.randint(0, 255)}"
        if f"{net}." not in used:
            return net
    raise Unavailable("no free 10.x.y.0/24 subnet")


@dataclass
class TwoNodeCluster:
    address: str
    head: RayNode
    node: RayNode
    netns: str
    env: dict[str, str]


class two_node_cluster:  # a context manager, named like contextlib's
    """``with two_node_cluster("a", "b") as c:`` the nodes carry the site labels given;
    everything made (namespace, veth pair, processes, temporary files) is gone afterwards."""

    def __init__(self, head_site: str = "a", node_site: str = "b") -> None:
        self.sites = head_site, node_site
        sfx = f"{random.randrange(16**5):05x}"
        self.netns, self.host_if, self.ns_if = f"kvr{sfx}", f"kvrh{sfx}", f"kvrn{sfx}"
        self.nodes: list[RayNode] = []
        self.tmp: Path | None = None

    def __enter__(self) -> TwoNodeCluster:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise Unavailable("network namespaces need root and iproute2 (`ip`)")
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> TwoNodeCluster:
        netns, host_if, ns_if = self.netns, self.host_if, self.ns_if
        net = _subnet()
        head_ip, node_ip = f"{net}.1", f"{net}.2"
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _run("ip", "link", "set", ns_if, "netns", netns)
        _run("ip", "addr", "add", f"{head_ip}/24", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        in_ns = ("ip", "netns", "exec", netns, "ip")
        _run(*in_ns, "addr", "add", f"{node_ip}/24", "dev", ns_if)
        _run(*in_ns, "link", "set", ns_if, "up")
        _run(*in_ns, "link", "set", "lo", "up")
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{netns}-", dir="/tmp"))
        env = {**os.environ, **RAY_ENV}
        head = start_node(head_ip, self.tmp / "head", labels={SITE_LABEL: self.sites[0]}, env=env)
        self.nodes.append(head)
        node = start_node(
            node_ip,
            self.tmp / "node",
            head_address=head.address,
            labels={SITE_LABEL: self.sites[1]},
            env=env,
            netns=netns,
        )
        self.nodes.append(node)
        head.wait_started()
        node.wait_started()
        return TwoNodeCluster(head.address, head, node, netns, env)

    def __exit__(self, *exc: object) -> None:
        for n in reversed(self.nodes):
            n.stop()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
