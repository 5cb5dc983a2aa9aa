"""One request after it reached a worker: worker deltas become OpenAI responses (SSE or a
whole body), and the bookkeeping (router, fair queue, metrics) happens exactly once however
the response ends: finished, failed, cancelled, or left by its client before the first byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvgrid.server.protocol import APIError

if TYPE_CHECKING:
    from kvgrid.server.frontend import Frontend

log = logging.getLogger(__name__)


class WorkerLost(Exception):
    """The worker serving a stream went away after output had been sent."""


class RequestRun:
    """One request after it reached a worker: turns worker deltas into OpenAI responses and
    does the bookkeeping (router, fair queue, metrics) exactly once."""

    def __init__(self, fe: Frontend, rid, chat, req, tokens, tenant, d, resp, t_arrival):
        self.fe, self.rid, self.chat, self.req, self.tokens = fe, rid, chat, req, tokens
        self.tenant, self.d, self.resp, self.t_arrival = tenant, d, resp, t_arrival
        self.created = int(time.time())
        self.text: list[str] = []
        self.ids: list[int] = []
        self.final: dict | None = None
        self._first = self._last = None
        self._closed = False

    async def _iterate(self):
        m = self.fe.metrics
        model = self.fe.config.model_name
        async for msg in self.fe.deltas(self.d, self.resp):
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
            self.text.append(msg.get("text", ""))
            self.ids.extend(msg.get("ids", ()))
            if "finish_reason" in msg:
                self.final = msg
            yield msg

    def usage(self) -> dict:
        f = self.final or {}
        prompt = f.get("prompt_tokens", len(self.tokens))
        completion = f.get("completion_tokens", len(self.ids))
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
        now = time.monotonic()
        fe.router.on_finish(self.rid, now, self.ids if self.final else None)
        fe.scheduler.release(self.tenant.name)
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
            self.fe.abort(self.d, self.rid)
        self.close()
        with contextlib.suppress(Exception):
            await self.resp.aclose()

    def _chunk(
        self,
        text: str | None,
        finish: str | None,
        first: bool = False,
        token_ids: list[int] | None = None,
    ) -> dict:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        if token_ids:
            choice["token_ids"] = token_ids
        return {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.fe.config.model_name,
            "choices": [choice],
        }

    async def sse(self):
        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        error = None
        try:
            if self.chat:
                yield event(self._chunk("", None, first=True))
            # a model without a tokenizer (random weights of a shape) has no text: its
            # chunks carry the token ids, so a client sees each token and the stream's timing
            textless = self.fe.config.tokenizer is None
            async for msg in self._iterate():
                finish = msg.get("finish_reason")
                ids = msg.get("ids") if textless else None
                if msg.get("text") or finish or ids:
                    yield event(self._chunk(msg.get("text", ""), finish, token_ids=ids))
            opts = self.req.stream_options
            if opts is not None and opts.include_usage:
                u = self._chunk(None, None)
                u["choices"], u["usage"] = [], self.usage()
                yield event(u)
            yield "data: [DONE]\n\n"
        except WorkerLost as e:
            error = 502
            yield event(APIError(502, f"the worker serving this request failed: {e}").body())
            yield "data: [DONE]\n\n"
        finally:
            if self.final is None and error is None:  # client disconnected: free the blocks
                self.fe.abort(self.d, self.rid)
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
                    self.fe.abort(self.d, self.rid)
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    self.close()
                    return Response(status_code=499)
            task.result()
        except WorkerLost as e:
            self.close(502)
            return APIError(502, f"the worker serving this request failed: {e}").response()
        except Exception:
            log.exception("request %s failed while streaming from %s", self.rid, self.d.worker_id)
            self.close(500)
            return APIError(500, "internal error while streaming the answer").response()
        finally:
            if not task.done():
                task.cancel()
            await self.release()  # cancelled: the worker, the connection and the slot go back
        self.close()
        f = self.final or {}
        text = "".join(self.text)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": f.get("finish_reason"),
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": f.get("finish_reason"),
            }
            obj = "text_completion"
        body = {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.fe.config.model_name,
            "choices": [choice],
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
