"""The frontend's public routes, the ones /openapi.json describes (kvgrid.server.openapi):

    POST /v1/chat/completions, /v1/completions   (streaming SSE or not)
    POST /tokenize, /detokenize
    GET  /v1/models, /health

A completion: authenticate (API key -> tenant), parse and validate, tokenize (the router
needs the tokens for block keys, and the worker then receives exactly those tokens), wait
for a fair admission slot, route and start it on a worker (Frontend.open_stream), then
stream from the worker (kvgrid.server.run). Errors use OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kvgrid.server.prepare import prepare
from kvgrid.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_request,
)
from kvgrid.server.run import RequestRun, RunResponse
from kvgrid.server.tenants import QueueFull

if TYPE_CHECKING:
    from kvgrid.server.frontend import Frontend

log = logging.getLogger(__name__)


async def complete(fe: Frontend, request: Request, chat: bool) -> Response:
    """The body of /v1/chat/completions (``chat``) and /v1/completions."""
    t_arrival = time.monotonic()
    model = fe.config.model_name
    try:
        tenant = fe.authenticate(request)
        body = await request.body()
        req = parse_request(ChatCompletionRequest if chat else CompletionRequest, body)
        fe.check_model(req.model)
        prep = prepare(req, fe.config.tokenizer, fe.tool_parser)
        params, tokens = prep.params, prep.tokens
        if fe.autoscaler is not None:
            fe.autoscaler.window.arrived(len(tokens), params.max_tokens or 0)
        try:
            await asyncio.wait_for(fe.scheduler.acquire(tenant), fe.config.queue_timeout_s)
        except QueueFull as e:
            raise APIError(429, str(e), code="rate_limit_exceeded") from None
        except TimeoutError:
            raise APIError(
                503, f"no admission slot within {fe.config.queue_timeout_s:.0f}s"
            ) from None
    except APIError as e:
        fe.metrics.errors.labels(model, str(e.status)).inc()
        return e.response()
    fe.metrics.queue.labels(model).observe(time.monotonic() - t_arrival)
    fe.metrics.tenant_requests.labels(tenant.name).inc()
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    try:
        d, resp = await fe.open_stream(rid, tokens, params, tenant)
    except APIError as e:
        fe.scheduler.release(tenant.name)
        fe.metrics.errors.labels(model, str(e.status)).inc()
        return e.response()
    except BaseException as e:  # a bug or a cancellation: the slot goes back all the same
        fe.scheduler.release(tenant.name)
        fe.metrics.errors.labels(model, "500").inc()
        if not isinstance(e, Exception):
            raise
        log.exception("request %s failed before reaching a worker", rid)
        return APIError(500, "internal error before the request reached a worker").response()
    run = RequestRun(fe, rid, chat, req, prep, tenant, d, resp, t_arrival)
    headers = {
        "x-request-id": rid,
        "x-kvgrid-worker": d.worker_id,
        "x-kvgrid-predicted-cached-tokens": str(d.predicted_cached_tokens),
    }
    if d.remote_prefill:
        headers["x-kvgrid-prefill-worker"] = d.prefill.worker_id
    if req.stream:
        return RunResponse(run, headers)
    return await run.whole(request, headers)


def add_completion_routes(app: FastAPI, fe: Frontend) -> None:
    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await complete(fe, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(fe, request, chat=False)


async def _parse_for(fe: Frontend, request: Request, cls: type) -> Any:
    fe.authenticate(request)
    req = parse_request(cls, await request.body())
    fe.check_model(req.model)
    return req


def add_token_routes(app: FastAPI, fe: Frontend) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        try:
            req = await _parse_for(fe, request, TokenizeRequest)
            if (req.prompt is None) == (req.messages is None):
                raise APIError(400, "give either prompt or messages", param="prompt")
            tokens = fe.prompt_tokens(req)
        except APIError as e:
            return e.response()
        return JSONResponse(
            {"count": len(tokens), "max_model_len": fe.max_model_len(), "tokens": tokens}
        )

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        try:
            req = await _parse_for(fe, request, DetokenizeRequest)
            tok = fe.config.tokenizer
            if tok is None:
                raise APIError(400, "this model has no tokenizer")
            vocab = tok.vocab_size
            bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(
                    400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens"
                )
            text = tok.decode(req.tokens)
        except APIError as e:
            return e.response()
        return JSONResponse({"prompt": text})


def add_model_routes(app: FastAPI, fe: Frontend) -> None:
    """/v1/models and /health: what is served, and whether a request would be taken now."""

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            fe.authenticate(request)
        except APIError as e:
            return e.response()
        model = {
            "id": fe.config.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "kvgrid",
            "max_model_len": fe.max_model_len(),
        }
        return JSONResponse({"object": "list", "data": [model]})

    @app.get("/health")
    async def health() -> Response:
        """503 whenever a request could not be admitted now: no worker up, or every
        admission slot held."""
        up = [wid for wid, w in fe.router.workers.items() if w.up]
        adm = fe.scheduler
        full = adm.running >= adm.max_concurrent
        status = "ok" if up and not full else "no workers" if not up else "no admission slot free"
        admission = {"running": adm.running, "max_concurrent": adm.max_concurrent,
                     "waiting": adm.waiting()}  # fmt: skip
        return JSONResponse(
            {"status": status, "workers_up": up, "admission": admission},
            status_code=200 if status == "ok" else 503,
        )
