"""Ray nodes that this process starts and ends itself: for tests, benchmarks and trials on
one machine (a real cluster is started by its operator, or by KubeRay).

`ray start` launches daemons; here each node runs as `ray start --block` in a process
session of its own, so that every process it starts (GCS, raylet, workers, actors) is found
by session id and ended with it, and no other Ray on the machine is touched (never
`ray stop`, which ends every Ray process of the machine). Ray's own footprint is kept small:
no dashboard, no usage stats, a small object store, no memory monitor killing workers on a
machine that others share.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_memory_monitor_refresh_ms": "0",
    "RAY_DEDUP_LOGS": "0",
}
# `ray start` without the `ray` script on PATH (a wheel unpacked into a --target folder)
RAY_CLI = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RayNode:
    ip: str
    proc: subprocess.Popen
    log: Path
    address: str  # the cluster's (its head's GCS)

    def wait_started(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            if "Ray runtime started" in text:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"Ray node {self.ip} did not start:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops what it started), then SIGKILL to every
        process still in its session (workers and actors the raylet forked)."""
        sid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(sid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def session_pids(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[3]) == sid:  # pid (comm) state ppid pgrp session
            pids.append(int(d.name))
    return pids


def start_node(
    ip: str,
    temp_dir: Path,
    head_address: str | None = None,
    num_cpus: int = 1,
    num_gpus: int | None = None,
    labels: dict[str, str] | None = None,
    object_store_bytes: int = 80 * 1024 * 1024,
    env: dict[str, str] | None = None,
    netns: str | None = None,
) -> RayNode:
    """A head node (``head_address`` None; returns once its GCS listens) or a node joining
    ``head_address``; ``netns``: inside that network namespace."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    cmd = [*RAY_CLI, "start", "--block", "--node-ip-address", ip, "--num-cpus", str(num_cpus),
           "--object-store-memory", str(object_store_bytes), "--disable-usage-stats",
           "--temp-dir", str(temp_dir)]  # fmt: skip
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    if labels:
        cmd += ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
    if head_address is None:
        port = free_port(ip)
        address = f"{ip}:{port}"
        cmd += ["--head", "--port", str(port), "--include-dashboard", "false",
                "--dashboard-port", str(free_port("127.0.0.1")),
                "--dashboard-agent-listen-port", str(free_port(ip))]  # fmt: skip
    else:
        address = head_address
        cmd += ["--address", head_address]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    log = temp_dir.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd,
            env={**(env if env is not None else os.environ), **RAY_ENV},
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    node = RayNode(ip, proc, log, address)
    if head_address is None:
        _wait_listening(node, port, 60.0)
    return node


def _wait_listening(node: RayNode, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and node.proc.poll() is None:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((node.ip, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"Ray head {node.ip}:{port} is not listening:\n{node.tail()}")
