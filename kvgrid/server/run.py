"""One request after it reached a worker: worker deltas become OpenAI responses (SSE or a
whole body), a worker lost on the way hands the request to another (the delivered output
goes with it, kvgrid.server.relay), and the bookkeeping (router, fair queue, metrics) happens
exactly once however the response ends: finished, failed, cancelled, or left by its client
before the first byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvgrid.server.prepare import Prepared, choice_states
from kvgrid.server.protocol import APIError
from kvgrid.server.relay import Migration, WorkerLost

if TYPE_CHECKING:
    from kvgrid.server.frontend import Frontend

log = logging.getLogger(__name__)


class RequestRun:
    """One request after it reached a worker: turns worker deltas into OpenAI responses,
    moves the request to another worker when its worker is lost, and does the bookkeeping
    (router, fair queue, metrics) exactly once."""

    def __init__(
        self, fe: Frontend, rid, chat, req, prep: Prepared, tenant, d, resp, t_arrival
    ) -> None:
        self.fe, self.rid, self.chat, self.req, self.tokens = fe, rid, chat, req, prep.tokens
        self.params, self.tenant, self.d, self.resp = prep.params, tenant, d, resp
        self.t_arrival = t_arrival
        self.created = int(time.time())
        self.choices = choice_states(prep, chat, fe.config.tokenizer, fe.tool_parser)
        self.final: dict | None = None
        self._first = self._last = None
        self._closed = False
        self.migration = Migration()
        fe.runs.add(self)

    @property
    def worker_rid(self) -> str:
        """The request's id at its current worker."""
        return self.migration.worker_request_id(self.rid)

    async def _messages(self):
        """The workers' messages for this request, across migrations."""
        while True:
            try:
                async for msg in self.fe.deltas(self.d, self.resp):
                    yield msg
                return
            except WorkerLost as e:
                await self._migrate(e)

    async def _migrate(self, err: WorkerLost) -> None:
        """Resume on another worker from what was delivered, or raise WorkerLost."""
        fe, mig, model = self.fe, self.migration, self.fe.config.model_name
        w = fe.router.workers.get(self.d.worker_id)
        mig.lost[self.d.worker_id] = w.info.epoch if w is not None else ""
        fe.router.on_finish(self.rid, time.monotonic())
        if mig.count >= fe.config.max_migrations:
            fe.metrics.migrations.labels(model, "limit").inc()
            raise WorkerLost(f"{err}; not resumed (limit of {mig.count} migrations)")
        p = self.params
        if p.n != 1 or p.logprobs is not None or p.prompt_logprobs is not None:
            fe.metrics.migrations.labels(model, "unsupported").inc()
            raise WorkerLost(f"{err}; not resumed (a request with several choices or logprobs)")
        mig.count += 1
        resume = Migration.resume_body(self.ids, len(self.choices[0].text))
        try:
            self.d, self.resp = await fe.open_stream(
                self.rid, self.tokens, self.params, self.tenant, resume, mig.lost, self.worker_rid
            )
        except APIError as e:
            outcome = "no_worker" if e.status == 503 else "failed"
            fe.metrics.migrations.labels(model, outcome).inc()
            raise WorkerLost(f"{err}; could not resume it: {e.message}") from None
        mig.resume_at = len(self.ids)
        fe.metrics.migrations.labels(model, "resumed").inc()
        log.warning("request %s resumed on %s after %d tokens (%s)",
                    self.rid, self.d.worker_id, len(self.ids), err)  # fmt: skip

    async def _iterate(self):
        m = self.fe.metrics
        model = self.fe.config.model_name
        async for msg in self._messages():
            now = time.monotonic()
            if msg.get("ids"):
                if self._first is None:
                    self._first = now
                    m.ttft.labels(model).observe(now - self.t_arrival)
                    if self.fe.autoscaler is not None:
                        self.fe.autoscaler.window.first_token(now - self.t_arrival)
                    self.fe.router.on_first_token(self.rid, now)
                elif self._last is not None:
                    m.itl.labels(model).observe(now - self._last)
                self._last = now
            choice = self.choices[msg.get("index", 0)]
            if "prompt_logprobs" in msg:
                for c in self.choices:
                    c.echo = (c.echo[0], c.echo[1], msg["prompt_logprobs"]) if c.echo else None
            choice.add(msg)
            if msg.get("done"):
                self.final = msg
            yield msg

    @property
    def ids(self) -> list[int]:
        """The first choice's output tokens (what the router follows the conversation by)."""
        return self.choices[0].ids

    def usage(self) -> dict:
        f = self.final or {}
        prompt = f.get("prompt_tokens", len(self.tokens))
        completion = sum(len(c.ids) for c in self.choices)
        if not self.choices[0].drop:
            completion = f.get("completion_tokens", completion)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": f.get("cached_tokens", 0)},
        }

    def close(self, error_status: int | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        fe, m, model = self.fe, self.fe.metrics, self.fe.config.model_name
        fe.runs.discard(self)
        now = time.monotonic()
        # the last route counted the resumed tokens as context: only what followed is output
        out = self.ids[self.migration.resume_at :] if self.final else None
        fe.router.on_finish(self.rid, now, out)
        fe.scheduler.release(self.tenant.name)
        if self.migration.lost:
            fate = "error" if error_status else "completed" if self.final else "aborted"
            m.migrated_requests.labels(model, fate).inc()
        if error_status is not None:
            m.errors.labels(model, str(error_status)).inc()
            return
        if self.final is None:  # client went away
            m.success.labels(model, "abort").inc()
            return
        u = self.usage()
        m.e2e.labels(model).observe(now - self.t_arrival)
        n_out = u["completion_tokens"]
        if fe.autoscaler is not None and n_out > 1 and self._first is not None:
            fe.autoscaler.window.finished((self._last - self._first) / (n_out - 1))
        m.prompt_tokens.labels(model).inc(u["prompt_tokens"])
        m.generation_tokens.labels(model).inc(u["completion_tokens"])
        m.prompt_hist.labels(model).observe(u["prompt_tokens"])
        m.gen_hist.labels(model).observe(u["completion_tokens"])
        cached = u["prompt_tokens_details"]["cached_tokens"]
        m.cached_tokens.labels(model).inc(cached)
        t = self.final.get("transfer")
        if t:
            m.transfers.labels(t.get("outcome") or "unknown").inc()
            m.transfer_bytes.inc(t.get("bytes", 0))
            m.transfer_seconds.observe(t.get("seconds", 0.0))
        m.predicted_cached.inc(self.d.predicted_cached_tokens)
        m.prediction_match.labels(str(cached == self.d.predicted_cached_tokens).lower()).inc()
        m.success.labels(model, self.final.get("finish_reason") or "stop").inc()

    async def release(self) -> None:
        """However the response ended: an unfinished request is aborted at the worker, the
        worker connection returned, the router and the fair queue told. Idempotent."""
        if self._closed:
            return
        if self.final is None:
            self.fe.abort(self.d, self.worker_rid)
        self.close()
        with contextlib.suppress(Exception):
            await self.resp.aclose()

    def _chunk(self, choices: list[dict]) -> dict:
        return {
            "id": self.rid,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.fe.config.model_name,
            "choices": choices,
        }

    async def sse(self):
        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        error = None
        opts = self.req.stream_options
        try:
            if self.chat:
                yield event(self._chunk([c.opening() for c in self.choices]))
            async for msg in self._iterate():
                choice = self.choices[msg.get("index", 0)]
                parts = []
                if not choice.started:  # a completion's echoed prompt
                    opening = choice.opening()
                    parts += [opening] if opening is not None else []
                parts += choice.chunks(msg)
                for part in parts:
                    chunk = self._chunk([part])
                    if opts is not None and opts.continuous_usage_stats:
                        chunk["usage"] = self.usage()
                    yield event(chunk)
            if opts is not None and opts.include_usage:
                u = self._chunk([])
                u["usage"] = self.usage()
                yield event(u)
            yield "data: [DONE]\n\n"
        except WorkerLost as e:
            error = 502
            yield event(APIError(502, f"the worker serving this request was lost: {e}").body())
            yield "data: [DONE]\n\n"
        finally:
            if self.final is None and error is None:  # client disconnected: free the blocks
                self.fe.abort(self.d, self.worker_rid)
            self.close(error)

    async def whole(self, request: Request, headers: dict) -> Response:
        async def collect():
            async for _ in self._iterate():
                pass

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if not done and await request.is_disconnected():
                    task.cancel()
                    self.fe.abort(self.d, self.worker_rid)
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    self.close()
                    return Response(status_code=499)
            task.result()
        except WorkerLost as e:
            self.close(502)
            return APIError(502, f"the worker serving this request was lost: {e}").response()
        except Exception:
            log.exception("request %s failed while streaming from %s", self.rid, self.d.worker_id)
            self.close(500)
            return APIError(500, "internal error while streaming the answer").response()
        finally:
            if not task.done():
                task.cancel()
            await self.release()  # cancelled: the worker, the connection and the slot go back
        self.close()
        obj = "chat.completion" if self.chat else "text_completion"
        body = {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.fe.config.model_name,
            "choices": [c.choice() for c in self.choices],
            "usage": self.usage(),
        }
        return JSONResponse(body, headers=headers)


class RunResponse(StreamingResponse):
    """The SSE stream of a run. A stream whose generator never starts (the client left
    before the first byte) runs none of its cleanup, so the response itself releases the
    run when it ends, however it ends."""

    def __init__(self, run: RequestRun, headers: dict) -> None:
        super().__init__(run.sse(), media_type="text/event-stream", headers=headers)
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.run.release()
