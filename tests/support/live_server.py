"""Start a real `kvgrid serve` for a test module: its URL once its workers are up; stopped
with SIGINT (its workers with it) when the module is done."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(args: list[str], log: Path, env: dict[str, str], timeout_s: float = 120) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "kvgrid.cli", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kvgrid serve exited: {log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"kvgrid serve not ready in {timeout_s}s")
            time.sleep(0.3)
        yield url
    finally:
        stop(proc, log, wait_s=20, tail=3000)


def stop(
    proc: subprocess.Popen,
    log: Path | None = None,
    sig: int = signal.SIGINT,
    wait_s: float = 30.0,
    tail: int = 4000,
) -> None:
    """Stop a `kvgrid serve` (or worker) as Ctrl-C does (it stops its workers), killing it
    after ``wait_s``, and show the end of its log."""
    proc.send_signal(sig)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if log is not None:
        print(log.read_text()[-tail:])
