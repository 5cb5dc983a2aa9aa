"""FleetLink: the frontend's I/O with its workers, feeding the pure Router.

- registers workers (from ``--worker URL`` configuration or their own announcements),
- subscribes to every worker's KV events and load reports (one ZeroMQ SUB socket),
- fetches snapshots when the index reports a gap or a worker (re)joins,
- watches liveness: a worker whose heartbeat stops, or whose port refuses connections, is
  marked down; a down or unknown worker is probed until it answers, then rejoins.

Everything runs on the frontend's event loop, so the Router needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass

import httpx
import zmq
import zmq.asyncio

from kvgrid.router import wire
from kvgrid.router.router import Router
from kvgrid.router.workers import WorkerInfo

log = logging.getLogger(__name__)


@dataclass
class _Known:
    url: str
    worker_id: str | None = None
    events_endpoint: str | None = None
    next_probe: float = 0.0


class FleetLink:
    def __init__(
        self,
        router: Router,
        worker_urls: list[str] = (),
        probe_interval_s: float = 1.0,
        clock=time.monotonic,
    ) -> None:
        self.router = router
        self.clock = clock
        self.probe_interval_s = probe_interval_s
        self.known: dict[str, _Known] = {u.rstrip("/"): _Known(u.rstrip("/")) for u in worker_urls}
        self.by_id: dict[str, _Known] = {}
        self.headers = {}
        if os.environ.get("KVGRID_WORKER_TOKEN"):
            self.headers["x-kvgrid-worker-token"] = os.environ["KVGRID_WORKER_TOKEN"]
        self.client: httpx.AsyncClient | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._snapshotting: set[str] = set()
        self._registering: set[str] = set()

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        self.client = httpx.AsyncClient(
            headers=self.headers,
            limits=limits,
            timeout=httpx.Timeout(connect=2.0, read=None, write=30.0, pool=30.0),
        )
        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 1_000_000)
        self._sub.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_KV)
        self._sub.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_LOAD)
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._watch())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.client:
            await self.client.aclose()
        if self._sub is not None:
            self._sub.close(0)
        if self._ctx is not None:
            self._ctx.term()

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
        if k.events_endpoint and self._sub is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disconnect(k.events_endpoint)

    # ---- registration --------------------------------------------------------------------

    async def register(self, url: str) -> bool:
        """Fetch the worker's /info and (re)join it. False if it does not answer."""
        url = url.rstrip("/")
        self.add_url(url)
        if url in self._registering:
            return False
        self._registering.add(url)
        try:
            r = await self.client.get(f"{url}/info", timeout=2.0)
            r.raise_for_status()
            data = r.json()
        except (httpx.HTTPError, ValueError) as e:
            log.debug("worker %s not reachable: %s", url, e)
            return False
        finally:
            self._registering.discard(url)
        info = WorkerInfo.from_dict({**data, "url": url})
        k = self.known.get(url)
        if k is None:  # forgotten while we asked (drained before it joined)
            return False
        endpoint = data.get("events_endpoint")
        if k.events_endpoint and k.events_endpoint != endpoint:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disconnect(k.events_endpoint)
            k.events_endpoint = None
        if endpoint and not k.events_endpoint:
            self._sub.connect(endpoint)
            k.events_endpoint = endpoint
        k.worker_id = info.worker_id
        self.by_id[info.worker_id] = k
        was_up = info.worker_id in self.router.workers and self.router.workers[info.worker_id].up
        if self.router.add_worker(info, self.clock()):
            self.request_snapshot(info.worker_id)
        if not was_up:
            log.info("worker %s joined (%s, epoch %s)", info.worker_id, url, info.epoch)
        return True

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
            r = await self.client.get(f"{w.info.url}/kv/snapshot", timeout=10.0)
            r.raise_for_status()
            snap = wire.decode_snapshot(r.content)
            status = self.router.on_snapshot(
                worker_id, snap["seq"], snap["tiers"], self.clock(), snap.get("epoch", "")
            )
            if status == "gap":
                self._snapshotting.discard(worker_id)
                self.request_snapshot(worker_id)
        except (httpx.HTTPError, wire.WireError) as e:
            log.warning("snapshot of %s failed: %s", worker_id, e)
        finally:
            self._snapshotting.discard(worker_id)

    # ---- event stream --------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        while True:
            try:
                topic, payload = await self._sub.recv_multipart()
            except ValueError:
                continue  # not two frames: not ours
            now = self.clock()
            try:
                if topic == wire.TOPIC_KV:
                    batch, epoch = wire.decode_batch(payload)
                    if self.router.on_events(batch, now, epoch) == "gap":
                        self.request_snapshot(batch.worker_id)
                elif topic == wire.TOPIC_LOAD:
                    report = wire.decode_load(payload)
                    if self.router.on_load(report, now):
                        self.request_snapshot(report["worker_id"])
            except wire.WireError as e:
                log.warning("dropped a bad message on %r: %s", topic, e)

    # ---- liveness ------------------------------------------------------------------------

    def mark_down(self, worker_id: str, reason: str) -> None:
        self.router.mark_down(worker_id, self.clock(), reason)
        k = self.by_id.get(worker_id)
        if k is not None:
            k.next_probe = self.clock() + 0.2

    async def _watch(self) -> None:
        while True:
            now = self.clock()
            self.router.check_liveness(now)
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
            r = await self.client.get(f"{url}/info", timeout=5.0)
            data = r.json()
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            self.mark_down(worker_id, f"unreachable: {e!r}")
            return
        except (httpx.HTTPError, ValueError):
            return  # slow or busy, not gone: the heartbeat timeout decides
        w = self.router.workers.get(worker_id)
        if w is not None and data.get("epoch") != w.info.epoch:
            await self.register(url)  # restarted between two probes
