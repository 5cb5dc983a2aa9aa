"""The control-plane credential: how routers and workers prove who they are to each other.

The root is a cluster key (32 random bytes). Everything else derives from it:

    worker key  K_w = HMAC-SHA256(cluster key, "kvgrid-worker-v1" | worker id)

A router holds the cluster key. A worker holds either the cluster key or only its own
worker key (``kvgrid control-key worker``; `kvgrid serve` gives each worker its own): with a
worker key it can speak only as that worker. All proofs are keyed by K_w:

- router -> worker HTTP: ``Authorization: Bearer kvr1.<HMAC(K_w, "router")>``; the worker
  checks it (constant time) on every endpoint, so only a router can send it requests and
  tenant scopes.
- worker -> router HTTP (registration): ``Bearer kvw1.<worker id>.<HMAC(K_w, "worker")>``;
  the router derives K_w for the claimed id, so a worker id is bound to its key and no one
  registers (or replaces) a worker whose key they do not hold.
- ``GET /info`` answers a router's nonce with HMAC(K_w, "info" | nonce): the router trusts
  (and connects to) only addresses where the worker's key answers.
- KV transfers between workers (kvgrid.transfer.auth): a transfer into worker w is keyed
  by its ticket HMAC(K_w, "kvgrid-transfer-v1" | transfer id); the router hands it to the
  sending worker, the receiving one derives it. No worker needs another's key.
- ZeroMQ events: the worker's PUB socket is a CURVE server whose key pair derives from K_w,
  and its ZAP handler admits only the client key that also derives from K_w; the router's SUB
  connects with those keys. The stream is encrypted and only key holders can subscribe.

Text forms (file, or the KVGRID_CONTROL_KEY variable): ``kvgrid-cluster-v1:<64 hex>`` and
``kvgrid-worker-v1:<worker id>:<64 hex>``. The HTTP tokens are static per worker: the HTTP
channel itself is not encrypted, so keep it on a private network (the event stream is).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
from zmq.utils import z85

from kvgrid import envs
from kvgrid.secretfile import write_secret_file

log = logging.getLogger(__name__)

NONCE_HEADER = "x-kvgrid-nonce"

_CLUSTER = "kvgrid-cluster-v1"
_WORKER = "kvgrid-worker-v1"
_ROUTER_TOKEN = "kvr1"
_WORKER_TOKEN = "kvw1"
_TRANSFER = "kvgrid-transfer-v1"


class CredentialError(ValueError):
    """A control key that cannot be used (bad format, wrong worker, unsafe file)."""


def _mac(key: bytes, *parts: str | bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(4, "little") + b)
    return h.digest()


def _curve_pair(seed: bytes) -> tuple[bytes, bytes]:
    """(public, secret) Z85 CURVE keys from 32 secret bytes."""
    secret = z85.encode(seed)
    return zmq.curve_public(secret), secret


@dataclass(frozen=True)
class ControlKey:
    """A cluster key (``worker_id`` None) or one worker's key."""

    key: bytes
    worker_id: str | None = None

    def __post_init__(self) -> None:
        if len(self.key) != 32:
            raise CredentialError("a control key is 32 bytes (64 hex digits)")

    def __repr__(self) -> str:  # never the key itself, in logs or tracebacks
        return f"ControlKey(worker_id={self.worker_id!r})"

    @property
    def is_cluster(self) -> bool:
        return self.worker_id is None

    # ---- derivation ----------------------------------------------------------------------

    def for_worker(self, worker_id: str) -> ControlKey:
        """The worker key of ``worker_id``: derived from a cluster key, or this key itself
        if it is that worker's (any other worker's is refused)."""
        if not worker_id:
            raise CredentialError("a worker key needs a worker id")
        if self.worker_id is not None:
            if self.worker_id != worker_id:
                raise CredentialError(
                    f"this control key belongs to worker {self.worker_id!r}, not {worker_id!r}"
                )
            return self
        return ControlKey(_mac(self.key, _WORKER, worker_id), worker_id)

    def _worker_key(self, worker_id: str) -> bytes:
        return self.for_worker(worker_id).key

    # ---- HTTP tokens ---------------------------------------------------------------------

    def router_token(self, worker_id: str) -> str:
        """What a router sends a worker (``Authorization: Bearer ...``)."""
        return f"{_ROUTER_TOKEN}.{_mac(self._worker_key(worker_id), 'router').hex()}"

    def router_headers(self, worker_id: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.router_token(worker_id)}"}

    def worker_token(self, worker_id: str) -> str:
        """What a worker sends a router: names the worker and proves it holds its key."""
        mac = _mac(self._worker_key(worker_id), "worker").hex()
        return f"{_WORKER_TOKEN}.{worker_id}.{mac}"

    def worker_headers(self, worker_id: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.worker_token(worker_id)}"}

    def check_router_token(self, worker_id: str, authorization: str | None) -> bool:
        """A worker's check of a request: is it from a holder of this worker's key?"""
        given = _bearer(authorization)
        want = self.router_token(worker_id)
        return given is not None and hmac.compare_digest(given.encode(), want.encode())

    def check_worker_token(self, authorization: str | None) -> str | None:
        """A router's check of a worker's request: the worker id it proves, else None."""
        given = _bearer(authorization)
        if given is None or given.count(".") < 2:
            return None
        scheme, rest = given.split(".", 1)
        worker_id, _, _ = rest.rpartition(".")
        if scheme != _WORKER_TOKEN or not worker_id:
            return None
        try:
            want = self.worker_token(worker_id)
        except CredentialError:
            return None
        return worker_id if hmac.compare_digest(given.encode(), want.encode()) else None

    def info_proof(self, worker_id: str, nonce: str) -> str:
        return _mac(self._worker_key(worker_id), "info", nonce).hex()

    def check_info_proof(self, worker_id: str, nonce: str, proof: object) -> bool:
        if not isinstance(proof, str):
            return False
        try:
            want = self.info_proof(worker_id, nonce)
        except CredentialError:
            return False
        return hmac.compare_digest(proof.encode(), want.encode())

    # ---- KV transfers --------------------------------------------------------------------

    def transfer_ticket(self, worker_id: str, transfer_id: bytes) -> bytes:
        """The secret of one KV transfer (or bandwidth probe) into ``worker_id``: the router
        hands it to the sender, the receiver derives it from its own key."""
        return _mac(self._worker_key(worker_id), _TRANSFER, transfer_id)

    # ---- ZeroMQ CURVE --------------------------------------------------------------------

    def curve_server(self, worker_id: str) -> tuple[bytes, bytes]:
        """(public, secret) CURVE keys of a worker's event publisher."""
        return _curve_pair(_mac(self._worker_key(worker_id), "curve-server"))

    def curve_client(self, worker_id: str) -> tuple[bytes, bytes]:
        """(public, secret) CURVE keys a router subscribes to that worker with."""
        return _curve_pair(_mac(self._worker_key(worker_id), "curve-client"))

    def secure_publisher(self, sock: zmq.Socket, worker_id: str) -> None:
        """Make ``sock`` (before bind) a CURVE server for ``worker_id``; the caller's context
        needs a ZAP handler that admits ``curve_client(worker_id)[0]`` (``EventAuthenticator``)."""
        pub, sec = self.curve_server(worker_id)
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = pub, sec

    def secure_subscriber(self, sock: zmq.Socket, worker_id: str) -> None:
        """Set ``sock``'s CURVE keys for its next ``connect`` (to ``worker_id``'s events):
        ZeroMQ takes the options at connect time, so one SUB socket follows many workers."""
        sock.curve_serverkey = self.curve_server(worker_id)[0]
        sock.curve_publickey, sock.curve_secretkey = self.curve_client(worker_id)

    # ---- text form -----------------------------------------------------------------------

    def dumps(self) -> str:
        if self.worker_id is None:
            return f"{_CLUSTER}:{self.key.hex()}"
        return f"{_WORKER}:{self.worker_id}:{self.key.hex()}"

    @classmethod
    def loads(cls, text: str) -> ControlKey:
        text = text.strip()
        kind, _, rest = text.partition(":")
        try:
            if kind == _CLUSTER:
                return cls(bytes.fromhex(rest))
            if kind == _WORKER:
                worker_id, _, hexkey = rest.rpartition(":")
                if not worker_id:
                    raise CredentialError("a worker control key names its worker")
                return cls(bytes.fromhex(hexkey), worker_id)
        except ValueError as e:
            raise CredentialError(f"control key is not valid hex: {e}") from None
        raise CredentialError(
            f"a control key is '{_CLUSTER}:<64 hex>' or '{_WORKER}:<worker id>:<64 hex>'"
        )

    @classmethod
    def generate(cls) -> ControlKey:
        return cls(secrets.token_bytes(32))


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def load_control_key(path: str | os.PathLike | None = None) -> ControlKey | None:
    """The control key from ``path``, else $KVGRID_CONTROL_KEY_FILE, else $KVGRID_CONTROL_KEY;
    None when none is configured."""
    path = path or envs.KVGRID_CONTROL_KEY_FILE.get()
    if path:
        p = Path(path)
        try:
            mode = p.stat().st_mode
            text = p.read_text()
        except OSError as e:
            raise CredentialError(f"cannot read control key file {p}: {e.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CredentialError(f"control key file {p} is readable by others; chmod 600 it")
        return ControlKey.loads(text)
    if envs.KVGRID_CONTROL_KEY.is_set():
        return ControlKey.loads(envs.KVGRID_CONTROL_KEY.get())
    return None


class EventAuthenticator:
    """ZAP handler of a worker's event publisher (its own ZeroMQ context): admits only the
    CURVE client key that derives from the worker's key, and counts what it turns away."""

    def __init__(self, ctx: zmq.Context, key: ControlKey, worker_id: str) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self._allowed = key.curve_client(worker_id)[0]
        self.denied = 0
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("kvgrid.server.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)

    def callback(self, domain: str, client_key: bytes) -> bool:
        ok = hmac.compare_digest(client_key, self._allowed)
        if not ok:
            self.denied += 1
            log.warning("event stream: refused a subscriber with an unknown CURVE key")
        return ok

    def stop(self) -> None:
        self._auth.stop()


def require_router(app, key: ControlKey | None, worker_id: str, open_paths=("/health",)) -> None:
    """Install on a worker's FastAPI ``app`` the check that every request (but
    ``open_paths``) carries the router's token for ``worker_id``; None: no key, loopback
    only, every request passes. A refused request gets a 401 naming the worker (its id is
    no secret: a router configured with the URL alone learns whose token to present)."""
    from fastapi.responses import JSONResponse

    @app.middleware("http")
    async def check_router(request, call_next):
        if (
            key is None
            or request.url.path in open_paths
            or key.check_router_token(worker_id, request.headers.get("authorization"))
        ):
            return await call_next(request)
        body = {"error": "this worker takes requests from its router only", "worker_id": worker_id}
        return JSONResponse(body, status_code=401)


def admin_token() -> str | None:
    return envs.KVGRID_ADMIN_TOKEN.get()


def check_admin(authorization: str | None) -> bool:
    """Does the request carry the admin token (constant time)? False when none is set."""
    want, given = admin_token(), _bearer(authorization)
    return bool(want and given and hmac.compare_digest(given.encode(), want.encode()))


def is_loopback_host(host: str | None) -> bool:
    """Is ``host`` (an address or a name) reachable from this machine only?"""
    if not host:
        return False
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def is_wildcard_host(host: str | None) -> bool:
    return (host or "").strip("[]") in ("0.0.0.0", "::", "")


def url_host(url: str) -> str:
    return urlsplit(url).hostname or ""


__all__ = [
    "NONCE_HEADER",
    "ControlKey",
    "CredentialError",
    "EventAuthenticator",
    "admin_token",
    "check_admin",
    "is_loopback_host",
    "is_wildcard_host",
    "load_control_key",
    "require_router",
    "url_host",
    "write_secret_file",
]
