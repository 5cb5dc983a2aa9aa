"""A real redis-server (Debian's package) on 127.0.0.1, started and stopped by the campaign
and the tests: no persistence, so a restarted server is an empty one."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


class RedisUnavailable(RuntimeError):
    """redis-server is not installed."""


def redis_binary() -> str | None:
    return shutil.which("/usr/bin/redis-server") or shutil.which("redis-server")


def start_redis(
    port: int,
    workdir: str | Path,
    maxmemory: int = 0,
    also_bind: str | None = None,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen:
    """A redis-server on ``port`` of 127.0.0.1 (and of ``also_bind``), answering when this
    returns. ``extra``: more server arguments (``--requirepass``, ...)."""
    binary = redis_binary()
    if binary is None:
        raise RedisUnavailable("redis-server is not installed (apt-get install redis-server)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    bind = ["127.0.0.1"] + ([also_bind] if also_bind else [])
    args = [binary, "--port", str(port), "--bind", *bind, "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--dir", str(workdir)]  # fmt: skip
    if maxmemory:
        args += ["--maxmemory", str(maxmemory)]
    args += list(extra)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"redis-server did not start on port {port}")
