"""FleetLink: the frontend's I/O with its workers, feeding the pure Router.

- registers workers (from ``--worker URL`` configuration or their own announcements): it
  asks the URL's ``/info`` with a nonce and accepts only a worker that proves it holds its
  worker key (kvgrid.server.auth), so the router sends requests, tenant scopes and event
  subscriptions only to authenticated workers; a live worker's id is never taken over,
- subscribes to each worker's KV events and load reports (one CURVE SUB socket per worker,
  so that a message is known to come from the worker it names),
- fetches snapshots when the index reports a gap or a worker (re)joins,
- watches liveness: a worker whose heartbeat stops, or whose port refuses connections, is
  marked down; a down or unknown worker is probed until it answers, then rejoins,
- counts, logs and skips every message it cannot use; a bad message never stops the stream.

Everything runs on the frontend's event loop, so the Router needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import zmq
import zmq.asyncio

from kvgrid.router import wire
from kvgrid.router.router import Router
from kvgrid.router.workers import WorkerInfo
from kvgrid.server.auth import NONCE_HEADER, ControlKey, is_loopback_host, url_host

log = logging.getLogger(__name__)


class Refused(Exception):
    """A worker the router will not take: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class _Known:
    url: str
    worker_id: str | None = None
    events_endpoint: str | None = None
    sub: zmq.asyncio.Socket | None = None
    task: asyncio.Task | None = None
    next_probe: float = 0.0
    refused: str | None = None  # the last refusal, logged once
    received: int = 0  # messages on the current subscription


