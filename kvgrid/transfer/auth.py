"""The transfer channel's credential and its handshake: the one place workers authenticate
each other before KV moves between them.

The credential is the control plane's shared secret: ``KVGRID_WORKER_TOKEN`` (what the
router and its workers already share), else ``KVGRID_TRANSFER_SECRET``, which ``kvgrid
serve`` generates for the workers it starts. A worker without either accepts no transfer.

The handshake is a mutual challenge-response. The receiving side opens with a fresh nonce;
the sending side answers with the transfer id, its own nonce and an HMAC-SHA256 over both
nonces and the id; the receiver checks it, and answers with a status and its own HMAC over
the same, which the sender checks. The secret never crosses the wire, a recorded handshake
cannot be replayed (the other side's nonce is new), and each side knows the other holds
the secret. What follows are stored objects, each verified on arrival (AES-GCM with the
block key and tenant in its authenticated header, when the store encrypts).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import struct
from collections.abc import Callable, MutableMapping

ENV_VARS = ("KVGRID_WORKER_TOKEN", "KVGRID_TRANSFER_SECRET")
MAGIC = b"KVGT"
VERSION = 1
NONCE = 16
ID_BYTES = 16
_MAC = 32
_HELLO = struct.Struct(f"<4sB{NONCE}s")
_CLIENT = struct.Struct(f"<{ID_BYTES}s{NONCE}s{_MAC}s")
_REPLY = struct.Struct(f"<B{_MAC}s")

OK, UNKNOWN, BAD_AUTH, BUSY = 0, 1, 2, 3
STATUS = {OK: "ok", UNKNOWN: "unknown transfer", BAD_AUTH: "bad credential", BUSY: "busy"}


class AuthError(ConnectionError):
    """The other side did not prove it holds the credential, or refused the transfer."""


def credential(environ: MutableMapping[str, str] = os.environ) -> bytes | None:
    """The shared secret that authenticates transfers, or None when none is configured."""
    for name in ENV_VARS:
        v = environ.get(name)
        if v:
            return v.encode()
    return None


def ensure_credential(environ: MutableMapping[str, str]) -> None:
    """Give ``environ`` (the environment of the workers a server starts) a credential if it
    has none: a fresh random secret, known only to those processes."""
    if credential(environ) is None:
        environ["KVGRID_TRANSFER_SECRET"] = secrets.token_hex(32)


def _mac(secret: bytes, side: bytes, ns: bytes, nc: bytes, tid: bytes, extra: bytes = b"") -> bytes:
    msg = b"kvgrid-kvt1/" + side + ns + nc + tid + extra
    return hmac.new(secret, msg, hashlib.sha256).digest()


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
    sock: socket.socket, secret: bytes, accept: Callable[[bytes], int]
) -> tuple[bytes, int]:
    """The receiving side: (transfer id, status). ``accept(transfer_id)`` says whether the
    transfer is expected (OK, UNKNOWN or BUSY); it is asked only once the peer has proved
    it holds the secret. Raises AuthError (after telling the peer) on a bad proof."""
    ns = secrets.token_bytes(NONCE)
    sock.sendall(_HELLO.pack(MAGIC, VERSION, ns))
    tid, nc, mac = _CLIENT.unpack(recv_exact(sock, _CLIENT.size))
    if not hmac.compare_digest(mac, _mac(secret, b"client", ns, nc, tid)):
        sock.sendall(_REPLY.pack(BAD_AUTH, bytes(_MAC)))
        raise AuthError("peer failed the transfer handshake")
    status = accept(tid)
    sock.sendall(_REPLY.pack(status, _mac(secret, b"server", ns, nc, tid, bytes([status]))))
    return tid, status


def client_handshake(sock: socket.socket, secret: bytes, transfer_id: bytes) -> None:
    """The sending side; raises AuthError if the receiver fails its proof or refuses."""
    if len(transfer_id) != ID_BYTES:
        raise ValueError(f"a transfer id is {ID_BYTES} bytes")
    magic, version, ns = _HELLO.unpack(recv_exact(sock, _HELLO.size))
    if magic != MAGIC or version != VERSION:
        raise AuthError(f"not a kvgrid transfer endpoint (or version {version} != {VERSION})")
    nc = secrets.token_bytes(NONCE)
    sock.sendall(_CLIENT.pack(transfer_id, nc, _mac(secret, b"client", ns, nc, transfer_id)))
    status, mac = _REPLY.unpack(recv_exact(sock, _REPLY.size))
    if status == BAD_AUTH:
        raise AuthError("the receiver rejected this worker's credential")
    want = _mac(secret, b"server", ns, nc, transfer_id, bytes([status]))
    if not hmac.compare_digest(mac, want):
        raise AuthError("the receiver failed the transfer handshake")
    if status != OK:
        raise AuthError(f"transfer refused: {STATUS.get(status, status)}")
