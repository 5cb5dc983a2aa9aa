"""The helper processes' side of ``fetch_procs.py`` and ``write_procs.py``: a fresh
interpreter (``python -m kvgrid.store.proc_serve KIND FD [MEMFD]``) serving the engine's
process over a socket, with staging slots in shared memory.

    fetch   requests of two kinds, one at a time:
            ("read", reads, ...)   objects read, verified, decrypted and decoded into the
                                   staging slots (a fetch process)
            ("write", items, ...)  blocks in the staging slots encoded, encrypted and
                                   written to new temp files (a write process)
    hint    readahead of the paths of each datagram (``POSIX_FADV_WILLNEED``)

The master keys come over the socket first, never on the command line. A request that
fails as a whole (a bug) is answered ("error", why); each object's own failure is in its
reply, as the engine's process would have raised it.
"""

from __future__ import annotations

import contextlib
import mmap
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection

import torch

from kvgrid.store.crypto import KeyRing
from kvgrid.store.disk_io import advise, read_file, write_new
from kvgrid.store.object import (
    ObjectError,
    decode_object,
    dtype_of,
    encode_object,
    max_object_len,
)
from kvgrid.store.tier import ReadBuffer


def staged_view(arena: torch.Tensor, base: int, slot_bytes: int, dtype: str, shape) -> torch.Tensor:
    """The staging slot at ``base`` as a block of ``dtype`` and ``shape``; an ObjectError
    where such a block is larger than a slot."""
    dt = dtype_of(dtype)
    n = int(torch.Size(shape).numel()) * dt.itemsize
    if n > slot_bytes:
        raise ObjectError("mismatch", f"object is {dtype}{list(shape)}, larger than a block")
    return arena[base : base + n].view(dt).view(shape)


def serve(conn: Connection, memfd: int) -> None:
    """Serve requests into and out of the staging slots until the engine's process closes
    the socket."""
    masters, current = conn.recv()
    keyring = KeyRing(masters, current) if masters else None
    buf = ReadBuffer()
    out = bytearray()
    mapped: tuple[mmap.mmap, torch.Tensor] | None = None
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        op, items, args, size, base, slot = request
        try:
            if mapped is None or len(mapped[0]) != size:
                m = mmap.mmap(memfd, size)
                mapped = (m, torch.frombuffer(m, dtype=torch.uint8))
            arena = mapped[1]
            if op == "read":
                replies: list | tuple = _read(items, args, keyring, buf, arena, base, slot)
            elif op == "write":
                need = max_object_len(slot)
                if len(out) < need:
                    out = bytearray(need)
                replies = _write(items, args, keyring, out, arena, base, slot)
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as e:  # a bug: named to the engine's process, which counts it
            replies = ("error", repr(e))
        conn.send(replies)


def _read(reads: list, args: tuple, keyring, buf, arena, base: int, slot: int) -> list:
    dtype, shape, fingerprint = args
    dt = dtype_of(dtype) if dtype else None
    if len(reads) > 1:  # the kernel reads the later ones while the first is opened
        advise([r[0] for r in reads[1:]], "POSIX_FADV_WILLNEED")
    return [
        _open(r, keyring, buf, arena, base + j * slot, slot, dt, shape, fingerprint)
        for j, r in enumerate(reads)
    ]


def _open(read: tuple, keyring, buf, arena, base, slot, dt, shape, fingerprint) -> tuple:
    """One object of a request into the staging slot at ``base``: its reply."""
    path, read_only, key, tenant = read
    try:
        data = read_file(path, read_only, buf)

        def into(h):
            return staged_view(arena, base, slot, h.dtype, h.shape)

        h, t = decode_object(data, key, tenant, keyring, dt, shape, fingerprint, into)
        dst = into(h)
        if t.data_ptr() != dst.data_ptr():  # a codec that could not decode in place
            dst.copy_(t)
        return ("ok", h, len(data))
    except OSError as e:
        return ("os", e.errno, e.strerror or str(e))
    except ObjectError as e:
        return ("object", e.kind, str(e).partition(": ")[2])


def _write(items: list, args: tuple, keyring, out, arena, base: int, slot: int) -> list:
    """Each item, (key, parent key, tenant, tokens, dtype, shape, [(temp path, sync)]), is
    the block in its staging slot: encoded once, then written to each of its temp files.
    Its reply: ("ok", object length, [(None or (errno, message), seconds) per file]), the
    seconds those of the write alone (the tier's write rate, ``codec.pays``)."""
    codec, level, lossy, fingerprint, layout, rate = args
    replies = []
    for j, (key, parent, tenant, tokens, dtype, shape, files) in enumerate(items):
        block = staged_view(arena, base + j * slot, slot, dtype, shape)
        blob = encode_object(block, key, parent, tenant, tokens, keyring, codec, level, lossy,
                             fingerprint, layout, out=out, write_bytes_per_s=rate)  # fmt: skip
        done = []
        for path, sync in files:
            t0 = time.perf_counter()
            try:
                write_new(path, blob, sync)
                err = None
            except OSError as e:
                err = (e.errno, e.strerror or str(e))
            done.append((err, time.perf_counter() - t0))
        replies.append(("ok", len(blob), done))
    return replies


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
            serve(Connection(int(sys.argv[2])), int(sys.argv[3]))