class FleetLink:
    def __init__(
        self,
        router: Router,
        worker_urls: list[str] = (),
        key: ControlKey | None = None,
        scope_id: str = "",
        probe_interval_s: float = 1.0,
        clock=time.monotonic,
    ) -> None:
        """``key``: the cluster control key (None: loopback workers only, unauthenticated);
        ``scope_id``: this router's server-secret fingerprint (tenants.scope_id)."""
        self.router = router
        self.key = key
        self.scope_id = scope_id
        self.clock = clock
        self.probe_interval_s = probe_interval_s
        self.known: dict[str, _Known] = {u.rstrip("/"): _Known(u.rstrip("/")) for u in worker_urls}
        self.by_id: dict[str, _Known] = {}
        self.bad_messages: Counter[str] = Counter()  # reason -> messages dropped
        self._bad_logged = 0.0
        self.client: httpx.AsyncClient | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: list[asyncio.Task] = []
        self._snapshotting: set[str] = set()
        self._registering: set[str] = set()

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        self.client = httpx.AsyncClient(
            limits=limits,
            timeout=httpx.Timeout(connect=2.0, read=None, write=30.0, pool=30.0),
        )
        self._ctx = zmq.asyncio.Context()
        self._tasks = [asyncio.create_task(self._watch())]

    async def stop(self) -> None:
        for k in self.known.values():
            self._unsubscribe(k)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.client:
            await self.client.aclose()
        if self._ctx is not None:
            self._ctx.term()

    def headers(self, worker_id: str) -> dict[str, str]:
        """What a request to ``worker_id`` carries: the router's token for that worker."""
        return self.key.router_headers(worker_id) if self.key is not None else {}

    def url(self, worker_id: str) -> str:
        return self.router.workers[worker_id].info.url

    def add_url(self, url: str) -> None:
        url = url.rstrip("/")
        if url not in self.known:
            self.known[url] = _Known(url)

    def forget(self, url: str) -> None:
        """Stop following a worker that is going away for good (a drained replica)."""
        k = self.known.pop(url.rstrip("/"), None)
        if k is None:
            return
        if k.worker_id and self.by_id.get(k.worker_id) is k:
            del self.by_id[k.worker_id]
        self._unsubscribe(k)

    # ---- registration --------------------------------------------------------------------

    async def _info(self, url: str, worker_id: str | None, may_switch: bool) -> tuple[dict, str]:
        """The worker's /info, and the nonce it answered (raises httpx errors, Refused).
        ``may_switch``: the id is only a guess (a configured URL, or what it was before)."""
        nonce = secrets.token_hex(16)
        headers = {NONCE_HEADER: nonce, **(self.headers(worker_id) if worker_id else {})}
        r = await self.client.get(f"{url}/info", headers=headers, timeout=2.0)
        if r.status_code == 401 and self.key is not None and may_switch:
            # the worker names itself, then we prove we are its router
            named = r.json().get("worker_id")
            if isinstance(named, str) and named and named != worker_id:
                return await self._info(url, named, False)
        if r.status_code in (401, 403):
            raise Refused(403, f"{url} refused this router's credential ({r.status_code})")
        r.raise_for_status()
        return r.json(), nonce

    def _check(self, url: str, data: dict, nonce: str, claimed: str | None) -> WorkerInfo:
        info = WorkerInfo.from_dict({**data, "url": url})
        wid = info.worker_id
        if claimed is not None and wid != claimed:
            raise Refused(403, f"{url} answers as worker {wid!r}, not {claimed!r}")
        endpoint = data.get("events_endpoint")
        if self.key is not None:
            if not self.key.check_info_proof(wid, nonce, data.get("proof")):
                raise Refused(403, f"{url} did not prove it holds the key of worker {wid!r}")
        elif endpoint and not is_loopback_host(url_host(endpoint)):
            raise Refused(403, f"without a control key only loopback workers: {endpoint}")
        theirs = data.get("scope_id")
        if self.scope_id and theirs and theirs != self.scope_id:
            raise Refused(
                409,
                f"worker {wid!r} serves the tenant scopes of a router with another server "
                "secret: give every router the same KVGRID_SERVER_SECRET",
            )
        old = self.router.workers.get(wid)
        if (
            old is not None
            and old.up
            and old.info.url != url
            and self.clock() - old.last_seen < self.router.heartbeat_timeout_s
        ):
            raise Refused(409, f"worker id {wid!r} is live at {old.info.url}; not replacing it")
        return info

    async def register(self, url: str, worker_id: str | None = None) -> bool:
        """Fetch the worker's /info, check it, and (re)join it. False if it does not answer;
        raises ``Refused`` for a worker the router must not take. ``worker_id``: the id a
        registration proved (the worker's token), which the URL must answer as."""
        url = url.rstrip("/")
        if self.key is None and not is_loopback_host(url_host(url)):
            raise Refused(403, f"without a control key only loopback workers: {url}")
        self.add_url(url)
        if url in self._registering:
            return False
        self._registering.add(url)
        k = self.known[url]
        try:
            data, nonce = await self._info(url, worker_id or k.worker_id, worker_id is None)
            info = self._check(url, data, nonce, worker_id)
        except (httpx.HTTPError, ValueError) as e:
            log.debug("worker %s not reachable: %s", url, e)
            return False
        except Refused as e:
            if k.refused != e.reason:
                log.error("not registering %s: %s", url, e.reason)
                k.refused = e.reason
            raise
        finally:
            self._registering.discard(url)
        if self.known.get(url) is not k:  # forgotten while we asked (drained before it joined)
            return False
        k.refused = None
        self._subscribe(k, info.worker_id, data.get("events_endpoint"))
        k.worker_id = info.worker_id
        self.by_id[info.worker_id] = k
        was_up = info.worker_id in self.router.workers and self.router.workers[info.worker_id].up
        if self.router.add_worker(info, self.clock()):
            self.request_snapshot(info.worker_id)
        if not was_up:
            log.info("worker %s joined (%s, epoch %s)", info.worker_id, url, info.epoch)
        return True

    # ---- event stream --------------------------------------------------------------------

    def _subscribe(self, k: _Known, worker_id: str, endpoint: str | None) -> None:
        if k.sub is not None and k.events_endpoint == endpoint and k.worker_id == worker_id:
            return
        self._unsubscribe(k)
        if not endpoint:
            return
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 1_000_000)
        sub.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_KV)
        sub.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_LOAD)
        if self.key is not None:
            self.key.secure_subscriber(sub, worker_id)
        sub.connect(endpoint)
        k.sub, k.events_endpoint, k.received = sub, endpoint, 0
        k.task = asyncio.create_task(self._recv_loop(worker_id, sub))

    def _unsubscribe(self, k: _Known) -> None:
        if k.task is not None:
            k.task.cancel()
        if k.sub is not None:
            k.sub.close(0)
        k.sub = k.task = k.events_endpoint = None

    async def _recv_loop(self, worker_id: str, sub: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sub.recv_multipart()
            except zmq.ZMQError as e:
                if e.errno == zmq.ENOTSOCK or sub.closed:
                    return
                log.warning("event stream of %s: %s", worker_id, e)
                await asyncio.sleep(0.1)
                continue
            self.handle_message(worker_id, frames)

    def handle_message(self, worker_id: str, frames: list[bytes]) -> None:
        """One message from ``worker_id``'s stream: applied, or counted, logged and skipped."""
        now = self.clock()
        k = self.by_id.get(worker_id)
        if k is not None:
            k.received += 1
        try:
            if len(frames) != 2:
                raise wire.WireError(f"{len(frames)} frames, not [topic, payload]")
            topic, payload = frames
            if topic == wire.TOPIC_KV:
                batch, epoch = wire.decode_batch(payload)
                if batch.worker_id != worker_id:
                    raise wire.WireError(f"a batch of worker {batch.worker_id!r}")
                if self.router.on_events(batch, now, epoch) == "gap":
                    self.request_snapshot(worker_id)
            elif topic == wire.TOPIC_LOAD:
                report = wire.decode_load(payload)
                if report["worker_id"] != worker_id:
                    raise wire.WireError(f"a load report of worker {report['worker_id']!r}")
                if self.router.on_load(report, now):
                    self.request_snapshot(worker_id)
            else:
                raise wire.WireError(f"unknown topic {topic[:16]!r}")
        except Exception as e:  # whatever the bytes were, the stream goes on
            reason = "malformed" if isinstance(e, wire.WireError) else type(e).__name__
            self.bad_messages[reason] += 1
            if now - self._bad_logged >= 10.0 or sum(self.bad_messages.values()) == 1:
                self._bad_logged = now
                log.warning(
                    "dropped a bad message from worker %s (%s so far): %r",
                    worker_id,
                    sum(self.bad_messages.values()),
                    e,
                )

    # ---- snapshots -----------------------------------------------------------------------

    def request_snapshot(self, worker_id: str) -> None:
        if worker_id in self._snapshotting:
            return
        self._snapshotting.add(worker_id)
        task = asyncio.create_task(self._snapshot(worker_id))
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _snapshot(self, worker_id: str) -> None:
        try:
            w = self.router.workers.get(worker_id)
            if w is None or not w.up:
                return
            r = await self.client.get(
                f"{w.info.url}/kv/snapshot", headers=self.headers(worker_id), timeout=10.0
            )
            r.raise_for_status()
            snap = wire.decode_snapshot(r.content)
            if snap["worker_id"] != worker_id:
                raise wire.WireError(f"a snapshot of worker {snap['worker_id']!r}")
            status = self.router.on_snapshot(
                worker_id, snap["seq"], snap["tiers"], self.clock(), snap.get("epoch", "")
            )
            if status == "gap":
                self._snapshotting.discard(worker_id)
                self.request_snapshot(worker_id)
        except (httpx.HTTPError, wire.WireError, ValueError, TypeError) as e:
            self.bad_messages["snapshot"] += 1
            log.warning("snapshot of %s failed: %r", worker_id, e)
        finally:
            self._snapshotting.discard(worker_id)

    # ---- liveness ------------------------------------------------------------------------

    def mark_down(self, worker_id: str, reason: str) -> None:
        self.router.mark_down(worker_id, self.clock(), reason)
        k = self.by_id.get(worker_id)
        if k is not None:
            k.next_probe = self.clock() + 0.2

    async def _watch(self) -> None:
        while True:
            now = self.clock()
            for wid in self.router.check_liveness(now):
                k = self.by_id.get(wid)
                if k is not None and k.received == 0:
                    log.error(
                        "worker %s: not one message from its event stream %s since it joined; "
                        "can this host reach that address (firewall, --advertise-events)?",
                        wid,
                        k.events_endpoint,
                    )
            probes = []
            for url, k in list(self.known.items()):
                w = self.router.workers.get(k.worker_id) if k.worker_id else None
                if w is not None and w.up:
                    if now - w.last_seen > 1.5 and now >= k.next_probe:
                        k.next_probe = now + self.probe_interval_s
                        probes.append(self._probe_health(w.worker_id, url))
                elif now >= k.next_probe:
                    k.next_probe = now + self.probe_interval_s
                    probes.append(self.register(url))
            if probes:
                await asyncio.gather(*probes, return_exceptions=True)
            await asyncio.sleep(0.25)

    async def _probe_health(self, worker_id: str, url: str) -> None:
        try:
            r = await self.client.get(f"{url}/info", headers=self.headers(worker_id), timeout=5.0)
            if r.status_code in (401, 403):
                self.mark_down(worker_id, f"refused this router's credential ({r.status_code})")
                return
            data = r.json()
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            self.mark_down(worker_id, f"unreachable: {e!r}")
            return
        except (httpx.HTTPError, ValueError):
            return  # slow or busy, not gone: the heartbeat timeout decides
        w = self.router.workers.get(worker_id)
        if w is not None and data.get("epoch") != w.info.epoch:
            with contextlib.suppress(Refused):
                await self.register(url)  # restarted between two probes
