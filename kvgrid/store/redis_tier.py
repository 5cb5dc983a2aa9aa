"""G4 on Redis/Valkey: objects and their index live in the server, shared by every worker.

Keys (under a prefix, default "kvgrid:"), with member = "<tenant id hex>:<block key hex>":
    obj:<member>   the object bytes
    sizes          hash member -> bytes
    lru            sorted set member -> last use (all tenants); lru:<tid> per tenant
    created        sorted set member -> creation time (TTL sweeps)
    used, tused:<tid>   bytes stored, in all and per tenant

Admission, eviction and the capacity check run in one Lua script, so usage never exceeds
capacity however many machines write at once. Every call has a socket timeout, and any
Redis error turns the tier off for ``retry_s`` (reads are misses, writes are dropped)
instead of raising to the caller: the store keeps serving from its other tiers.
Single-node Redis/Valkey (not cluster mode).

Credentials: ``redis://user:password@host:port/db`` (AUTH, ACL users too), or a password in
KVGRID_REDIS_PASSWORD; ``rediss://`` for TLS (``?ssl_ca_certs=/path/ca.pem`` to name the CA).
The URL is never logged as given: ``url`` is the form without the password.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvgrid import envs
from kvgrid.store.tier import ObjectInfo, ObjectTier, PutResult, ReadBuffer

log = logging.getLogger(__name__)

_PUT = """
local p, m, tid = ARGV[1], ARGV[2], ARGV[3]
local size, cap, hi, lo = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local quota, now = tonumber(ARGV[8]), tonumber(ARGV[9])
if redis.call('HEXISTS', p..'sizes', m) == 1 then
  redis.call('ZADD', p..'lru', now, m); redis.call('ZADD', p..'lru:'..tid, now, m)
  return {1}
end
if size > cap then return {0, 'too_big'} end
if quota >= 0 and size > quota then return {0, 'quota'} end
local out = {1}
local function drop(x, why)
  local s = tonumber(redis.call('HGET', p..'sizes', x) or '0')
  local t = string.sub(x, 1, 32)
  redis.call('DEL', p..'obj:'..x); redis.call('HDEL', p..'sizes', x)
  redis.call('ZREM', p..'lru', x); redis.call('ZREM', p..'lru:'..t, x)
  redis.call('ZREM', p..'created', x)
  redis.call('DECRBY', p..'used', s); redis.call('DECRBY', p..'tused:'..t, s)
  table.insert(out, why..':'..x)
end
if quota >= 0 then
  while tonumber(redis.call('GET', p..'tused:'..tid) or '0') + size > quota do
    local v = redis.call('ZRANGE', p..'lru:'..tid, 0, 0)
    if #v == 0 then break end
    drop(v[1], 'quota')
  end
  if tonumber(redis.call('GET', p..'tused:'..tid) or '0') + size > quota then
    out[1] = 0; table.insert(out, 'quota'); return out
  end
end
if tonumber(redis.call('GET', p..'used') or '0') + size > hi then
  while tonumber(redis.call('GET', p..'used') or '0') + size > lo do
    local v = redis.call('ZRANGE', p..'lru', 0, 0)
    if #v == 0 then break end
    drop(v[1], 'capacity')
  end
end
if tonumber(redis.call('GET', p..'used') or '0') + size > cap then
  out[1] = 0; table.insert(out, 'full'); return out
end
redis.call('SET', p..'obj:'..m, ARGV[10]); redis.call('HSET', p..'sizes', m, size)
redis.call('ZADD', p..'lru', now, m); redis.call('ZADD', p..'lru:'..tid, now, m)
redis.call('ZADD', p..'created', now, m)
redis.call('INCRBY', p..'used', size); redis.call('INCRBY', p..'tused:'..tid, size)
return out
"""

_DEL = """
local p, m = ARGV[1], ARGV[2]
local s = redis.call('HGET', p..'sizes', m)
local t = string.sub(m, 1, 32)
redis.call('DEL', p..'obj:'..m); redis.call('ZREM', p..'lru', m)
redis.call('ZREM', p..'lru:'..t, m)
redis.call('ZREM', p..'created', m)
if not s then return 0 end
redis.call('HDEL', p..'sizes', m)
redis.call('DECRBY', p..'used', tonumber(s)); redis.call('DECRBY', p..'tused:'..t, tonumber(s))
return 1
"""


def _member(tid: bytes, key: bytes) -> str:
    return f"{tid.hex()}:{key.hex()}"


def redact_url(url: str) -> str:
    """``url`` without its password (user names stay: they say which ACL user)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _split(member: str | bytes) -> tuple[bytes, bytes]:
    if isinstance(member, bytes):
        member = member.decode()
    t, _, k = member.partition(":")
    return bytes.fromhex(t), bytes.fromhex(k)


