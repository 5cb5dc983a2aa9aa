"""G3 (a local directory) and G4 on a shared POSIX filesystem (NFS, VAST, Lustre).

Layout under the root:
    objects/<tenant id hex>/<block key hex>.kvo   one object per block; atime = last use
    tmp/<host>-<pid>-<random>.tmp                 writes in progress
    ledger.json                                   bytes used, in all and per tenant
    .lock                                         flock: serialises ledger and eviction
    .owner                                        flock: held by a sole owner (G3)

A write goes: reserve its bytes in the ledger (evicting LRU objects first if that crosses
the high watermark), write a temp file, then rename it into place (a batch of writes,
``stage`` then ``commit``). With ``fsync`` each file is synced before its rename and the
directory after (once per batch): objects then survive a power cut. Either way only
complete objects are ever visible under their name (an object a power cut tore fails its
check when read), and since space is reserved before the bytes land, usage never exceeds
capacity, even with several processes (workers of one machine, or many machines on a
shared path) writing at once. A process killed mid-write leaves a temp file, removed at
the next open (or by age on other hosts), and at worst an over-reservation that the next
open's rescan corrects.

Lookups run on the engine's thread (each block of a prompt, each block leaving G1). A tier
opened ``sole`` (G3, a worker's own folder) takes the ``.owner`` flock and answers them all
from memory: the objects its opening scan found, plus its writes, less its deletions. A stat
there could wait for the directory behind the write-down's renames and deletions, then for
the GIL that G3's busy threads hold. A shared directory (G4, or a G3 whose flock another
process holds) is its own index: a block not known here costs one stat(), so other
processes' objects are seen at once; their deletion of a known one shows when its read
misses. The ledger is rebuilt from a scan at open, and whenever it is found damaged.

Faults turn the tier off rather than fail the process (``ObjectTier._fail``): a full or
read-only directory, an I/O error, a lock another process holds for longer than
``lock_timeout_s`` (a writer stopped mid-update). A tier that cannot be opened at start is
off from the start, and every ``retry_s`` the next use tries to open it again.
A ``read_only`` tier (inspection tools) never writes, creates, deletes or touches a file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from kvgrid import failpoints
from kvgrid.store.disk_io import (
    advise,
    clean_tmp,
    create_new,
    fsync_dir,
    locked,
    open_object,
    read_file,
    rename_into,
    touch,
    valid_ledger,
    write_meta,
)
from kvgrid.store.tier import (
    ObjectInfo,
    ObjectTier,
    PutResult,
    ReadBuffer,
    Staged,
    watermark_target,
)

log = logging.getLogger(__name__)

SUFFIX = ".kvo"
_STALE_TMP_S = 3600.0  # another host's temp file older than this is abandoned


T = TypeVar("T")


class DiskTier(ObjectTier):
    def __init__(
        self,
        root: str | Path,
        capacity: int,
        name: str = "G3",
        backend: str = "disk",
        high: float = 0.95,
        low: float = 0.85,
        fsync: bool = True,
        retry_s: float = 30.0,
        lock_timeout_s: float = 5.0,
        read_only: bool = False,
        sole: bool = False,
    ) -> None:
        self.root = Path(root)
        self.capacity, self.name, self.backend = int(capacity), name, backend
        self.high, self.low, self.fsync = high, low, fsync
        self.lock_timeout_s, self.read_only = lock_timeout_s, read_only
        self.objects, self.tmp = self.root / "objects", self.root / "tmp"
        self._host = socket.gethostname().replace("-", "_")
        self._tlock = threading.Lock()
        self._lockfd: int | None = None
        self._ownerfd: int | None = None
        self.sole = False  # owner of the directory: lookups answered from memory alone
        self._want_sole = sole and not read_only
        self.removed_tmp = 0
        # (tenant id, key) -> creation time of the objects this process wrote or found here
        # (dropped as it deletes them): a lookup of a prompt's blocks is answered without a
        # stat per block. Another process's deletions show only when a read misses.
        self._present: dict[tuple[bytes, bytes], float] = {}
        self.ledger_repairs = 0  # damaged ledgers rebuilt from the directory
        self._init_health(retry_s)
        if not read_only:
            try:
                self._open()
            except OSError as e:
                self._fail(e)

    def _open(self) -> None:
        """Create the layout, take the lock file, drop dead writers' temp files and recount
        usage; raises OSError when the directory cannot be used."""
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._present.clear()
        if self._lockfd is None:
            # read-only is enough for flock, and holds no write access to the filesystem
            # (which would keep it from being remounted read-only, by an operator or the kernel)
            self._lockfd = os.open(self.root / ".lock", os.O_RDONLY | os.O_CREAT, 0o600)
        if self._want_sole and self._ownerfd is None:
            self._own()
        with self._locked():
            self.removed_tmp += clean_tmp(self.tmp, self._host, _STALE_TMP_S)
            self._read_ledger()  # only to report a damaged one: it is recounted anyway
            self._write_ledger(self._scan_ledger(self._present if self.sole else None))

    def _own(self) -> None:
        """Take the directory's ``.owner`` flock, held until ``close``; without it (another
        process holds it) lookups stat what memory does not know."""
        fd = os.open(self.root / ".owner", os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            log.warning("%s at %s is another process's: lookups stat it", self.name, self.root)
            return
        self._ownerfd, self.sole = fd, True

    def _probe(self) -> None:
        self._open()
        # a directory that takes no new file is still full (or read-only)
        probe = self.tmp / f"{self._host}-{os.getpid()}-probe.tmp"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, bytes(4096))
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                probe.unlink()

    # ---- paths, locking, ledger ---------------------------------------------------------

    def path(self, tid: bytes, key: bytes) -> Path:
        return Path(self._file_in(self._tenant_dir(tid), key))

    # the layout as plain strings: per-block checks spent half of their time in pathlib
    def _tenant_dir(self, tid: bytes) -> str:
        return os.path.join(self.objects, tid.hex())

    @staticmethod
    def _file_in(tenant_dir: str, key: bytes) -> str:
        return os.path.join(tenant_dir, key.hex() + SUFFIX)

    def _locked(self):
        """The ledger lock (``disk_io.locked``); an OSError when the tier is not open."""
        if self._lockfd is None:
            raise OSError(errno.EBADF, f"{self.name} at {self.root} is not open")
        return locked(
            self._lockfd, self._tlock, self.lock_timeout_s, self.root / ".lock", self.name
        )

    def _read_ledger(self) -> dict:
        path = self.root / "ledger.json"
        try:
            with self._open_read(path) as f:
                led = json.loads(f.read())
        except FileNotFoundError:
            return self._scan_ledger()
        except (OSError, ValueError) as e:
            return self._repair_ledger(repr(e))
        if valid_ledger(led):
            return led
        return self._repair_ledger("unexpected content")

    def _repair_ledger(self, why: str) -> dict:
        """A damaged ledger: the directory is the truth (the caller writes the recount)."""
        self.ledger_repairs += 1
        log.warning("%s ledger %s damaged (%s): recounted from the directory",
                    self.name, self.root / "ledger.json", why)  # fmt: skip
        if self.on_state is not None:
            self.on_state(self, True, "ledger")
        return self._scan_ledger()

    def _write_ledger(self, led: dict) -> None:
        if self.read_only:
            return
        led["tenants"] = {t: n for t, n in led["tenants"].items() if n > 0}
        tmp = self.root / f"ledger.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(led))
        os.replace(tmp, self.root / "ledger.json")

    def _scan_ledger(self, present: dict | None = None) -> dict:
        """Usage from the directory; ``present``: filled with every object found."""
        tenants: dict[str, int] = {}
        for info in self._scan():
            t = info.tenant_id.hex()
            tenants[t] = tenants.get(t, 0) + info.size
            if present is not None:
                present[(info.tenant_id, info.key)] = info.created
        # temp files of writers still running hold reservations too
        pending = 0
        with contextlib.suppress(FileNotFoundError):
            for e in os.scandir(self.tmp):
                with contextlib.suppress(FileNotFoundError):
                    pending += e.stat().st_size if e.is_file() else 0
        return {"used": sum(tenants.values()) + pending, "tenants": tenants}

    def _scan(self, tid: bytes | None = None) -> Iterator[ObjectInfo]:
        dirs = [Path(self._tenant_dir(tid))] if tid is not None else self._tenant_dirs()
        for d in dirs:
            try:
                entries = list(os.scandir(d))
            except FileNotFoundError:
                continue
            t = bytes.fromhex(os.path.basename(d))
            for e in entries:
                if not e.name.endswith(SUFFIX) or len(e.name) != 64 + len(SUFFIX):
                    continue
                try:
                    st = e.stat()
                    key = bytes.fromhex(e.name[:64])
                except (FileNotFoundError, ValueError):
                    continue
                yield ObjectInfo(t, key, st.st_size, st.st_mtime, st.st_atime)

    def _tenant_dirs(self) -> list[Path]:
        out = []
        if not self.objects.is_dir():
            return out
        for e in os.scandir(self.objects):
            if e.is_dir() and len(e.name) == 32:
                with contextlib.suppress(ValueError):
                    bytes.fromhex(e.name)
                    out.append(Path(e.path))
        return out

    # ---- eviction (caller holds the lock) ----------------------------------------------

    def _evict(self, led: dict, target: int, tid: bytes | None, reason: str, out: list) -> None:
        """Delete least recently used objects (of ``tid``, or all) until usage <= target."""

        def usage() -> int:
            return led["used"] if tid is None else led["tenants"].get(tid.hex(), 0)

        if usage() <= target:
            return
        for info in sorted(self._scan(tid), key=lambda i: i.last_access):
            if usage() <= target:
                break
            if self._unlink(led, info.tenant_id, info.key):
                out.append((info.tenant_id, info.key, reason))

    def _unlink(self, led: dict, tid: bytes, key: bytes) -> bool:
        p = self.path(tid, key)
        self._present.pop((tid, key), None)
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return False
        led["used"] = max(0, led["used"] - size)
        t = tid.hex()
        led["tenants"][t] = max(0, led["tenants"].get(t, 0) - size)
        return True

    # ---- the tier interface -------------------------------------------------------------

    def put(self, tid: bytes, key: bytes, blob: bytes, quota: int | None = None) -> PutResult:
        if self.read_only:
            return PutResult(False, reason="read_only")
        return self.commit([self.stage(tid, key, blob, quota)])[0]

    def stage(self, tid: bytes, key: bytes, blob, quota: int | None = None) -> Staged:
        """Reserve the object's bytes and write its temp file (not yet synced: ``commit``
        syncs a batch of them, then renames them into place)."""
        st = Staged(tid, key, len(blob))
        if self.read_only:
            st.result = PutResult(False, reason="read_only")
            return st
        if not self.up:
            st.result = PutResult(False, reason="tier_off")
            return st
        try:
            self._stage(st, blob, quota)
        except OSError as e:
            self._failed(st, e)
        return st

    def adopt_many(self, written: list[tuple], errors: list[OSError | None]) -> list[Staged]:
        """``stage`` for objects a write process has put in temp files (named by
        ``tmp_path``, synced if this tier syncs), each (tenant id, key, temp path, size,
        quota), or failed to (its ``errors`` entry: the tier is off, as after a failed write
        here). Their bytes are reserved in one ledger update, and ``commit`` renames them
        into place; the files of those not taken go."""
        out = [Staged(tid, key, size) for tid, key, _, size, _ in written]
        todo = []
        for i, (st, err) in enumerate(zip(out, errors)):
            if err is not None:
                self._fail(err)
                st.result = PutResult(False, reason="error")
            elif self.read_only or not self.up:
                st.result = PutResult(False, reason="read_only" if self.read_only else "tier_off")
            else:
                todo.append(i)
        try:
            reserved = self._reserve([(out[i], written[i][4]) for i in todo])
        except OSError as e:
            for i in todo:
                self._failed(out[i], e)
        else:
            for i, ok in zip(todo, reserved):
                out[i].tmp = written[i][2] if ok else ""
        for st, w in zip(out, written):
            if not st.tmp:
                with contextlib.suppress(OSError):
                    os.unlink(w[2])
        return out

    def tmp_path(self) -> str:
        """A new temp file's name: this process's, so an open after it exits removes it."""
        return str(self.tmp / f"{self._host}-{os.getpid()}-{secrets.token_hex(6)}.tmp")

    def _stage(self, st: Staged, blob, quota: int | None) -> None:
        if not self._reserve([(st, quota)])[0]:
            return
        st.tmp = self.tmp_path()
        try:
            st.fd = create_new(st.tmp, blob)
        except OSError as e:
            self._failed(st, e)

    def _reserve(self, todo: list[tuple[Staged, int | None]]) -> list[bool]:
        """Reserve each object's bytes (evicting to make room), in one ledger update; per
        object, False with ``st.result`` set where it is not to be written (held already,
        or no room). An OSError (the lock, the ledger) reserves none."""
        ok = [False] * len(todo)
        rest = []
        for i, (st, quota) in enumerate(todo):
            path = self._file_in(self._tenant_dir(st.tid), st.key)  # no pathlib per object
            # same key, same bytes: keep the durable copy (a sole owner knows them all)
            if (st.tid, st.key) in self._present if self.sole else os.path.exists(path):
                self._touch(path)
                st.result = PutResult(True)
            elif st.size > self.capacity:
                st.result = PutResult(False, reason="too_big")
            elif quota is not None and st.size > quota:
                st.result = PutResult(False, reason="quota")
            else:
                rest.append(i)
        if not rest:
            return ok
        with self._locked():
            led = self._read_ledger()
            for i in rest:
                ok[i] = self._reserve_in(led, *todo[i])
            self._write_ledger(led)
        return ok

    def _reserve_in(self, led: dict, st: Staged, quota: int | None) -> bool:
        tid, size = st.tid, st.size
        if quota is not None:
            self._evict(led, quota - size, tid, "quota", st.evicted)
            if led["tenants"].get(tid.hex(), 0) + size > quota:
                st.result = PutResult(False, st.evicted, "quota")
                return False
        target = watermark_target(self.capacity, self.high, self.low, led["used"], size)
        if target is not None:
            self._evict(led, target, None, "capacity", st.evicted)
        if led["used"] + size > self.capacity:
            st.result = PutResult(False, st.evicted, "full")
            return False
        led["used"] += size
        led["tenants"][tid.hex()] = led["tenants"].get(tid.hex(), 0) + size
        return True

    def commit(self, staged: list[Staged]) -> list[PutResult]:
        """Sync the staged temp files, rename them into place, then sync each directory
        once: a batch shares the directory flushes, and its files' data go to the disk
        together, not one flush per file."""
        todo = [s for s in staged if s.result is None]
        for s in todo:
            try:
                if self.fsync and s.fd >= 0:  # an adopted file was synced by its writer
                    os.fsync(s.fd)
            except OSError as e:
                self._failed(s, e)
            finally:
                with contextlib.suppress(OSError):
                    if s.fd >= 0:
                        os.close(s.fd)
                s.fd = -1
        dirs: dict[str, list[Staged]] = {}
        for s in todo:
            if s.result is not None:
                continue
            d = self._tenant_dir(s.tid)
            try:
                rename_into(s.tmp, d, self._file_in(d, s.key))
                dirs.setdefault(d, []).append(s)
            except OSError as e:
                self._failed(s, e)
        for d, group in dirs.items():
            try:
                if self.fsync:
                    fsync_dir(d)
                err = None
            except OSError as e:
                err = e
            now = time.time()
            for s in group:
                if err is None:
                    s.result = PutResult(True, s.evicted)
                    self._present[(s.tid, s.key)] = now
                else:  # renamed, but not known durable: not offered as stored
                    with contextlib.suppress(OSError):
                        self.delete(s.tid, s.key)
                    self._fail(err)
                    s.result = PutResult(False, s.evicted, "error")
        return [s.result for s in staged]

    def _failed(self, s: Staged, e: OSError) -> None:
        """A staged write failed: its temp file and its reservation go, the tier is off."""
        if s.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(s.fd)
            s.fd = -1
        if s.tmp:
            with contextlib.suppress(OSError):
                os.unlink(s.tmp)
            # the reservation goes back; if even that fails, the next open's recount fixes it
            with contextlib.suppress(OSError), self._locked():
                led = self._read_ledger()
                led["used"] = max(0, led["used"] - s.size)
                t = s.tid.hex()
                led["tenants"][t] = max(0, led["tenants"].get(t, 0) - s.size)
                self._write_ledger(led)
        self._fail(e)
        s.result = PutResult(False, s.evicted, "error")

    def get(self, tid: bytes, key: bytes, into: ReadBuffer | None = None) -> bytes | None:
        return self.read_with(tid, key, lambda path, ro: read_file(path, ro, into))

    def read_with(self, tid: bytes, key: bytes, read: Callable[[str, bool], T]) -> T | None:
        """``read(path, read_only)`` of the object's file, under this tier's state: None if
        the tier is off or the object absent; an OSError turns the tier off and is raised
        (the store counts and logs it: a miss for the engine). A fetch process reads
        through this too (``fetch_procs.py``)."""
        if not self.up:
            return None
        if failpoints.ENABLED and failpoints.active().disk_read_delay_s:
            time.sleep(failpoints.active().disk_read_delay_s)  # a slow disk (kvgrid chaos)
        path = self._file_in(self._tenant_dir(tid), key)  # a string: no pathlib per block
        try:
            return read(path, self.read_only)
        except FileNotFoundError:
            self._present.pop((tid, key), None)
            return None
        except OSError as e:
            self._fail(e)
            raise

    def read_meta(self, name: str) -> bytes | None:
        try:
            return (self.root / f"meta-{name}").read_bytes()
        except FileNotFoundError:
            return None

    def write_meta(self, name: str, data: bytes, replace: bool = False) -> bool:
        return write_meta(self.root / f"meta-{name}", self.tmp, data, replace)

    def will_need(self, tid: bytes, keys: list[bytes]) -> None:
        # the kernel queues the reads of the whole file and returns: the fetch threads find
        # it in the page cache (or in flight) instead of waiting for the disk one by one
        self._advise(tid, keys, "POSIX_FADV_WILLNEED")

    def wont_need(self, tid: bytes, keys: list[bytes]) -> None:
        self._advise(tid, keys, "POSIX_FADV_DONTNEED")

    def paths(self, tid: bytes, keys: list[bytes]) -> list[str]:
        d = self._tenant_dir(tid)
        return [self._file_in(d, k) for k in keys]

    def _advise(self, tid: bytes, keys: list[bytes], advice: str) -> None:
        if self.up:
            advise(self.paths(tid, keys), advice)

    def read_prefix(self, tid: bytes, key: bytes, n: int) -> bytes | None:
        try:
            with self._open_read(self.path(tid, key)) as f:
                return f.read(n)
        except FileNotFoundError:
            return None

    def _open_read(self, path: Path):
        return open(open_object(path, self.read_only), "rb", buffering=0)

    def _touch(self, target: Path | str) -> None:
        if not self.read_only:
            touch(target)

    def known_many(self, tid: bytes, keys: list[bytes]) -> list[float | None]:
        # what this process wrote or found here: no stat per block for the engine's thread
        present = self._present if self.up else {}
        return [present.get((tid, k)) for k in keys]

    def created_many(self, tid: bytes, keys: list[bytes]) -> list[float | None]:
        if not self.up:
            return [None] * len(keys)
        present = self._present
        if self.sole:
            return [present.get((tid, k)) for k in keys]
        d = self._tenant_dir(tid)  # at admission, once per block of a prompt
        out: list[float | None] = []
        try:
            for k in keys:
                c = present.get((tid, k))
                if c is None:
                    with contextlib.suppress(FileNotFoundError):
                        c = present[(tid, k)] = os.stat(self._file_in(d, k)).st_mtime
                out.append(c)
        except OSError as e:
            self._fail(e)
            raise  # the store counts and logs it (a miss for the engine)
        return out

    def delete(self, tid: bytes, key: bytes) -> bool:
        if self.read_only:
            return False
        try:
            with self._locked():
                led = self._read_ledger()
                ok = self._unlink(led, tid, key)
                self._write_ledger(led)
        except OSError as e:
            self._fail(e)
            return False
        return ok

    def list(self, tid: bytes | None = None) -> Iterator[ObjectInfo]:
        return self._scan(tid)

    def used(self, tid: bytes | None = None) -> int:
        try:
            if self.read_only or self._lockfd is None:
                led = self._read_ledger()
            else:
                with self._locked():
                    led = self._read_ledger()
        except OSError:
            return 0
        return led["used"] if tid is None else led["tenants"].get(tid.hex(), 0)

    def clear(self, tid: bytes | None = None) -> int:
        if self.read_only:
            return 0
        with self._locked():
            led = self._read_ledger()
            n = sum(self._unlink(led, i.tenant_id, i.key) for i in list(self._scan(tid)))
            self._write_ledger(led)
        return n

    def rescan(self) -> None:
        """Recount usage from the directory (drops stale reservations)."""
        with self._locked():
            self._write_ledger(self._scan_ledger())

    def close(self) -> None:
        for fd in (self._lockfd, self._ownerfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lockfd = self._ownerfd = None
        self.sole = False
