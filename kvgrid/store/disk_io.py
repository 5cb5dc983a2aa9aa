"""Filesystem helpers of the disk tiers (``disk_tier.py``): a lock across threads and
processes waited for within a bound, whole-file reads into a reused buffer, writes of new
temp files, the ledger file's shape, and whether a writer process still runs."""

from __future__ import annotations

import contextlib
import errno
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


# the resolution of the LRU order (atimes): what was used within this long counts as just used
TOUCH_AFTER_S = 30.0


def open_object(path: Path | str, read_only: bool) -> int:
    """An object opened for reading. ``read_only`` (inspection): without moving its
    last-access time (O_NOATIME where the kernel allows it), so the LRU order stays."""
    flags = os.O_RDONLY | (getattr(os, "O_NOATIME", 0) if read_only else 0)
    try:
        return os.open(path, flags)
    except PermissionError:
        return os.open(path, os.O_RDONLY)  # O_NOATIME needs to own the file


def touch(target: Path | str | int, st: os.stat_result | None = None) -> None:
    """Mark an object (a path, or an open descriptor and its stat) as just used: its atime,
    unless that is within ``TOUCH_AFTER_S`` already (a touch is a metadata write, and a
    system call that gives up the GIL). Its mtime (= creation, for TTL) is left exactly as
    it was."""
    with contextlib.suppress(OSError):
        st = st or os.stat(target)
        now = time.time_ns()
        if now - st.st_atime_ns >= TOUCH_AFTER_S * 1e9:
            os.utime(target, ns=(now, st.st_mtime_ns))


def read_object(fd: int, into: ReadBuffer | None) -> tuple[bytes | memoryview, os.stat_result]:
    """The whole file open at ``fd`` (into ``into`` if given), and its stat. Objects are
    replaced by rename, never written in place, so the open file keeps its size; a short
    read is a truncated object (the caller's length check rejects it). One fstat and, as a
    rule, one read: every system call gives up the GIL and retakes it, and each retaking
    can cost the engine's thread more than the call itself."""
    st = os.fstat(fd)
    size = st.st_size
    if into is None:
        data = os.read(fd, size)
        while 0 < len(data) < size:
            more = os.read(fd, size - len(data))
            if not more:
                break
            data += more
        return data, st
    view = into.view(size)
    n = 0
    while n < size:
        got = os.readv(fd, [view[n:]])
        if not got:
            break
        n += got
    return view[:n], st


def read_file(path: str, read_only: bool, into: ReadBuffer | None) -> bytes | memoryview:
    """The whole object at ``path`` (into ``into`` if given), touched for the LRU order
    unless ``read_only``: four system calls as a rule (open, fstat, read, close)."""
    fd = open_object(path, read_only)
    try:
        data, st = read_object(fd, into)
        if not read_only:
            touch(fd, st)
    finally:
        os.close(fd)
    return data


def advise(paths: list[str], advice: str) -> None:
    """``posix_fadvise`` (``advice``: its name, as POSIX_FADV_WILLNEED) on each whole file;
    missing files are skipped."""
    flag = getattr(os, advice, None)
    if flag is None:
        return
    for path in paths:
        try:  # non-blocking: a special file put in the directory must not hold the caller
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, flag)
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_new(path: str, blob) -> int:
    """Create ``path`` (it must not exist; owner-only) holding ``blob``: its open fd. A
    failed write removes the file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(blob).cast("B")
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


def write_new(path: str, blob, sync: bool) -> None:
    """``create_new``, synced (``sync``) and closed: a temp file written outside the tier's
    process (``proc_serve.py``)."""
    fd = create_new(path, blob)
    try:
        if sync:
            os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)


def fsync_dir(d: Path | str) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def clean_tmp(tmp: Path, host: str, stale_s: float) -> int:
    """Remove the temp files of writers that are gone: on this host (``host``), those whose
    process has exited; from other hosts, those older than ``stale_s``. How many went."""
    removed = 0
    now = time.time()
    for e in os.scandir(tmp):
        owner, _, rest = e.name.partition("-")
        pid = rest.partition("-")[0]
        try:
            if owner == host and pid.isdigit():
                stale = not pid_alive(int(pid))
            else:
                stale = now - e.stat().st_mtime > stale_s
            if stale:
                os.unlink(e.path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def write_meta(dst: Path, tmp_dir: Path, data: bytes, replace: bool) -> bool:
    """Write ``dst`` whole, synced (through a temp file in ``tmp_dir``); unless ``replace``,
    only where no one has written it yet. Whether it was written."""
    tmp = tmp_dir / f"{dst.name}.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if replace:
            os.replace(tmp, dst)
            return True
        try:
            os.link(tmp, dst)  # fails if another server wrote it first
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def rename_into(src: str, folder: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` in ``folder``, creating the folder only where it is missing
    (it exists as a rule: no mkdir per object)."""
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        os.rename(src, dst)
