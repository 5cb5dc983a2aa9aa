"""Fetch processes: objects of the disk tiers read, verified, decrypted and decoded in
helper processes instead of on the engine process's fetch threads.

A fetch thread that reads and opens an object in the engine's process takes the GIL back
after every system call and every decryption, and each time it does, the engine's thread
may have to wait for it (``kvgrid.bench.gpu.profile_gil`` measures what that costs). With
``fetch_procs`` set, a fetch thread hands the whole of it to a process: it sends the paths
of a run of objects in one request, waits for the one reply without the GIL, and copies
each verified block out of that process's staging slots (shared memory) into its
destination (a G2 slot), a copy that runs without the GIL too. Everything else stays in the
engine's process: G2's slots, the tiers' ledgers and fault states, metrics and events. The
loads' readahead hints go to a readahead process, one message per hint.

Primitives:
    configure(shape, dtype) size the staging slots (once, at the engine's block)
    read(path, read_only, key, tenant, expect, out)
                            one object: (header, block tensor, bytes read); raises what an
                            in-process read would (OSError, ObjectError), or FetchProcError
                            when a process died or hung (it is started again)
    read_many(reads, expect)
                            up to BATCH objects in one request: a Batch, whose ``take(key,
                            out)`` gives each as ``read`` would
    hint(paths)             readahead of objects soon read (a helper process of its own
                            tells the kernel; the caller never waits for it)
    close()

Each process has BATCH staging slots and serves one request at a time; a fetch thread
holds the process from its request until it has copied the blocks out. A process is a fresh
interpreter (``proc_serve.py``) on a socket pair: no fork of the engine's process with its
CUDA context and threads. It receives the master keys over that socket, never on its
command line. ``write_procs.py`` runs the write-down's processes on the same footing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import torch

from kvgrid.store.crypto import KeyRing
from kvgrid.store.object import ObjectError, ObjectHeader, destination, dtype_name
from kvgrid.store.proc_serve import staged_view

log = logging.getLogger(__name__)

# a process's first reply waits for its interpreter to start and import torch
START_TIMEOUT_S = 120.0
# objects one request opens (slots per process): a request and its reply cost the engine's
# process a few GIL handoffs, whatever their size
BATCH = 4


class FetchProcError(RuntimeError):
    """A helper process (fetch or write) died, hung or failed outside the object's own read
    or write (not a disk fault)."""


def _spawn(kind: str, sock_type: int, *fds: int) -> tuple[socket.socket, subprocess.Popen]:
    """A helper process of ``kind`` and the engine's end of its socket (``fds`` passed on)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, sock_type)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    argv = [sys.executable, "-m", "kvgrid.store.proc_serve", kind, str(theirs.fileno())]
    popen = subprocess.Popen(
        argv + [str(fd) for fd in fds],
        pass_fds=(theirs.fileno(), *fds),
        env=env,
        stdin=subprocess.DEVNULL,
    )
    theirs.close()
    return ours, popen


