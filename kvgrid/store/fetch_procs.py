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
interpreter (``python -m kvgrid.store.fetch_procs``) on a socket pair: no fork of the
engine's process with its CUDA context and threads. It receives the master keys over that
socket, never on its command line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import queue
import signal
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
from kvgrid.store.disk_io import advise, read_file
from kvgrid.store.object import (
    ObjectError,
    ObjectHeader,
    decode_object,
    destination,
    dtype_name,
    dtype_of,
)
from kvgrid.store.tier import ReadBuffer

log = logging.getLogger(__name__)

# a process's first reply waits for its interpreter to start and import torch
START_TIMEOUT_S = 120.0
# objects one request opens (slots per process): a request and its reply cost the engine's
# process a few GIL handoffs, whatever their size
BATCH = 4


class FetchProcError(RuntimeError):
    """A fetch process died, hung or failed outside the read itself (not a disk fault)."""


def _spawn(kind: str, sock_type: int, *fds: int) -> tuple[socket.socket, subprocess.Popen]:
    """A helper process of ``kind`` and the engine's end of its socket (``fds`` passed on)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, sock_type)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    argv = [sys.executable, "-m", "kvgrid.store.fetch_procs", kind, str(theirs.fileno())]
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
    """One fetch process and the engine's end of its socket. A reply is waited for with
    the socket's receive timeout (no poll: each system call retakes the GIL)."""

    def __init__(self, index: int, keyring: KeyRing | None, memfd: int, timeout_s: float):
        self.index = index
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
                    f"fetch process {self.index} exited at its start (exit code "
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
            raise FetchProcError(f"fetch process {self.index} is gone ({e!r})") from None

    def _recv(self, timeout_s: float):
        end = time.monotonic() + timeout_s
        while True:
            try:
                return self.conn.recv()
            except BlockingIOError:
                if time.monotonic() >= end:
                    self.stop()
                    raise FetchProcError(
                        f"fetch process {self.index} gave no reply in {timeout_s:.0f}s"
                    ) from None

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

    def __init__(
        self,
        n: int,
        keyring: KeyRing | None,
        on_error: Callable[[FetchProcError], None],
        timeout_s: float = 30.0,
    ) -> None:
        """``on_error``: told (once) when the processes cannot start; loads then read in
        the engine's process."""
        self.timeout_s = timeout_s
        self._on_error = on_error
        self.slot_bytes = 0
        self._keyring = keyring
        self._memfd = os.memfd_create("kvgrid-fetch-staging", os.MFD_CLOEXEC)
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
                    self._procs = [
                        _Proc(i, self._keyring, self._memfd, self.timeout_s) for i in range(self._n)
                    ]
                    self._hinter = _Hinter()
                    for i in range(self._n):
                        self._idle.put(i)
                try:
                    self._started = self._started or all(p.ready() for p in self._procs)
                except FetchProcError as e:
                    self.closed = True  # loads read here from now on
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
        i = self._idle.get()
        try:
            proc = self._procs[i]
            if not proc.alive:
                if self.closed:
                    raise FetchProcError("the fetch processes are closed")
                log.warning("fetch process %d exited (%s); starting another", i, proc.popen.poll())
                proc = self._procs[i] = _Proc(i, self._keyring, self._memfd, self.timeout_s)
            base = i * BATCH * self.slot_bytes
            request = (reads, dtype and dtype_name(dtype), shape, fingerprint,
                       self._map.size(), base, self.slot_bytes)  # fmt: skip
            self.requests += 1
            replies = proc.call(request)
            if isinstance(replies, tuple):  # the request itself failed (a bug)
                raise FetchProcError(f"fetch process {i}: {replies[1]}")
        except BaseException:
            self._idle.put(i)
            raise
        return Batch(self, i, {r[2]: (j, rep) for j, (r, rep) in enumerate(zip(reads, replies))})

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
        if reply[0] == "os":
            raise OSError(reply[1], reply[2])
        if reply[0] == "object":
            raise ObjectError(reply[1], reply[2])
        if reply[0] != "ok":
            raise FetchProcError(f"fetch process {self._index}: {reply[1]}")
        p = self._procs
        p.served += 1
        h, nbytes = reply[1], reply[2]
        dst = destination(h, out) if out is not None else None
        if (h.shape, h.dtype) == p._block:
            src = p._slots[self._index][j]
        else:
            src = _view(p._arena, (self._index * BATCH + j) * p.slot_bytes, p.slot_bytes, h)
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


def _view(arena: torch.Tensor, base: int, slot_bytes: int, h: ObjectHeader) -> torch.Tensor:
    """The staging slot at ``base`` as the block ``h`` describes."""
    dt = dtype_of(h.dtype)
    n = int(torch.Size(h.shape).numel()) * dt.itemsize
    if n > slot_bytes:
        raise ObjectError("mismatch", f"object is {h.dtype}{list(h.shape)}, larger than a block")
    return arena[base : base + n].view(dt).view(h.shape)


def _serve(conn: Connection, memfd: int) -> None:
    """A fetch process: read, verify and decode objects into its staging slots until the
    engine's process closes the socket."""
    masters, current = conn.recv()
    keyring = KeyRing(masters, current) if masters else None
    buf = ReadBuffer()
    mapped: tuple[mmap.mmap, torch.Tensor] | None = None
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        reads, dtype, shape, fingerprint, size, base, slot = request
        try:
            if mapped is None or len(mapped[0]) != size:
                m = mmap.mmap(memfd, size)
                mapped = (m, torch.frombuffer(m, dtype=torch.uint8))
            arena = mapped[1]
            dt = dtype_of(dtype) if dtype else None
            if len(reads) > 1:  # the kernel reads the later ones while the first is opened
                advise([r[0] for r in reads[1:]], "POSIX_FADV_WILLNEED")
            replies: list | tuple = [
                _open(r, keyring, buf, arena, base + j * slot, slot, dt, shape, fingerprint)
                for j, r in enumerate(reads)
            ]
        except Exception as e:  # a bug: named to the engine's process, which counts it
            replies = ("error", repr(e))
        conn.send(replies)


def _open(read: tuple, keyring, buf, arena, base, slot, dt, shape, fingerprint) -> tuple:
    """One object of a request into the staging slot at ``base``: its reply."""
    path, read_only, key, tenant = read
    try:
        data = read_file(path, read_only, buf)
        h, t = decode_object(data, key, tenant, keyring, dt, shape, fingerprint,
                             lambda h: _view(arena, base, slot, h))  # fmt: skip
        dst = _view(arena, base, slot, h)
        if t.data_ptr() != dst.data_ptr():  # a codec that could not decode in place
            dst.copy_(t)
        return ("ok", h, len(data))
    except OSError as e:
        return ("os", e.errno, e.strerror or str(e))
    except ObjectError as e:
        return ("object", e.kind, str(e).partition(": ")[2])


def _advise(sock: socket.socket) -> None:
    """The readahead process: WILLNEED for each path of each hint, until the socket closes."""
    while msg := sock.recv(1 << 20):
        advise(msg.decode().split("\0"), "POSIX_FADV_WILLNEED")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine's process says when to stop
    torch.set_num_threads(1)
    # a closed socket: the engine's process has gone, and so does this one, quietly
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, EOFError):
        if sys.argv[1] == "hint":
            _advise(socket.socket(fileno=int(sys.argv[2])))
        else:
            _serve(Connection(int(sys.argv[2])), int(sys.argv[3]))
