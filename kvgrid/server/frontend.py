"""The frontend: OpenAI-compatible HTTP API in front of the router and its workers.

    POST /v1/chat/completions, /v1/completions   (streaming SSE or not)
    GET  /v1/models, /health, /metrics
    GET  /debug/route?prompt=...  (or POST with a completion body): explain a decision, dry run
    GET  /debug/decisions         the last decisions with every candidate's numbers
    GET  /debug/router            workers, freshness, load, counters
    POST /internal/workers        {"url": ...}: a worker announces itself
    GET  /admin/scale             `kvgrid serve` scaling: workers, draining, actions
    POST /admin/scale             {"workers": N} resize now, or {"drain": "w1"}

A request: authenticate (API key -> tenant), parse and validate, tokenize (the router
needs the tokens for block keys, and the worker then receives exactly those tokens), wait
for a fair admission slot, route, stream from the worker. Errors use OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvgrid.engine.sampling_params import RequestError, SamplingParams
from kvgrid.router.disagg import DisaggConfig
from kvgrid.router.router import Decision, NoWorkerError, Router, RouteRequest
from kvgrid.server.disagg import remote_spec, start_prefill
from kvgrid.server.links import FleetLink
from kvgrid.server.metrics import FrontendMetrics
from kvgrid.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_max_tokens,
    parse_request,
)
from kvgrid.server.tenants import FairScheduler, QueueFull, Tenant, TenantRegistry

log = logging.getLogger(__name__)
decision_log = logging.getLogger("kvgrid.router.decisions")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class WorkerLost(Exception):
    """The worker serving a stream went away after output had been sent."""


@dataclass
class FrontendConfig:
    model_name: str = DEFAULT_MODEL_NAME
    tokenizer: Any = None  # kvgrid.models.tokenizer.Tokenizer, None: token-id prompts only
    max_retries: int = 2  # other workers tried when one refuses the connection
    log_decisions: bool = False


class Frontend:
    def __init__(
        self,
        router: Router,
        link: FleetLink,
        tenants: TenantRegistry,
        scheduler: FairScheduler,
        config: FrontendConfig,
    ) -> None:
        self.router, self.link, self.tenants, self.scheduler = router, link, tenants, scheduler
        self.config = config
        self.metrics = FrontendMetrics(router, config.model_name)
        # kvgrid.server.autoscale.Autoscaler when `kvgrid serve` may scale its workers
        self.autoscaler: Any = None
        self.background: set[asyncio.Task] = set()  # remote prefills in flight

    # ---- request preparation -------------------------------------------------------------

    def authenticate(self, request: Request) -> Tenant:
        tenant = self.tenants.authenticate(request.headers.get("authorization"))
        if tenant is None:
            raise APIError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        return tenant

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist. This server serves "
                f"`{self.config.model_name}`.",
                param="model",
                code="model_not_found",
            )

    def _tok(self):
        if self.config.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids")
        return self.config.tokenizer

    def prompt_tokens(self, req: ChatCompletionRequest | CompletionRequest) -> list[int]:
        if isinstance(req, ChatCompletionRequest):
            tok = self._tok()
            try:
                msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
                text = tok.apply_chat_template(msgs)
            except ValueError as e:
                raise APIError(400, f"messages: {e}", param="messages") from None
            return tok.encode(text, add_special_tokens=False)
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            p = p[0]
        if isinstance(p, str):
            return self._tok().encode(p)
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        return list(p)

    # ---- talking to a worker -------------------------------------------------------------

    async def open_stream(
        self, rid: str, tokens: list[int], params: SamplingParams, tenant: Tenant
    ) -> tuple[Decision, httpx.Response]:
        """Route and start the request on a worker, trying others if one is unreachable."""
        tried: list[str] = []
        body = {
            "request_id": rid,
            "prompt_token_ids": tokens,
            "params": asdict(params),
            "tenant": tenant.scope.hex(),
        }
        for _ in range(self.config.max_retries + 1):
            try:
                d = self.router.route(
                    RouteRequest(rid, tokens, tenant.scope, self.config.model_name),
                    time.monotonic(),
                    exclude=tried,
                )
            except NoWorkerError as e:
                raise APIError(503, f"no worker available: {e}") from None
            self.metrics.decision.observe(d.elapsed_s)
            if self.config.log_decisions:
                decision_log.info(d.log_line())
            else:
                decision_log.debug(d.log_line())
            if d.prefill is not None:
                where = "remote" if d.remote_prefill else "local"
                self.metrics.prefill_decisions.labels(where, d.prefill.reason).inc()
            spec = remote_spec(d) if d.remote_prefill else None
            url = self.link.url(d.worker_id)
            req = self.link.client.build_request(
                "POST", f"{url}/generate", json={**body, "remote_prefill": spec}
            )
            try:
                resp = await self.link.client.send(req, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as e:
                self._unroute(rid, d)
                self.link.mark_down(d.worker_id, f"connect failed: {e!r}")
                tried.append(d.worker_id)
                continue
            if resp.status_code == 200:
                if spec is not None:  # the decode worker expects the KV: now compute it
                    start_prefill(self, d, rid, tokens, tenant.scope, spec)
                return d, resp
            text = (await resp.aread()).decode(errors="replace")
            await resp.aclose()
            self._unroute(rid, d)
            try:
                msg = json.loads(text).get("error", text)
            except ValueError:
                msg = text
            if resp.status_code == 400:
                raise APIError(400, msg)
            raise APIError(502, f"worker {d.worker_id} failed: {msg}")
        raise APIError(503, f"no worker reachable (tried {', '.join(tried)})")

    def _unroute(self, rid: str, d: Decision) -> None:
        """The decision was not carried out (the worker refused or is gone)."""
        now = time.monotonic()
        self.router.on_finish(rid, now)
        if d.remote_prefill:
            self.router.on_prefill_done(rid, now)

    async def deltas(self, d: Decision, resp: httpx.Response):
        """Worker messages; raises WorkerLost if the worker dies mid-stream."""
        try:
            async for line in resp.aiter_lines():
                if not line:
                    continue
                msg = json.loads(line)
                if "error" in msg:
                    raise WorkerLost(msg["error"])
                yield msg
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            self.link.mark_down(d.worker_id, f"stream broke: {e!r}")
            raise WorkerLost(f"worker {d.worker_id} failed mid-stream: {e!r}") from None
        finally:
            await resp.aclose()

    def abort(self, d: Decision, rid: str) -> None:
        async def _abort():
            with contextlib.suppress(httpx.HTTPError, KeyError):
                await self.link.client.post(
                    f"{self.link.url(d.worker_id)}/abort/{rid}", timeout=5.0
                )

        asyncio.get_running_loop().create_task(_abort())

    # ---- the endpoint body ---------------------------------------------------------------

    async def handle(self, request: Request, chat: bool) -> Response:
        t_arrival = time.monotonic()
        try:
            tenant = self.authenticate(request)
            body = await request.body()
            req = parse_request(ChatCompletionRequest if chat else CompletionRequest, body)
            self.check_model(req.model)
            max_tokens = req.wanted_max_tokens if chat else req.max_tokens
            check_max_tokens(
                max_tokens,
                "max_completion_tokens"
                if chat and req.max_completion_tokens is not None
                else "max_tokens",
            )
            if not chat and req.logprobs is not None:
                raise APIError(400, "logprobs are not supported yet", param="logprobs")
            try:
                params = req.sampling_params(max_tokens)
            except RequestError as e:
                raise APIError(400, str(e)) from None
            tokens = self.prompt_tokens(req)
            if self.autoscaler is not None:
                self.autoscaler.window.arrived(len(tokens), params.max_tokens or 0)
            try:
                await self.scheduler.acquire(tenant)
            except QueueFull as e:
                raise APIError(429, str(e), code="rate_limit_exceeded") from None
        except APIError as e:
            self.metrics.errors.labels(self.config.model_name, str(e.status)).inc()
            return e.response()
        self.metrics.queue.labels(self.config.model_name).observe(time.monotonic() - t_arrival)
        self.metrics.tenant_requests.labels(tenant.name).inc()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            d, resp = await self.open_stream(rid, tokens, params, tenant)
        except APIError as e:
            self.scheduler.release(tenant.name)
            self.metrics.errors.labels(self.config.model_name, str(e.status)).inc()
            return e.response()
        run = _Run(self, rid, chat, req, tokens, tenant, d, resp, t_arrival)
        headers = {
            "x-request-id": rid,
            "x-kvgrid-worker": d.worker_id,
            "x-kvgrid-predicted-cached-tokens": str(d.predicted_cached_tokens),
        }
        if d.remote_prefill:
            headers["x-kvgrid-prefill-worker"] = d.prefill.worker_id
        if req.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream", headers=headers)
        return await run.whole(request, headers)


class _Run:
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

    def _chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict:
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
            # tokens still show, as empty chunks, so a client sees the stream's timing
            textless = self.fe.config.tokenizer is None
            async for msg in self._iterate():
                finish = msg.get("finish_reason")
                if msg.get("text") or finish or (textless and msg.get("ids")):
                    yield event(self._chunk(msg.get("text", ""), finish))
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
        finally:
            if not task.done():
                task.cancel()
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


def create_frontend_app(fe: Frontend) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        from kvgrid.gc_tuning import tune_gc

        await fe.link.start()
        if fe.autoscaler is not None:
            fe.autoscaler.start()
        tune_gc()
        try:
            yield
        finally:
            if fe.autoscaler is not None:
                await fe.autoscaler.stop()
            await fe.link.stop()

    app = FastAPI(title="kvgrid", lifespan=lifespan)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {exc!r}").response()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await fe.handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await fe.handle(request, chat=False)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            fe.authenticate(request)
        except APIError as e:
            return e.response()
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": fe.config.model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "kvgrid",
                        "max_model_len": min(
                            (w.info.max_model_len for w in fe.router.workers.values() if w.up),
                            default=None,
                        ),
                    }
                ],
            }
        )

    @app.get("/health")
    async def health() -> Response:
        up = [wid for wid, w in fe.router.workers.items() if w.up]
        status = 200 if up else 503
        return JSONResponse(
            {"status": "ok" if up else "no workers", "workers_up": up}, status_code=status
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(fe.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/debug/route", methods=["GET", "POST"])
    async def debug_route(request: Request) -> Response:
        try:
            tenant = fe.authenticate(request)
            if request.method == "POST":
                body = await request.body()
                try:
                    data = json.loads(body)
                except ValueError:
                    raise APIError(400, "request body is not valid JSON") from None
                cls = ChatCompletionRequest if "messages" in data else CompletionRequest
                req = parse_request(cls, body)
            else:
                prompt = request.query_params.get("prompt")
                if prompt is None:
                    raise APIError(400, "give ?prompt=... or POST a completion body")
                req = CompletionRequest(prompt=prompt)
            tokens = fe.prompt_tokens(req)
            d = fe.router.route(
                RouteRequest("debug", tokens, tenant.scope, fe.config.model_name),
                time.monotonic(),
                dry_run=True,
            )
        except APIError as e:
            return e.response()
        except NoWorkerError as e:
            return APIError(503, str(e)).response()
        return JSONResponse(d.to_dict())

    @app.get("/debug/decisions")
    async def debug_decisions(request: Request, limit: int = 20) -> Response:
        try:
            fe.authenticate(request)
        except APIError as e:
            return e.response()
        return JSONResponse([d.to_dict() for d in list(fe.router.decisions)[-limit:]])

    @app.get("/debug/router")
    async def debug_router(request: Request) -> Response:
        try:
            fe.authenticate(request)
        except APIError as e:
            return e.response()
        return JSONResponse(fe.router.snapshot_state())

    def admin(request: Request) -> APIError | None:
        """Scaling changes the whole server: with API keys configured, only the holder of
        KVGRID_ADMIN_TOKEN may; without (one local tenant), anyone who can reach it."""
        if fe.autoscaler is None:
            return APIError(
                404, "scaling is off: run `kvgrid serve` with --autoscale or --max-workers"
            )
        token = os.environ.get("KVGRID_ADMIN_TOKEN")
        if token:
            if request.headers.get("authorization") != f"Bearer {token}":
                return APIError(401, "admin endpoints need 'Authorization: Bearer <admin token>'")
        elif fe.tenants.auth_required:
            return APIError(403, "set KVGRID_ADMIN_TOKEN to use admin endpoints")
        return None

    @app.get("/admin/scale")
    async def scale_state(request: Request) -> Response:
        err = admin(request)
        if err is not None:
            return err.response()
        return JSONResponse(fe.autoscaler.state())

    @app.post("/admin/scale")
    async def scale(request: Request) -> Response:
        err = admin(request)
        if err is not None:
            return err.response()
        try:
            body = await request.json()
            if "workers" in body:
                acts = fe.autoscaler.resize(int(body["workers"]))
            elif "drain" in body:
                acts = fe.autoscaler.drain(str(body["drain"]))
            else:
                raise ValueError
        except KeyError as e:
            return APIError(404, f"no worker {e} under this server's scaling").response()
        except (ValueError, TypeError, AttributeError) as e:
            msg = str(e) or 'body must be {"workers": N} or {"drain": "WORKER_ID"}'
            return APIError(400, msg).response()
        return JSONResponse({**fe.autoscaler.state(), "done": [a.to_dict() for a in acts]})

    @app.post("/internal/workers")
    async def register(request: Request) -> Response:
        token = os.environ.get("KVGRID_WORKER_TOKEN")
        if token and request.headers.get("x-kvgrid-worker-token") != token:
            return APIError(401, "bad worker token").response()
        try:
            url = (await request.json())["url"]
        except (ValueError, KeyError, TypeError):
            return APIError(400, 'body must be {"url": ...}').response()
        k = fe.link.known.get(url.rstrip("/"))
        w = fe.router.workers.get(k.worker_id) if k and k.worker_id else None
        if w is None or not w.up:
            ok = await fe.link.register(url)
        else:
            ok = True
        return JSONResponse({"registered": ok})

    return app


def build_frontend(
    model: str | None = None,
    load_format: str = "auto",
    served_model_name: str | None = None,
    worker_urls: list[str] = (),
    policy: str = "ttft",
    api_keys_file: str | None = None,
    max_concurrent: int = 256,
    heartbeat_timeout_s: float = 10.0,
    log_decisions: bool = False,
    disagg: DisaggConfig | None = None,
) -> Frontend:
    """The frontend for a model: its tokenizer, tenants, a router and the fleet link."""
    from kvgrid.models.loader import load_tokenizer, resolve_model
    from kvgrid.server.tenants import load_server_secret

    spec = resolve_model(model, load_format)
    tokenizer = load_tokenizer(spec)
    keys_configured = bool(api_keys_file or os.environ.get("KVGRID_API_KEYS"))
    secret = load_server_secret() if keys_configured else None
    tenants = TenantRegistry.from_config(api_keys_file, secret)
    router = Router(policy, heartbeat_timeout_s=heartbeat_timeout_s, disagg=disagg)
    link = FleetLink(router, list(worker_urls))
    return Frontend(
        router,
        link,
        tenants,
        FairScheduler(max_concurrent),
        FrontendConfig(served_model_name or spec.name, tokenizer, log_decisions=log_decisions),
    )