class _Hinter:
    """The readahead process: paths come as one datagram per hint (SOCK_SEQPACKET: whole
    or not at all), sent without waiting; a hint that finds its queue full is dropped."""

    def __init__(self) -> None:
        self.sock, self.popen = _spawn("hint", socket.SOCK_SEQPACKET)
        self.sent = self.dropped = 0

    def hint(self, paths: list[str]) -> None:
        try:
            self.sock.send("\0".join(paths).encode(), socket.MSG_DONTWAIT)
            self.sent += 1
        except OSError:  # busy (BlockingIOError), or gone: readahead is only a hint
            self.dropped += 1

    def stop(self) -> None:
        self.sock.close()
        try:
            self.popen.wait(2.0)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class _Proc:
    """One helper process and the engine's end of its socket. A reply is waited for with
    the socket's receive timeout (no poll: each system call retakes the GIL)."""

    def __init__(
        self, index: int, role: str, keyring: KeyRing | None, memfd: int, timeout_s: float
    ) -> None:
        self.index, self.name = index, f"{role} process {index}"
        self.timeout_s = timeout_s
        ours, self.popen = _spawn("fetch", socket.SOCK_STREAM, memfd)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(timeout_s), 0))
        self.conn = Connection(ours.detach())
        masters = dict(keyring.masters) if keyring is not None else None
        self.started = False
        try:
            self.conn.send((masters, keyring.current_id if keyring is not None else None))
        except OSError:  # it exited at once: ``ready`` and ``call`` say so
            self.stop()

    def ready(self) -> bool:
        """Whether it has started (its "ready" has come), without waiting; raises
        FetchProcError if it exited before that."""
        if not self.started:
            try:
                if self.conn.poll(0):  # OSError once closed
                    self.conn.recv()
                    self.started = True
            except (OSError, EOFError):
                self.stop()
                raise FetchProcError(
                    f"{self.name} exited at its start (exit code "
                    f"{self.popen.returncode}; its error is on this process's stderr)"
                ) from None
        return self.started

    def call(self, request: tuple):
        try:
            if not self.started:
                self._recv(START_TIMEOUT_S)  # "ready": it has started
                self.started = True
            self.conn.send(request)
            return self._recv(self.timeout_s)
        except (OSError, EOFError) as e:
            self.stop()
            raise FetchProcError(f"{self.name} is gone ({e!r})") from None

    def _recv(self, timeout_s: float):
        end = time.monotonic() + timeout_s
        while True:
            try:
                return self.conn.recv()
            except BlockingIOError:
                if time.monotonic() >= end:
                    self.stop()
                    raise FetchProcError(f"{self.name} gave no reply in {timeout_s:.0f}s") from None

    @property
    def alive(self) -> bool:
        return not self.conn.closed

    def stop(self, wait_s: float = 0.0) -> None:
        """Ask it to exit (``wait_s``: and wait that long), else kill it."""
        if not self.conn.closed:
            if wait_s > 0:
                with contextlib.suppress(OSError):
                    self.conn.send(None)
            self.conn.close()
        try:
            self.popen.wait(max(wait_s, 0.001))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class FetchProcs:
    """``n`` fetch processes and their staging slots (see the module's docstring)."""

    role = "fetch"
    readahead = True  # a readahead process beside them

    def __init__(
        self,
        n: int,
        keyring: KeyRing | None,
        on_error: Callable[[FetchProcError], None],
        timeout_s: float = 30.0,
    ) -> None:
        """``on_error``: told (once) when the processes cannot start; the callers then do
        the work in the engine's process."""
        self.timeout_s = timeout_s
        self._on_error = on_error
        self.slot_bytes = 0
        self._keyring = keyring
        self._memfd = os.memfd_create(f"kvgrid-{self.role}-staging", os.MFD_CLOEXEC)
        self._map: mmap.mmap | None = None
        self._arena: torch.Tensor | None = None
        self._slots: list[list[torch.Tensor]] = []  # per process, its BATCH slots
        self._block: tuple = ()
        self._lock = threading.Lock()
        self._n = n
        self._procs: list[_Proc] = []  # started at the first read that could use them
        self._hinter: _Hinter | None = None
        self._idle: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.closed = False
        self._started = False
        # objects opened in the processes, and requests (not exact across threads)
        self.served = self.requests = 0

    @property
    def pids(self) -> list[int]:
        """The helper processes' (fetch and readahead) once started."""
        hinter = [self._hinter.popen.pid] if self._hinter is not None else []
        return [p.popen.pid for p in self._procs] + hinter

    def configure(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Staging slots for blocks of this shape and type; once (a later, larger block is
        not served: ``fits`` says so and the caller reads in its own process)."""
        with self._lock:
            if self._arena is not None:
                return
            self._block = (tuple(shape), dtype_name(dtype))
            slot_bytes = max(1, math.prod(shape) * dtype.itemsize)
            size = slot_bytes * BATCH * self._n
            os.ftruncate(self._memfd, size)
            self._map = mmap.mmap(self._memfd, size)
            self._arena = torch.frombuffer(self._map, dtype=torch.uint8)
            # each slot viewed once here: a view per block is a torch call (a GIL handoff)
            views = self._arena.view(dtype).view(self._n, BATCH, *shape)
            self._slots = [list(v.unbind(0)) for v in views.unbind(0)]
            self.slot_bytes = slot_bytes

    def fits(self, nbytes: int) -> bool:
        """Whether a block of ``nbytes`` is read here now: the staging slots hold it and the
        processes have started (until then, and if one never does, the caller reads in its
        own process: a load does not wait for an interpreter to start)."""
        if self._arena is None or nbytes > self.slot_bytes or self.closed:
            return False
        if not self._started:
            with self._lock:  # one thread at a time starts them, and reads their "ready"
                if not self._procs:
                    self._procs = [self._proc(i) for i in range(self._n)]
                    self._hinter = _Hinter() if self.readahead else None
                    for i in range(self._n):
                        self._idle.put(i)
                try:
                    self._started = self._started or all(p.ready() for p in self._procs)
                except FetchProcError as e:
                    self.closed = True  # the callers do the work here from now on
                    self._on_error(e)
        return self._started and not self.closed

    def read(
        self,
        path: str,
        read_only: bool,
        key: bytes,
        tenant: bytes,
        expect: tuple,
        out: Callable[[ObjectHeader], torch.Tensor | None] | None,
    ) -> tuple[ObjectHeader, torch.Tensor, int]:
        """One object opened by a fetch process, as ``decode_object`` with ``out`` would
        give it, plus the object's length. ``expect``: (dtype, shape, model fingerprint)."""
        with self.read_many([(path, read_only, key, tenant)], expect) as batch:
            return batch.take(key, out)

    def read_many(self, reads: list[tuple[str, bool, bytes, bytes]], expect: tuple) -> Batch:
        """Up to ``BATCH`` objects, each (path, read_only, key, tenant), opened by one
        process in one request: a ``Batch`` to ``take`` them from, then to close (the
        process serves no one else until then)."""
        if not 0 < len(reads) <= BATCH:
            raise ValueError(f"a batch takes 1 to {BATCH} reads, not {len(reads)}")
        dtype, shape, fingerprint = expect
        i, replies = self._call("read", reads, (dtype and dtype_name(dtype), shape, fingerprint))
        return Batch(self, i, {r[2]: (j, rep) for j, (r, rep) in enumerate(zip(reads, replies))})

    def slot(self, i: int, j: int, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Process ``i``'s staging slot ``j`` as a block of ``dtype`` (its name), ``shape``."""
        if (tuple(shape), dtype) == self._block:
            return self._slots[i][j]
        base = (i * BATCH + j) * self.slot_bytes
        return staged_view(self._arena, base, self.slot_bytes, dtype, shape)

    def _proc(self, i: int) -> _Proc:
        return _Proc(i, self.role, self._keyring, self._memfd, self.timeout_s)

    def _call(self, op: str, items: list, args: tuple, fill: Callable[[int], None] | None = None):
        """(process index, replies) of one request to an idle process, which serves no one
        else until ``_idle`` has the index back; ``fill(i)``: fills process ``i``'s staging
        slots first. A dead process is started again; FetchProcError where it fails."""
        i = self._idle.get()
        try:
            proc = self._procs[i]
            if not proc.alive:
                if self.closed:
                    raise FetchProcError(f"the {self.role} processes are closed")
                log.warning("%s exited (%s); starting another", proc.name, proc.popen.poll())
                proc = self._procs[i] = self._proc(i)
            if fill is not None:
                fill(i)
            base = i * BATCH * self.slot_bytes
            self.requests += 1
            replies = proc.call((op, items, args, self._map.size(), base, self.slot_bytes))
            if isinstance(replies, tuple):  # the request itself failed (a bug)
                raise FetchProcError(f"{proc.name}: {replies[1]}")
        except BaseException:
            self._idle.put(i)
            raise
        return i, replies

    def hint(self, paths: list[str]) -> bool:
        """Have the kernel read these objects ahead (one system call here, however many);
        False if the readahead process has not been started (the caller hints itself)."""
        if self._hinter is None or self.closed:
            return False
        if paths:
            self._hinter.hint(paths)
        return True

    def close(self) -> None:
        with self._lock:
            if self._memfd < 0:
                return
            self.closed = True
            if self._hinter is not None:
                self._hinter.stop()
            for p in self._procs:
                p.stop(wait_s=2.0)
            self._arena = None
            self._slots = []
            if self._map is not None:
                # a tensor still viewing it keeps it: the mapping goes with that
                with contextlib.suppress(BufferError):
                    self._map.close()
            os.close(self._memfd)
            self._memfd = -1


class Batch:
    """The replies of one ``read_many``; its process's slots stay reserved until ``close``."""

    def __init__(self, procs: FetchProcs, index: int, replies: dict[bytes, tuple]) -> None:
        self._procs, self._index, self._replies = procs, index, replies

    def __contains__(self, key: bytes) -> bool:
        return key in self._replies

    def take(
        self, key: bytes, out: Callable[[ObjectHeader], torch.Tensor | None] | None
    ) -> tuple[ObjectHeader, torch.Tensor, int]:
        """``key``'s object as ``read`` gives it (once: a second take of it is a KeyError);
        raises what opening it raised (OSError, ObjectError, FetchProcError)."""
        j, reply = self._replies.pop(key)
        p = self._procs
        if reply[0] == "os":
            raise OSError(reply[1], reply[2])
        if reply[0] == "object":
            raise ObjectError(reply[1], reply[2])
        if reply[0] != "ok":
            raise FetchProcError(f"{p.role} process {self._index}: {reply[1]}")
        p.served += 1
        h, nbytes = reply[1], reply[2]
        dst = destination(h, out) if out is not None else None
        src = p.slot(self._index, j, h.dtype, h.shape)
        if dst is None:
            return h, src.clone(), nbytes
        dst.copy_(src)  # a memcpy without the GIL
        return h, dst, nbytes

    def close(self) -> None:
        if self._index >= 0:
            self._procs._idle.put(self._index)
            self._index = -1

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
