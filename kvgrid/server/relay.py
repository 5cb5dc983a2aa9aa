"""The frontend's side of one worker stream: bounded waits and request migration.

Every wait on a worker (for the response headers, for the next delta) is watched: when the
router has marked the worker down (heartbeats stopped, a connection failed), or the stream
has been silent for ``stall_s`` and the worker's /health does not answer within ``probe_s``,
the worker is lost. A lost worker's request moves to another worker (``Migration``) with
its prompt and the tokens generated so far; the engine there continues it exactly where it
stopped (``LLMEngine.add_request(resume_output=...)``), so the client's stream goes on with
no token repeated or missing, and at temperature 0 the text equals an uninterrupted run's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from kvgrid.router.decision import Decision
    from kvgrid.server.frontend import Frontend

log = logging.getLogger(__name__)

_EOF = object()


class WorkerLost(Exception):
    """The worker serving a request died, stopped answering or failed."""


class Watch:
    """Whether the worker behind a silent wait is still there."""

    def __init__(self, fe: Frontend, d: Decision) -> None:
        self.fe, self.d = fe, d
        w = fe.router.workers.get(d.worker_id)
        self.epoch = w.info.epoch if w is not None else None
        self.since = time.monotonic()

    def heard(self) -> None:
        self.since = time.monotonic()

    async def check(self) -> None:
        """Raise WorkerLost if the worker is gone; probe it after ``stall_s`` of silence."""
        fe, wid = self.fe, self.d.worker_id
        w = fe.router.workers.get(wid)
        if w is None or not w.up or w.info.epoch != self.epoch:
            raise WorkerLost(f"worker {wid} went down")
        if time.monotonic() - self.since < fe.config.stall_s:
            return
        try:
            r = await fe.link.client.get(
                f"{w.info.url}/health", timeout=httpx.Timeout(fe.config.probe_s)
            )
            ok = r.status_code == 200
            why = f"/health answered {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            ok, why = False, f"no answer to /health in {fe.config.probe_s:.0f}s ({e!r})"
        if not ok:
            fe.link.mark_down(wid, f"stopped answering: {why}")
            raise WorkerLost(f"worker {wid} stopped answering ({why})")
        self.heard()  # alive, only slow: look again after another stall_s

    async def wait(self, task: asyncio.Future) -> Any:
        """``task``'s result, checking on the worker while it takes."""
        while True:
            done, _ = await asyncio.wait({task}, timeout=self.fe.config.stall_check_s)
            if done:
                return task.result()
            await self.check()


async def send(fe: Frontend, d: Decision, req: httpx.Request) -> httpx.Response:
    """Send ``req`` to the worker of ``d`` and wait for its response headers, bounded."""
    task = asyncio.ensure_future(fe.link.client.send(req, stream=True))
    try:
        return await Watch(fe, d).wait(task)
    except BaseException:
        task.cancel()
        with contextlib.suppress(BaseException):
            resp = await task
            await resp.aclose()
        raise


async def deltas(fe: Frontend, d: Decision, resp: httpx.Response):
    """The worker's messages until the final one; WorkerLost if it dies, stalls, fails, or
    ends the stream without finishing."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for line in resp.aiter_lines():
                if line:
                    q.put_nowait(line)
            q.put_nowait(_EOF)
        except httpx.HTTPError as e:
            q.put_nowait(e)

    task = asyncio.ensure_future(pump())
    watch = Watch(fe, d)
    wid = d.worker_id
    try:
        while True:
            try:
                item = await asyncio.wait_for(q.get(), fe.config.stall_check_s)
            except TimeoutError:
                await watch.check()
                continue
            watch.heard()
            if item is _EOF:
                raise WorkerLost(f"worker {wid} ended the stream early")
            if isinstance(item, Exception):
                fe.link.mark_down(wid, f"stream broke: {item!r}")
                raise WorkerLost(f"worker {wid} failed mid-stream: {item!r}")
            try:
                msg = json.loads(item)
            except ValueError:
                raise WorkerLost(f"worker {wid} sent a malformed message") from None
            if "error" in msg:
                raise WorkerLost(f"worker {wid}: {msg['error']}")
            yield msg
            if msg.get("done"):  # the last line; each choice has finished before it
                return
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await resp.aclose()


class Migration:
    """Where one request stands across workers: the tokens and text delivered so far (what
    a new worker resumes from) and the workers it lost."""

    def __init__(self) -> None:
        self.count = 0  # migrations done
        self.lost: dict[str, str] = {}  # workers that failed this request -> their epoch
        self.resume_at = 0  # output tokens the current worker was given to resume from

    def worker_request_id(self, rid: str) -> str:
        # a stopped worker that comes back may still hold the old attempt's id
        return rid if not self.count else f"{rid}~{self.count}"

    @staticmethod
    def resume_body(ids: list[int], emitted_chars: int) -> dict | None:
        if not ids and not emitted_chars:
            return None  # nothing delivered yet: a plain retry
        return {"output_token_ids": list(ids), "emitted_text_len": emitted_chars}
