"""A raw bandwidth probe of the transfer channel: bytes, no object format, no verification.

The ceiling a transfer's stream is set against, measured on the same authenticated
connection a transfer uses: the receiving worker expects the probe (its id and ticket, as
for a transfer; ``POST /transfer/probe/expect``), the sending one runs it
(``POST /transfer/probe``).
"""

from __future__ import annotations

import json
import socket
import time

from kvgrid.transfer import auth, wire


def probe_link(
    endpoint: str,
    probe_id: bytes,
    ticket: bytes,
    nbytes: int,
    chunk: int = 8 << 20,
    timeout_s: float = 30.0,
) -> dict:
    """``nbytes`` sent to a receiver in frames of ``chunk`` bytes, dropped there."""
    sock = socket.create_connection(wire.parse_endpoint(endpoint), timeout_s)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        auth.client_handshake(sock, ticket, probe_id)
        buf = memoryview(bytearray(chunk))
        t0 = time.perf_counter()
        sent = 0
        while sent < nbytes:
            n = min(chunk, nbytes - sent)
            wire.send_frame(sock, wire.PROBE, 0, buf[:n])
            sent += n
        wire.send_frame(sock, wire.END)
        kind, _, length = wire.recv_head(sock)
        seconds = time.perf_counter() - t0
        if kind != wire.RESULT:
            raise wire.ProtocolError(f"expected RESULT, got frame kind {kind}")
        seen = json.loads(wire.recv_small(sock, length))
    finally:
        sock.close()
    return {
        "bytes": sent,
        "seconds": seconds,
        "bytes_per_s": sent / max(seconds, 1e-9),
        "receiver": seen,
    }


def serve_probe(conn: socket.socket) -> None:
    """The receiving side (after the handshake): PROBE frames are read and dropped; END
    gets the totals back."""
    buf = memoryview(bytearray(1 << 20))
    total, t0 = 0, None
    while True:
        kind, _, length = wire.recv_head(conn)
        if kind == wire.END:
            wire.recv_small(conn, length)
            break
        if kind != wire.PROBE:
            raise wire.ProtocolError(f"unexpected frame kind {kind} in a probe")
        t0 = t0 if t0 is not None else time.perf_counter()
        left = length
        while left:
            n = min(left, len(buf))
            wire.recv_into(conn, buf[:n])
            left -= n
        total += length
    seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    wire.send_frame(conn, wire.RESULT, 0, json.dumps({"bytes": total, "seconds": seconds}).encode())
