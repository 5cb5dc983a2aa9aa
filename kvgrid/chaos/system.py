"""The system under test: `kvgrid serve --workers N` with its context store (G2, G3 on a
small filesystem of its own, G4 on Redis or on a shared path), plus one worker in its own
network namespace that joins the router over a veth link (partitions cut that link).

The store directories are tmpfs mounts so that the campaign can fill them or remount them
read-only; everything lives under one work directory and goes away with ``close()``.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from kvgrid import envs
from kvgrid.chaos import disk
from kvgrid.chaos.netns import Netns, NetnsError
from kvgrid.server.auth import ControlKey
from kvgrid.server.serve import free_port

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class SystemConfig:
    workers: int = 2
    g4: str = "redis"  # "redis" or "fs"
    netns_worker: bool = True
    model: str | None = None  # None: the embedded default model
    # small tiers (a block of the default model is 2.8 MiB): most reuse comes from G3 and G4,
    # so that their faults meet requests
    g2_mib: int = 48
    g3_mib: int = 96  # per worker
    g4_mib: int = 256
    g1_gb: float = 0.06  # small: blocks leave G1 often, so the store is in every request's path
    max_model_len: int = 1024
    stall_timeout_s: float = 6.0  # frontend: a stream silent this long is probed
    heartbeat_timeout_s: float = 6.0
    worker_wait_s: float = 180.0  # requests wait through a router restart (workers reload)
    max_concurrent: int = 64


class System:
    def __init__(self, cfg: SystemConfig, workdir: Path) -> None:
        self.cfg, self.dir = cfg, Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs = self.dir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.admin_token = secrets.token_hex(16)
        master = secrets.token_hex(32)
        self.cluster_key = ControlKey.generate()
        self.env = {
            **os.environ,
            # the cluster key: `kvgrid serve` gives each of its workers only its own key
            envs.KVGRID_CONTROL_KEY.name: self.cluster_key.dumps(),
            envs.KVGRID_ADMIN_TOKEN.name: self.admin_token,
            envs.KVGRID_MASTER_KEY.name: f"1:{master}",  # one key for every worker: G4 is shared
            envs.KVGRID_STORE_DIR.name: str(self.dir / "keys"),
            envs.KVGRID_LOG.name: envs.KVGRID_CHAOS_LOG.get(),
        }
        self.mounts: list[Path] = []
        self.g3 = self._mount("g3", cfg.g3_mib * (cfg.workers + 1) + 64)
        self.g4_dir = self._mount("g4", cfg.g4_mib + 64) if cfg.g4 == "fs" else None
        self.netns: Netns | None = None
        if cfg.netns_worker:
            try:
                self.netns = Netns()
            except NetnsError as e:
                log.warning("no partition fault: %s", e)
        self.host = self.netns.host_ip if self.netns else "127.0.0.1"
        self.redis: subprocess.Popen | None = None
        self.redis_port = 0
        if cfg.g4 == "redis":
            self.redis_port = free_port()
            self.start_redis()
        self.port = free_port(self.host)
        self.url = f"http://{self.host}:{self.port}"
        self.serve: subprocess.Popen | None = None
        self.outside: subprocess.Popen | None = None  # the worker in the namespace
        self.outside_id = f"w{cfg.workers}"
        self.serve_starts = 0

    # ---- parts ------------------------------------------------------------------------

    def _mount(self, name: str, mib: int) -> Path:
        p = disk.mount_tmpfs(self.dir / name, mib * MiB)
        self.mounts.append(p)
        return p

    @property
    def redis_url(self) -> str | None:
        return f"redis://127.0.0.1:{self.redis_port}/0" if self.redis_port else None

    def start_redis(self) -> None:
        from kvgrid.chaos.redis_server import start_redis

        also = self.host if self.netns is not None else None  # the namespaced worker's way in
        # room above the tier's own capacity for Redis's overhead (the tier evicts by it)
        maxmemory = 2 * self.cfg.g4_mib * MiB + 64 * MiB
        self.redis = start_redis(self.redis_port, self.dir / "redis", maxmemory, also_bind=also)

    def _engine_flags(self, outside: bool = False) -> list[str]:
        c = self.cfg
        flags = ["--max-model-len", str(c.max_model_len), "--kv-cache-memory-gb", str(c.g1_gb),
                 "--kv-store-host-gb", str(c.g2_mib / 1024),
                 "--kv-store-disk-gb", str(c.g3_mib / 1024),
                 "--kv-store-shared-gb", str(c.g4_mib / 1024)]  # fmt: skip
        if c.model:
            flags += ["--model", c.model]
        if self.redis_url:
            host = self.host if outside else "127.0.0.1"
            flags += ["--kv-store-redis", f"redis://{host}:{self.redis_port}/0"]
        elif self.g4_dir is not None:
            flags += ["--kv-store-shared-dir", str(self.g4_dir)]
        return flags

    def start_serve(self) -> None:
        c = self.cfg
        argv = [sys.executable, "-m", "kvgrid.cli", "serve", "--workers", str(c.workers),
                "--host", self.host, "--port", str(self.port), "--threads", "1",
                "--max-concurrent", str(c.max_concurrent),
                "--stall-timeout", str(c.stall_timeout_s),
                "--heartbeat-timeout", str(c.heartbeat_timeout_s),
                "--worker-wait", str(c.worker_wait_s),
                "--allow-fault-injection",
                "--kv-store-dir", str(self.g3), *self._engine_flags()]  # fmt: skip
        if self.netns is not None:
            argv.append("--allow-anonymous")  # bound to the link's address, no API keys
        self.serve_starts += 1
        self.serve = self._spawn(argv, f"serve-{self.serve_starts}.log")

    def start_outside(self) -> None:
        """The worker in the network namespace; it announces itself to the router."""
        if self.netns is None:
            return
        port = 18000 + secrets.randbelow(20000)
        argv = [sys.executable, "-m", "kvgrid.cli", "worker", "--host", self.netns.ns_ip,
                "--port", str(port), "--worker-id", self.outside_id, "--threads", "1",
                "--router", self.url, "--kv-store-dir", str(self.g3 / self.outside_id),
                "--allow-fault-injection", *self._engine_flags(outside=True)]  # fmt: skip
        # like a worker on another host: it holds its own key only (it proves it to join)
        own = self.cluster_key.for_worker(self.outside_id).dumps()
        env = {**self.env, envs.KVGRID_CONTROL_KEY.name: own}
        self.outside = self._spawn(self.netns.exec_argv(argv), f"{self.outside_id}.log", env=env)

    def _spawn(self, argv: list[str], log_name: str, env: dict | None = None) -> subprocess.Popen:
        fd = os.open(self.logs / log_name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            return subprocess.Popen(argv, env=env or self.env, stdout=fd, stderr=subprocess.STDOUT)
        finally:
            os.close(fd)

    def start(self, timeout_s: float = 600.0) -> None:
        self.start_serve()
        self.start_outside()
        self.wait_ready(timeout_s)

    @property
    def expected_workers(self) -> int:
        return self.cfg.workers + (1 if self.outside is not None else 0)

    # ---- the admin view ---------------------------------------------------------------

    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_token}"}

    def state(self, timeout_s: float = 10.0) -> dict | None:
        try:
            r = httpx.get(f"{self.url}/admin/state", headers=self.admin_headers(),
                          timeout=timeout_s)  # fmt: skip
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def workers_up(self) -> list[str]:
        st = self.state()
        if not st:
            return []
        return [w for w, s in st["workers"].items() if s.get("up") and s.get("state")]

    def wait_ready(self, timeout_s: float = 600.0, n: int | None = None) -> None:
        """Until ``n`` workers (default: all) are up and answer, or raise."""
        n = self.expected_workers if n is None else n
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.serve is not None and self.serve.poll() is not None:
                raise RuntimeError(f"kvgrid serve exited with {self.serve.returncode}")
            if len(self.workers_up()) >= n:
                return
            time.sleep(1.0)
        raise TimeoutError(f"{n} workers not up after {timeout_s:.0f}s: {self.state()}")

    def worker_pids(self) -> dict[str, int]:
        """The process of every worker up (and answering)."""
        st = self.state() or {}
        return {
            wid: w["state"]["pid"]
            for wid, w in st.get("workers", {}).items()
            if w.get("up") and w.get("state")
        }

    def set_faults(self, spec: dict) -> None:
        """The in-process injection points (kvgrid.failpoints) of every worker up, through
        the router (it holds the workers' credentials)."""
        try:
            r = httpx.post(f"{self.url}/admin/faults", json=spec, headers=self.admin_headers(),
                           timeout=10.0)  # fmt: skip
            missed = [w for w, a in r.json().items() if a is None] if r.status_code == 200 else r
            if missed:
                log.warning("faults not set on %s", missed)
        except (httpx.HTTPError, ValueError) as e:
            log.warning("faults not set: %s", e)

    # ---- stopping ---------------------------------------------------------------------

    def kill_serve(self) -> None:
        """SIGKILL the router process only; its workers see their parent go and stop."""
        if self.serve is not None and self.serve.poll() is None:
            self.serve.kill()
            self.serve.wait()

    def stop_serve(self) -> None:
        if self.serve is None:
            return
        if self.serve.poll() is None:
            self.serve.send_signal(signal.SIGTERM)
            try:
                self.serve.wait(60)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait()

    def close(self) -> None:
        self.stop_serve()
        for p in (self.outside, self.redis):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.netns is not None:
            self.netns.close()
        for m in reversed(self.mounts):
            disk.remount(m, "rw") if _mounted_ro(m) else None
            disk.unmount(m)


def _mounted_ro(path: Path) -> bool:
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 3 and parts[1] == str(path):
                return "ro" in parts[3].split(",")
    return False
