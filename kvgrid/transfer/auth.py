"""The transfer channel's handshake: how two workers prove a transfer was granted to them.

Each transfer (and each bandwidth probe) has its own secret, the ticket, and nothing else
authenticates it. The router grants a transfer: with a control key (kvgrid.server.auth) the
ticket is ``HMAC(K_d, "kvgrid-transfer-v1" | transfer id)`` under the receiving worker's key
K_d, which the router derives from the cluster key. The router hands the ticket to the
sending worker in its (authenticated) /prefill request; the receiving worker derives it from
its own key when the router tells it to expect the transfer. No worker holds another's key
or the cluster key, and a ticket opens one transfer into one worker. Without a control key
(loopback-only workers) the router mints a random ticket and hands it to both sides.

The handshake is a mutual challenge-response. The receiving side opens with a fresh nonce;
the sending side answers with the transfer id, its own nonce and an HMAC-SHA256 under the
ticket over both nonces and the id; the receiver checks it against the ticket of that id,
and answers with a status and its own HMAC over the same, which the sender checks. The
ticket never crosses this channel, a recorded handshake cannot be replayed (the other side's
nonce is new), and each side knows the other holds the ticket. What follows are stored
objects, each verified on arrival (AES-GCM with the block key and tenant in its
authenticated header, when the store encrypts).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct
from collections.abc import Callable

MAGIC = b"KVGT"
VERSION = 2
NONCE = 16
ID_BYTES = 16
TICKET_BYTES = 32
_MAC = 32
_HELLO = struct.Struct(f"<4sB{NONCE}s")
_CLIENT = struct.Struct(f"<{ID_BYTES}s{NONCE}s{_MAC}s")
_REPLY = struct.Struct(f"<B{_MAC}s")

OK, UNKNOWN, BAD_AUTH, BUSY = 0, 1, 2, 3
STATUS = {OK: "ok", UNKNOWN: "unknown transfer", BAD_AUTH: "bad ticket", BUSY: "busy"}


class AuthError(ConnectionError):
    """The other side did not prove it holds the transfer's ticket, or refused the transfer."""


def new_ticket() -> bytes:
    """A random ticket (a router without a control key mints these)."""
    return secrets.token_bytes(TICKET_BYTES)


def parse_ticket(text: object) -> bytes:
    """A ticket from its hex form; ValueError if it is not one."""
    if not isinstance(text, str):
        raise ValueError("a transfer ticket is a hex string")
    ticket = bytes.fromhex(text)
    if len(ticket) != TICKET_BYTES:
        raise ValueError(f"a transfer ticket is {TICKET_BYTES} bytes")
    return ticket


def check_grant(transfer_id: bytes, ticket: bytes) -> None:
    """ValueError unless ``transfer_id`` and ``ticket`` have the sizes of a transfer's."""
    if len(transfer_id) != ID_BYTES:
        raise ValueError(f"a transfer id is {ID_BYTES} bytes")
    if len(ticket) != TICKET_BYTES:
        raise ValueError(f"a transfer ticket is {TICKET_BYTES} bytes")


def _mac(ticket: bytes, side: bytes, ns: bytes, nc: bytes, tid: bytes, extra: bytes = b"") -> bytes:
    msg = b"kvgrid-kvt2/" + side + ns + nc + tid + extra
    return hmac.new(ticket, msg, hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed")
        got += k
    return bytes(buf)


def server_handshake(
    sock: socket.socket, claim: Callable[[bytes], tuple[int, bytes | None]]
) -> tuple[bytes, int]:
    """The receiving side: (transfer id, status). ``claim(transfer_id)`` gives the status the
    transfer would get (OK, UNKNOWN or BUSY) and its ticket (None: not expected here); it
    must not change anything, as the peer has not proved itself yet. Raises AuthError
    (after telling the peer) on a bad proof."""
    ns = secrets.token_bytes(NONCE)
    sock.sendall(_HELLO.pack(MAGIC, VERSION, ns))
    tid, nc, mac = _CLIENT.unpack(recv_exact(sock, _CLIENT.size))
    status, ticket = claim(tid)
    if ticket is None:  # nothing to check the proof against: refused, unauthenticated
        sock.sendall(_REPLY.pack(UNKNOWN, bytes(_MAC)))
        return tid, UNKNOWN
    if not hmac.compare_digest(mac, _mac(ticket, b"client", ns, nc, tid)):
        sock.sendall(_REPLY.pack(BAD_AUTH, bytes(_MAC)))
        raise AuthError("peer failed the transfer handshake")
    sock.sendall(_REPLY.pack(status, _mac(ticket, b"server", ns, nc, tid, bytes([status]))))
    return tid, status


def client_handshake(sock: socket.socket, ticket: bytes, transfer_id: bytes) -> None:
    """The sending side; raises AuthError if the receiver fails its proof or refuses."""
    if len(transfer_id) != ID_BYTES:
        raise ValueError(f"a transfer id is {ID_BYTES} bytes")
    magic, version, ns = _HELLO.unpack(recv_exact(sock, _HELLO.size))
    if magic != MAGIC or version != VERSION:
        raise AuthError(f"not a kvgrid transfer endpoint (or version {version} != {VERSION})")
    nc = secrets.token_bytes(NONCE)
    sock.sendall(_CLIENT.pack(transfer_id, nc, _mac(ticket, b"client", ns, nc, transfer_id)))
    status, mac = _REPLY.unpack(recv_exact(sock, _REPLY.size))
    if status == BAD_AUTH:
        raise AuthError("the receiver rejected this transfer's ticket")
    if status == UNKNOWN and mac == bytes(_MAC):
        raise AuthError("transfer refused: unknown transfer")
    want = _mac(ticket, b"server", ns, nc, transfer_id, bytes([status]))
    if not hmac.compare_digest(mac, want):
        raise AuthError("the receiver failed the transfer handshake")
    if status != OK:
        raise AuthError(f"transfer refused: {STATUS.get(status, status)}")
