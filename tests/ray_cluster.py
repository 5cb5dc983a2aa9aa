"""A real two-node Ray cluster on this machine: the head in the root network namespace, a
second node in a namespace of its own (its own address, reached over a veth pair).

`ray start` is a daemon launcher; here each node runs as `ray start --block` in a session
of its own, so that every process it starts (GCS, raylet, workers, actors) can be found by
session id and ended, without touching any other Ray on the machine (never `ray stop`).
Ray's footprint is kept small: one CPU per node, no dashboard, no usage stats, the smallest
object store, no memory monitor killing workers on a machine others share.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvgrid.router.sites import SITE_LABEL

RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_memory_monitor_refresh_ms": "0",
    "RAY_DEDUP_LOGS": "0",
}


class Unavailable(RuntimeError):
    """Network namespaces (or Ray) cannot be had on this machine."""


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise Unavailable(f"{' '.join(cmd)}: {r.stderr.strip()}")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _subnet() -> str:
    """A /24 of 10.0.0.0/8 no interface of this machine uses."""
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for _ in range(100):
        net = f"10.{random.randint(160, 250)}.{random.randint(0, 255)}"
        if f"{net}." not in used:
            return net
    raise Unavailable("no free 10.x.y.0/24 subnet")


@dataclass
class RayNode:
    ip: str
    site: str
    proc: subprocess.Popen
    log: Path

    def wait_started(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            if "Ray runtime started" in text:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"Ray node {self.ip} did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops what it started), then SIGKILL to every
        process still in its session (workers and actors the raylet forked)."""
        sid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(sid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        for pid in _session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def _wait_listening(host: str, port: int, node: RayNode, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and node.proc.poll() is None:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"Ray head {host}:{port} not listening:\n{node.log.read_text()[-3000:]}")


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid:  # pid (comm) state ppid pgrp session
            pids.append(int(d.name))
    return pids


@dataclass
class TwoNodeCluster:
    address: str
    head: RayNode
    node: RayNode
    netns: str
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)


def _ray_start(
    args: list[str], ip: str, site: str, tmp: Path, env: dict, netns: str | None
) -> RayNode:
    ray = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]
    cmd = [*ray, "start", "--block", "--node-ip-address", ip, "--num-cpus", "1",
           "--object-store-memory", str(80 * 1024 * 1024), "--disable-usage-stats",
           "--labels", f"{SITE_LABEL}={site}", "--temp-dir", str(tmp), *args]  # fmt: skip
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    log = tmp.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    return RayNode(ip, site, proc, log)


@contextlib.contextmanager
def two_node_cluster(head_site: str = "a", node_site: str = "b"):
    """Yield a TwoNodeCluster; everything it made is gone afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise Unavailable("network namespaces need root and iproute2 (`ip`)")
    sfx = f"{random.randrange(16**5):05x}"
    netns, host_if, ns_if = f"kvr{sfx}", f"kvrh{sfx}", f"kvrn{sfx}"
    net = _subnet()
    head_ip, node_ip = f"{net}.1", f"{net}.2"
    tmp = Path(tempfile.mkdtemp(prefix=f"kvr{sfx}-", dir="/tmp"))
    nodes: list[RayNode] = []
    try:
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _run("ip", "link", "set", ns_if, "netns", netns)
        _run("ip", "addr", "add", f"{head_ip}/24", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "netns", "exec", netns, "ip", "addr", "add", f"{node_ip}/24", "dev", ns_if)
        _run("ip", "netns", "exec", netns, "ip", "link", "set", ns_if, "up")
        _run("ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up")
        env = {**os.environ, **RAY_ENV}
        port = _free_port(head_ip)
        head_ports = ["--port", str(port), "--include-dashboard", "false",
                      "--dashboard-port", str(_free_port("127.0.0.1")),
                      "--dashboard-agent-listen-port", str(_free_port(head_ip))]  # fmt: skip
        head = _ray_start(["--head", *head_ports], head_ip, head_site, tmp / "head", env, None)
        nodes.append(head)
        address = f"{head_ip}:{port}"
        _wait_listening(head_ip, port, head, 60)  # the GCS: the second node may join
        node = _ray_start(["--address", address], node_ip, node_site, tmp / "node", env, netns)
        nodes.append(node)
        head.wait_started(60)
        node.wait_started(60)
        yield TwoNodeCluster(address, head, node, netns, tmp, env)
    finally:
        for n in reversed(nodes):
            n.stop()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
