"""Stopping the servers a benchmark starts."""

from __future__ import annotations

import signal
import subprocess


def interrupt(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGINT (the server's own clean-up runs), then a kill once ``timeout_s`` has passed."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
