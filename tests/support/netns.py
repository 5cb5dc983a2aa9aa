"""Hosts for tests: Linux network namespaces on one bridge, each a machine with its own
address, and a way to run processes and client code "on" one of them.

Needs root and iproute2 (CI runs as root). Every name carries a random suffix, so that
runs in parallel never meet, and ``Net.close`` removes all of it. ``Net.create`` skips the
test loudly when namespaces cannot be made here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@dataclass
class Host:
    name: str
    ns: str
    addr: str
    _pool: ThreadPoolExecutor | None = None

    def call(self, fn, *args, **kw):
        """Run ``fn`` on a thread that lives in this host's network namespace: sockets it
        opens (httpx, ZeroMQ) are this host's."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(8, f"ns-{self.name}", initializer=self._enter)
        return self._pool.submit(fn, *args, **kw).result()

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
        finally:
            os.close(fd)

    def popen(self, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        with open(log, "w") as f:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *argv],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


@dataclass
class Net:
    suffix: str
    subnet: str  # "10.a.b"
    bridge: str
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def create(cls, names: list[str]) -> Net:
        """A bridge and one namespace per name, addresses .2, .3, ... of a random /24."""
        why = None
        if os.geteuid() != 0:
            why = "network namespaces need root"
        elif shutil.which("ip") is None:
            why = "the `ip` command (iproute2) is not installed"
        if why is None:
            suffix = secrets.token_hex(3)
            subnet = f"10.{secrets.randbelow(150) + 100}.{secrets.randbelow(250) + 1}"
            net = cls(suffix, subnet, f"kvb{suffix}")
            try:
                _ip("link", "add", net.bridge, "type", "bridge")
                _ip("link", "set", net.bridge, "up")
                for i, name in enumerate(names):
                    net._add_host(name, i)
                return net
            except OSError as e:
                net.close()
                why = f"cannot make network namespaces here: {e}"
        warnings.warn(f"SKIPPING multi-host tests: {why}", stacklevel=2)
        pytest.skip(f"SKIPPED LOUDLY: {why}")

    def _add_host(self, name: str, i: int) -> None:
        ns = f"kvgrid-{name}-{self.suffix}"
        veth = f"kv{self.suffix}h{i}"
        _ip("netns", "add", ns)
        self.hosts[name] = host = Host(name, ns, f"{self.subnet}.{i + 2}")
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def start(self, host: str, argv: list[str], log: Path, env: dict[str, str]):
        p = self.hosts[host].popen(argv, log, env)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        for h in self.hosts.values():
            if h._pool is not None:
                h._pool.shutdown(wait=False, cancel_futures=True)
            with contextlib.suppress(OSError):
                _ip("netns", "del", h.ns)  # takes its end of the veth pair with it
        with contextlib.suppress(OSError):
            _ip("link", "del", self.bridge)
