"""Filesystem helpers of the disk tiers (``disk_tier.py``): a lock across threads and
processes waited for within a bound, whole-file reads into a reused buffer, the ledger
file's shape, and whether a writer process still runs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from kvgrid.store.tier import ReadBuffer


@contextlib.contextmanager
def locked(
    lockfd: int, tlock: threading.Lock, timeout_s: float, lock_path: Path, name: str
) -> Iterator[None]:
    """Hold ``tlock`` (this process's threads) and an exclusive flock on ``lockfd`` (other
    processes), waited for at most ``timeout_s`` (TimeoutError, an OSError: a holder
    stopped mid-update must not stop every other writer)."""
    end = time.monotonic() + timeout_s
    if not tlock.acquire(timeout=timeout_s):
        raise TimeoutError(f"{name} lock busy for {timeout_s}s")
    try:
        pause = 0.001
        while True:
            try:
                fcntl.flock(lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= end:
                    raise TimeoutError(
                        f"{lock_path} held by another process for {timeout_s}s"
                    ) from None
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
        try:
            yield
        finally:
            fcntl.flock(lockfd, fcntl.LOCK_UN)
    finally:
        tlock.release()


def valid_ledger(led) -> bool:
    return (
        isinstance(led, dict)
        and _count(led.get("used"))
        and isinstance(led.get("tenants"), dict)
        and all(isinstance(t, str) and _count(n) for t, n in led["tenants"].items())
    )


def _count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def read_into(f, into: ReadBuffer) -> memoryview:
    """The whole file, read into ``into``. Objects are replaced by rename, never written in
    place, so the open file keeps its size; a short read is a truncated object (the
    caller's length check rejects it)."""
    size = os.fstat(f.fileno()).st_size
    view = into.view(size)
    n = 0
    while n < size:
        got = f.readinto(view[n:])
        if not got:
            break
        n += got
    return view[:n]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
