"""A raw bandwidth probe of the transfer channel: bytes, no object format, no verification.

The ceiling a transfer's stream is set against, measured on the same authenticated
connection a transfer uses: the receiving worker expects the probe (its id and ticket, as
for a transfer; ``POST /transfer/probe/expect``), the sending one runs it
(``POST /transfer/probe``).
"""

from __future__ import annotations

import json
import socket
import threading
import time

from kvgrid.transfer import auth, wire

PROBE_TTL_S = 30.0  # an expected probe not started by then is forgotten


class ExpectedProbes:
    """The probes a receiver has been told to expect: each id once, within its time."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._probes: dict[bytes, tuple[bytes, float]] = {}  # id -> (ticket, expiry)
        self._lock = threading.Lock()

    def __contains__(self, pid: bytes) -> bool:
        with self._lock:
            return pid in self._probes

    def add(self, pid: bytes, ticket: bytes, ttl_s: float = PROBE_TTL_S) -> None:
        auth.check_grant(pid, ticket)
        now = time.monotonic()
        with self._lock:
            for k in [k for k, (_, exp) in self._probes.items() if exp < now]:
                del self._probes[k]
            if pid in self._probes:
                raise ValueError(f"probe {pid.hex()} is already expected")
            if len(self._probes) >= self.limit:
                raise ValueError(f"{self.limit} probes are already expected")
            self._probes[pid] = (ticket, now + ttl_s)

    def claim(self, pid: bytes) -> tuple[int, bytes] | None:
        """(handshake status, ticket) of probe ``pid``, None if it is not one; changes
        nothing."""
        with self._lock:
            got = self._probes.get(pid)
        if got is None:
            return None
        ticket, expiry = got
        return (auth.OK if time.monotonic() <= expiry else auth.UNKNOWN), ticket

    def take(self, pid: bytes) -> bool:
        """Whether ``pid`` is an expected probe, which it then is no longer (one use)."""
        with self._lock:
            return self._probes.pop(pid, None) is not None


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
