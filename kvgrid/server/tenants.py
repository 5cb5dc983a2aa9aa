"""Tenants: API keys to tenants, the tenant scope of block keys, and fair admission.

Keys come from a file (JSON or TOML) or the environment variable KVGRID_API_KEYS:

    {"keys": {"sk-abc": {"tenant": "acme", "max_concurrent": 8, "max_queued": 256},
              "sk-def": "beta"},
     "shared_prefixes": ["You are a support agent for ...",            # a prompt prefix, or
                         [{"role": "system", "content": "You are ..."}]],  # a chat prefix
     "shared_prefix_tenants": ["acme", "beta"],  # these share the prefixes above
     "default_max_concurrent": 32}

KVGRID_API_KEYS may also be the short form ``sk-abc=acme,sk-def=beta``. With no key
configured there is one tenant, "local", whose blocks live in the PUBLIC scope.

The scope that goes into block keys is an HMAC of the server's secret and the tenant name
(keys.tenant_scope), derived here and never taken from the client, so two tenants never
share a block unless the configuration says so. A tenant in ``shared_prefix_tenants`` shares
only the blocks that lie wholly inside one of the ``shared_prefixes`` (keyed in the PUBLIC
scope); everything after them, and every other prompt, stays in its own scope.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import tomllib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

from kvgrid import envs, keys
from kvgrid.secretfile import write_secret_file

log = logging.getLogger(__name__)

LOCAL_TENANT = "local"


@dataclass(frozen=True)
class Tenant:
    name: str
    scope: bytes  # the tenant part of block keys
    max_concurrent: int = 32
    max_queued: int = 1024
    shares_prefixes: bool = False  # its prompts may use the configured shared prefixes


class TenantRegistry:
    def __init__(
        self,
        api_keys: dict[str, dict] | None = None,
        server_secret: bytes | None = None,
        shared_prefix_tenants: frozenset[str] = frozenset(),
        default_max_concurrent: int = 32,
        default_max_queued: int = 1024,
        shared_prefixes: tuple[str | list[dict], ...] = (),
        local_max_concurrent: int | None = None,
    ) -> None:
        """``local_max_concurrent``: the cap of the one local tenant when no key is
        configured (default ``default_max_concurrent``); alone on the server, it has no one
        to be fair to, so a frontend gives it the server's own cap."""
        self.auth_required = bool(api_keys)
        # texts or chat-message lists; the frontend tokenizes them (it owns the tokenizer)
        self.shared_prefixes = tuple(shared_prefixes)
        if shared_prefix_tenants and not shared_prefixes:
            log.warning(
                "shared_prefix_tenants is set but no shared_prefixes: nothing is shared "
                "across tenants (list the prefixes to share)"
            )
        self._by_key: dict[str, Tenant] = {}
        self._tenants: dict[str, Tenant] = {}
        if not api_keys:
            cap = local_max_concurrent or default_max_concurrent
            t = Tenant(LOCAL_TENANT, keys.PUBLIC_TENANT, cap, default_max_queued)
            self._tenants[t.name] = t
            return
        if not server_secret:
            raise ValueError("tenants need a server secret to derive their KV scopes")
        for key, spec in api_keys.items():
            if isinstance(spec, str):
                spec = {"tenant": spec}
            name = spec.get("tenant")
            if not isinstance(name, str) or not name:
                raise ValueError(f"API key entry {key[:6]}... has no tenant name")
            t = self._tenants.get(name)
            if t is None:
                t = Tenant(
                    name,
                    keys.tenant_scope(server_secret, name),
                    int(spec.get("max_concurrent", default_max_concurrent)),
                    int(spec.get("max_queued", default_max_queued)),
                    shares_prefixes=name in shared_prefix_tenants,
                )
                self._tenants[name] = t
            self._by_key[key] = t

    @property
    def tenants(self) -> list[Tenant]:
        return list(self._tenants.values())

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of a ``Bearer`` key, the local tenant when no key is configured,
        None for a missing or wrong key."""
        if not self.auth_required:
            return self._tenants[LOCAL_TENANT]
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        token = token.strip()
        for key, tenant in self._by_key.items():  # constant-time compare against every key
            if hmac.compare_digest(key.encode(), token.encode()):
                return tenant
        return None

    @classmethod
    def from_config(
        cls,
        path: str | Path | None,
        server_secret: bytes | None,
        default_max_concurrent: int = 32,
        local_max_concurrent: int | None = None,
    ) -> TenantRegistry:
        data: dict = {}
        if path:
            p = Path(path)
            text = p.read_text()
            data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
        elif envs.KVGRID_API_KEYS.is_set():
            raw = envs.KVGRID_API_KEYS.get().strip()
            if raw.startswith("{"):
                data = json.loads(raw)
            else:
                pairs = [item.split("=", 1) for item in raw.split(",") if item.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError("KVGRID_API_KEYS must be JSON or key=tenant,key=tenant")
                data = {"keys": {k.strip(): v.strip() for k, v in pairs}}
        prefixes = data.get("shared_prefixes", [])
        if not isinstance(prefixes, list) or not all(
            isinstance(p, str) or (isinstance(p, list) and all(isinstance(m, dict) for m in p))
            for p in prefixes
        ):
            raise ValueError("shared_prefixes must be a list of texts or of chat-message lists")
        return cls(
            data.get("keys") or None,
            server_secret,
            frozenset(data.get("shared_prefix_tenants", ())),
            int(data.get("default_max_concurrent", default_max_concurrent)),
            shared_prefixes=tuple(prefixes),
            local_max_concurrent=local_max_concurrent,
        )


def load_server_secret(path: str | Path | None = None) -> tuple[bytes, str]:
    """(secret, where it comes from): the secret tenant scopes derive from.
    KVGRID_SERVER_SECRET, else a file created once (0600) so that scopes, and so stored
    blocks, survive restarts. Every router in front of the same workers needs the same one:
    a generated file is this machine's alone, and the log says where it is."""
    env = envs.KVGRID_SERVER_SECRET.get()
    if env:
        return env.encode(), envs.KVGRID_SERVER_SECRET.name
    if path is None:
        base = envs.KVGRID_HOME.get() or Path.home() / ".cache" / "kvgrid"
        path = base / "server_secret"
    p = Path(path)
    if not p.exists() and write_secret_file(p, secrets.token_hex(32)):
        log.warning(
            "generated the server secret in %s (tenant scopes derive from it); every router "
            "of this fleet needs the same one: copy it or set %s",
            p,
            envs.KVGRID_SERVER_SECRET.name,
        )
    else:
        log.info("server secret from %s", p)
    value = p.read_bytes().strip()
    if not value:
        raise ValueError(f"server secret file {p} is empty")
    return value, str(p)


