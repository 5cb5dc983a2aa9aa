"""Frames on a transfer connection (after the handshake of ``auth``).

header  u8 kind, u32 aux, u32 payload length (little-endian), then the payload
BLOCK     aux: block index in the transfer (bit 31: it was queued before the previous
          block had been sent, so the gap since that one measures the stream, not the
          prefill);
          payload: one stored object (``kvgrid.store.object``)
PROGRESS  aux: 0; the prefill side is alive and working on the request
END       aux: blocks sent; payload: seconds from the end of the prefill to the last
          block sent (ASCII), or nothing
ABORT     payload: reason (UTF-8)
PROBE     payload: bytes to discard (a raw bandwidth probe)
RESULT    receiver to sender, last: aux blocks landed; payload: outcome (UTF-8), or for
          a probe the JSON of what arrived
"""

from __future__ import annotations

import socket
import struct

BLOCK, PROGRESS, END, ABORT, PROBE, RESULT = 1, 2, 3, 4, 5, 6
BACKLOGGED = 1 << 31
_HEAD = struct.Struct("<BII")
HEAD_BYTES = _HEAD.size
_SMALL = 64 << 10


class ProtocolError(ConnectionError):
    """A frame that breaks the protocol (unknown kind, too long, out of order)."""


def send_frame(sock: socket.socket, kind: int, aux: int = 0, payload=b"") -> None:
    head = _HEAD.pack(kind, aux, len(payload))
    if len(payload) <= _SMALL:
        sock.sendall(head + bytes(payload))
    else:
        sock.sendall(head)
        sock.sendall(payload)


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket; ConnectionError if it closes first."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed")
        got += k


def recv_head(sock: socket.socket) -> tuple[int, int, int]:
    """(kind, aux, payload length) of the next frame."""
    buf = bytearray(HEAD_BYTES)
    recv_into(sock, memoryview(buf))
    return _HEAD.unpack(buf)


def recv_small(sock: socket.socket, length: int, limit: int = _SMALL) -> bytes:
    if length > limit:
        raise ProtocolError(f"control frame of {length} bytes (at most {limit})")
    buf = bytearray(length)
    recv_into(sock, memoryview(buf))
    return bytes(buf)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as a connect address; ValueError if malformed."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad transfer endpoint {endpoint!r}: want HOST:PORT")
    return host.strip("[]"), int(port)