class RedisTier(ObjectTier):
    backend = "redis"

    def __init__(
        self,
        url: str,
        capacity: int,
        name: str = "G4",
        prefix: str = "kvgrid:",
        high: float = 0.95,
        low: float = 0.85,
        retry_s: float = 2.0,
        timeout_s: float = 2.0,
        read_only: bool = False,
    ) -> None:
        """``read_only``: reads leave the LRU order as it is (for inspection tools)."""
        self.url = redact_url(url)  # for logs and metrics; the real one stays in the client
        self.capacity, self.name, self.prefix = int(capacity), name, prefix
        self.high, self.low = high, low
        extra = {}
        if urlsplit(url).password is None and envs.KVGRID_REDIS_PASSWORD.is_set():
            extra["password"] = envs.KVGRID_REDIS_PASSWORD.get()
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=min(timeout_s, 1.0),
            retry=Retry(NoBackoff(), 0),
            **extra,
        )
        self._put = self.client.register_script(_PUT)
        self._del = self.client.register_script(_DEL)
        self.read_only = read_only
        self.errors = 0
        self._init_health(retry_s)
        self._call(self.client.ping)

    # ---- availability: a failure turns the tier off for retry_s (ObjectTier.up) ---------

    def _probe(self) -> None:
        self.client.ping()

    def _call(self, fn, *args, default=None, refused=None, **kw):
        """``fn``'s result; ``default`` when the tier is off or the server cannot be reached
        (which turns it off), ``refused`` (default: ``default``) when the server answered
        with an error (full, say): it is up, only that command failed."""
        if not self.up:
            return default
        try:
            return fn(*args, **kw)
        except redis.ResponseError as e:
            self.errors += 1
            log.debug("redis refused %s: %s", getattr(fn, "__name__", fn), e)
            return default if refused is None else refused
        except redis.RedisError as e:
            self.errors += 1
            self._fail(e, "timeout" if isinstance(e, redis.TimeoutError) else "unreachable")
            return default

    # ---- the tier interface -------------------------------------------------------------

    def put(self, tid: bytes, key: bytes, blob: bytes, quota: int | None = None) -> PutResult:
        args = [
            self.prefix,
            _member(tid, key),
            tid.hex(),
            len(blob),
            self.capacity,
            int(self.high * self.capacity),
            int(self.low * self.capacity),
            -1 if quota is None else int(quota),
            time.time(),
            blob,
        ]
        res = self._call(self._put, keys=[], args=args, refused=[0, "refused"])
        if res is None:
            return PutResult(False, reason="error")
        stored = bool(res[0])
        evicted, reason = [], ""
        for item in res[1:]:
            s = item.decode() if isinstance(item, bytes) else item
            why, _, m = s.partition(":")
            if m:
                evicted.append((*_split(m), why))
            else:
                reason = why
        return PutResult(stored, evicted, reason)

    def get(self, tid: bytes, key: bytes, into: ReadBuffer | None = None) -> bytes | None:
        m = _member(tid, key)

        def fetch():
            if self.read_only:
                return self.client.get(self.prefix + "obj:" + m)
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self.prefix + "obj:" + m)
            pipe.zadd(self.prefix + "lru", {m: time.time()}, xx=True)
            pipe.zadd(self.prefix + "lru:" + tid.hex(), {m: time.time()}, xx=True)
            # a full server refuses the LRU updates (writes); the read stands
            got = pipe.execute(raise_on_error=False)[0]
            if isinstance(got, Exception):
                raise got
            return got

        return self._call(fetch)

    def created_many(self, tid: bytes, keys: list[bytes]) -> list[float | None]:
        if not keys:
            return []

        def fetch():
            return self.client.zmscore(self.prefix + "created", [_member(tid, k) for k in keys])

        res = self._call(fetch)
        return res if res is not None else [None] * len(keys)

    def delete(self, tid: bytes, key: bytes) -> bool:
        return bool(self._call(self._del, keys=[], args=[self.prefix, _member(tid, key)]))

    def list(self, tid: bytes | None = None) -> Iterator[ObjectInfo]:
        z = self.prefix + ("lru" if tid is None else "lru:" + tid.hex())
        rows = self._call(self.client.zrange, z, 0, -1, withscores=True) or []
        for i in range(0, len(rows), 512):
            chunk = rows[i : i + 512]
            members = [m for m, _ in chunk]
            sizes = self._call(self.client.hmget, self.prefix + "sizes", members) or []
            created = self._call(self.client.zmscore, self.prefix + "created", members) or []
            for (m, last), s, c in zip(chunk, sizes, created):
                if s is None:
                    continue
                t, k = _split(m)
                yield ObjectInfo(t, k, int(s), float(c or 0.0), float(last))

    def used(self, tid: bytes | None = None) -> int:
        k = self.prefix + ("used" if tid is None else "tused:" + tid.hex())
        return int(self._call(self.client.get, k) or 0)

    def clear(self, tid: bytes | None = None) -> int:
        return sum(self.delete(i.tenant_id, i.key) for i in list(self.list(tid)))

    def read_meta(self, name: str) -> bytes | None:
        return self._call(self.client.get, self.prefix + "meta:" + name)

    def write_meta(self, name: str, data: bytes, replace: bool = False) -> bool:
        return bool(self._call(self.client.set, self.prefix + "meta:" + name, data, nx=not replace))

    def close(self) -> None:
        self.client.close()