def scope_id(server_secret: bytes | None) -> str:
    """A fingerprint of the server secret, safe to show: routers that send a worker tenant
    scopes must agree on it (kvgrid.server.worker refuses a second one)."""
    if not server_secret:
        return ""
    return hmac.new(server_secret, b"kvgrid-scope-id-v1", hashlib.sha256).hexdigest()[:16]


class QueueFull(Exception):
    """The tenant already has as many requests waiting as it may."""


@dataclass
class _TenantQueue:
    running: int = 0
    waiters: deque[asyncio.Future] = field(default_factory=deque)


class FairScheduler:
    """Admission with a global concurrency cap, per-tenant caps, and round-robin between
    tenants when requests wait: a tenant with a thousand queued requests gets one slot,
    then a quiet tenant's single request gets the next."""

    def __init__(self, max_concurrent: int = 256) -> None:
        self.max_concurrent = max_concurrent
        self.running = 0
        self._queues: OrderedDict[str, _TenantQueue] = OrderedDict()

    def _q(self, tenant: str) -> _TenantQueue:
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = _TenantQueue()
        return q

    def waiting(self, tenant: str | None = None) -> int:
        if tenant is not None:
            return len(self._q(tenant).waiters)
        return sum(len(q.waiters) for q in self._queues.values())

    def running_of(self, tenant: str) -> int:
        return self._q(tenant).running

    async def acquire(self, tenant: Tenant) -> None:
        q = self._q(tenant.name)
        if len(q.waiters) >= tenant.max_queued:
            raise QueueFull(f"tenant {tenant.name!r} has {len(q.waiters)} requests queued")
        fut = asyncio.get_running_loop().create_future()
        fut.tenant = tenant  # type: ignore[attr-defined]
        q.waiters.append(fut)
        self._dispatch()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(tenant.name)  # granted as we were cancelled: hand it back
            else:
                q.waiters.remove(fut)
            raise

    def release(self, tenant: str) -> None:
        q = self._q(tenant)
        q.running -= 1
        self.running -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        # Visit tenants in rotation; a tenant that gets a slot moves to the back.
        progress = True
        while self.running < self.max_concurrent and progress:
            progress = False
            for name in list(self._queues):
                q = self._queues[name]
                if not q.waiters:
                    continue
                tenant = q.waiters[0].tenant  # type: ignore[attr-defined]
                if q.running >= tenant.max_concurrent:
                    continue
                fut = q.waiters.popleft()
                q.running += 1
                self.running += 1
                fut.set_result(None)
                self._queues.move_to_end(name)
                progress = True
                break
