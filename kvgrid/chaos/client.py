"""The campaign's client: one chat request, streamed or not, as an OpenAI client sees it;
what is in flight is visible to the fault injectors (which worker, how far along)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from dataclasses import dataclass, field

import httpx

from kvgrid.chaos.workload import Answer

_ids = itertools.count()


@dataclass
class Flight:
    """A request in flight: injectors pick their victims among these."""

    id: int
    stream: bool
    worker: str | None = None  # from the response headers, once they arrived
    chunks: int = 0  # content chunks received
    started: float = field(default_factory=time.monotonic)


class Flights:
    def __init__(self) -> None:
        self.live: dict[int, Flight] = {}
        self.changed = asyncio.Event()

    def add(self, stream: bool) -> Flight:
        f = Flight(next(_ids), stream)
        self.live[f.id] = f
        return f

    def touch(self) -> None:
        self.changed.set()

    def done(self, f: Flight) -> None:
        self.live.pop(f.id, None)
        self.changed.set()

    async def wait_for(self, pick, timeout_s: float) -> Flight | None:
        """The first flight ``pick`` accepts, waiting up to ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while True:
            for f in list(self.live.values()):
                if pick(f):
                    return f
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.2))


def _error_text(body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        return err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace") or "(empty body)"


async def ask(
    client: httpx.AsyncClient,
    url: str,
    body: dict,
    flights: Flights,
    deadline_s: float,
    close_after: int | None = None,
    headers: dict | None = None,
) -> Answer:
    """Send one chat request; ``close_after``: close a stream after that many content chunks
    (a client going away). Connection attempts are retried until the deadline (a router
    restarting); a connection that breaks once the request was sent is not."""
    a = Answer()
    f = flights.add(bool(body.get("stream")))
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                try:
                    await (_stream if f.stream else _whole)(
                        client, url, body, f, flights, a, close_after, headers
                    )
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.5)
                except (httpx.TransportError, json.JSONDecodeError) as e:
                    a.transport, a.error = "lost", repr(e)
                    break
    except TimeoutError:
        a.transport = "hung"
    finally:
        a.seconds = time.monotonic() - t0
        flights.done(f)
    return a


async def _whole(client, url, body, f: Flight, flights: Flights, a: Answer, _close, headers):
    r = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
    a.status, a.worker = r.status_code, r.headers.get("x-kvgrid-worker")
    if r.status_code != 200:
        a.error = _error_text(r.content)
        return
    data = r.json()
    choice = data["choices"][0]
    a.text = choice["message"]["content"] or ""
    a.finish_reason = choice.get("finish_reason")
    a.done = True


async def _stream(client, url, body, f: Flight, flights: Flights, a: Answer, close, headers):
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        a.status = r.status_code
        a.worker = f.worker = r.headers.get("x-kvgrid-worker")
        flights.touch()
        if r.status_code != 200:
            a.error = _error_text(await r.aread())
            return
        parts: list[str] = []
        try:
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    a.done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    err = obj["error"]
                    a.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                    continue
                for ch in obj.get("choices") or ():
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        parts.append(piece)
                        f.chunks += 1
                        flights.touch()
                    if ch.get("finish_reason"):
                        a.finish_reason = ch["finish_reason"]
                if close is not None and f.chunks >= close:
                    a.transport = "closed"
                    break
        finally:
            a.text = "".join(parts)
