"""The frontend: OpenAI-compatible HTTP API in front of the router and its workers.

    POST /v1/chat/completions, /v1/completions   (streaming SSE or not)
    POST /tokenize, /detokenize
    GET  /v1/models, /health, /metrics, /openapi.json (the public routes only)
    GET  /debug/route?prompt=...  (or POST with a completion body): explain a decision, dry run
    GET  /debug/decisions         the last decisions with every candidate's numbers
    GET  /debug/router            workers, freshness, load, counters
    POST /internal/workers        {"url", "worker_id"}: a worker announces itself
    GET  /admin/scale             `kvgrid serve` scaling: workers, draining, actions
    POST /admin/scale             {"workers": N} resize now, or {"drain": "w1"}
    GET  /admin/state             what is held: admission slots, routes, and each worker's
                                  requests, G1 blocks, store pins and leases
    POST /admin/faults            injected faults of every worker (kvgrid.failpoints)

A request: authenticate (API key -> tenant), parse and validate, tokenize (the router
needs the tokens for block keys, and the worker then receives exactly those tokens), wait
for a fair admission slot, route, stream from the worker. A worker lost on the way (dead,
stopped, cut off) hands the request to another one (kvgrid.server.relay). Errors use
OpenAI's shape.

/v1 needs an API key when keys are configured; who may call the operator routes is in
kvgrid.server.operator; a request's life after it reached a worker in kvgrid.server.run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import asdict
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kvgrid import envs
from kvgrid.engine.sampling_params import SamplingParams
from kvgrid.router.disagg import DisaggConfig
from kvgrid.router.policies import DEFAULT_POLICY
from kvgrid.router.router import Decision, NoWorkerError, Router, RouteRequest
from kvgrid.server import auth, relay
from kvgrid.server.config import FrontendConfig
from kvgrid.server.disagg import remote_spec, start_prefill
from kvgrid.server.links import FleetLink
from kvgrid.server.metrics import FrontendMetrics
from kvgrid.server.openapi import install_openapi
from kvgrid.server.operator import add_operator_routes
from kvgrid.server.prepare import prepare, prompt_tokens
from kvgrid.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_request,
)
from kvgrid.server.relay import WorkerLost
from kvgrid.server.run import RequestRun, RunResponse
from kvgrid.server.tenants import FairScheduler, QueueFull, Tenant, TenantRegistry
from kvgrid.server.tool_parsers import get_parser

log = logging.getLogger(__name__)
decision_log = logging.getLogger("kvgrid.router.decisions")


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
        self.metrics = FrontendMetrics(router, config.model_name, link)
        self.runs: set[RequestRun] = set()  # requests that reached a worker, not closed
        self.tool_parser = get_parser(config.tool_call_parser, config.tokenizer)
        # kvgrid.server.autoscale.Autoscaler when `kvgrid serve` may scale its workers
        self.autoscaler: Any = None
        self.background: set[asyncio.Task] = set()  # remote prefills in flight
        self.bind_host = "127.0.0.1"  # set by the command that serves it
        # token ids of the prefixes tenants may share (tenants.TenantRegistry.shared_prefixes)
        self.shared_prefixes: list[list[int]] = []
        if tenants.shared_prefixes and config.tokenizer is not None:
            tok = config.tokenizer
            for p in tenants.shared_prefixes:
                text = tok.apply_chat_template(p, add_generation_prompt=False) if isinstance(
                    p, list) else p  # fmt: skip
                self.shared_prefixes.append(tok.encode(text, add_special_tokens=False))
        # kvgrid.server.ray.fleet.RayFleet when the workers are Ray actors (started and
        # stopped with the app, between the fleet link and the autoscaler)
        self.fleet: Any = None

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

    def is_admin(self, request: Request) -> bool:
        """The admin token, or (no token, no API keys, loopback) the machine's one user."""
        if auth.admin_token():
            return auth.check_admin(request.headers.get("authorization"))
        return not (self.tenants.auth_required or self.config.public)

    def require_admin(self, request: Request, what: str) -> None:
        if self.is_admin(request):
            return
        if auth.admin_token():
            raise APIError(401, f"{what} needs 'Authorization: Bearer <admin token>'")
        need = envs.KVGRID_ADMIN_TOKEN.name
        raise APIError(403, f"{what} needs the admin token: set {need} on the server")

    def shared_prefix_tokens(self, tenant: Tenant, tokens: list[int]) -> int:
        """Leading tokens of ``tokens`` inside a configured shared prefix (0: none): the
        longest common start with any of them, so a prompt that merely begins like one
        shares only what it has in common with it."""
        if not tenant.shares_prefixes:
            return 0
        best = 0
        for p in self.shared_prefixes:
            n = min(len(p), len(tokens))
            i = 0
            while i < n and p[i] == tokens[i]:
                i += 1
            best = max(best, i)
        return best

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist. This server serves "
                f"`{self.config.model_name}`.",
                param="model",
                code="model_not_found",
            )

    def prompt_tokens(
        self, req: ChatCompletionRequest | CompletionRequest | TokenizeRequest
    ) -> list[int]:
        return prompt_tokens(self.config.tokenizer, req, self.tool_parser)

    def max_model_len(self) -> int | None:
        """The context of the workers that are up (the smallest, if they differ)."""
        return min(
            (w.info.max_model_len for w in self.router.workers.values() if w.up), default=None
        )

    # ---- talking to a worker -------------------------------------------------------------

    async def open_stream(
        self,
        rid: str,
        tokens: list[int],
        params: SamplingParams,
        tenant: Tenant,
        resume: dict | None = None,
        exclude: dict[str, str] | None = None,
        worker_rid: str | None = None,
    ) -> tuple[Decision, httpx.Response]:
        """Route and start the request on a worker, trying others if one cannot take it
        (unreachable, failing, stopped, refusing this router), and waiting up to
        ``worker_wait_s`` for one to be up when there was none to try. ``exclude``: workers
        (id -> epoch) that failed this request; a new life of one of them may take it.
        ``resume``: the output already delivered (a migrated request); the route then
        counts those tokens as context."""
        tried: dict[str, str] = dict(exclude or {})
        shared = self.shared_prefix_tokens(tenant, tokens)
        body = {
            "request_id": worker_rid or rid,
            "prompt_token_ids": tokens,
            "params": asdict(params),
            "tenant": tenant.scope.hex(),
            "scope_id": self.config.scope_id,
            "shared_prefix_tokens": shared,
        }
        context = tokens
        if resume is not None:
            body["resume"] = resume
            context = tokens + resume["output_token_ids"]
        attempts = 0
        wait_until = time.monotonic() + self.config.worker_wait_s
        while True:
            try:
                d = self.router.route(
                    RouteRequest(
                        rid, context, tenant.scope, self.config.model_name,
                        shared_prefix_tokens=shared,
                        whole_prompt=params.prompt_logprobs is not None,
                    ),
                    time.monotonic(),
                    exclude=self._still_excluded(tried),
                )  # fmt: skip
            except NoWorkerError as e:
                # a request that found no worker at all waits for one (starting, restarting,
                # rejoining a restarted router); one whose workers failed it does not
                if tried or time.monotonic() >= wait_until:
                    raise APIError(503, f"no worker available: {e}") from None
                await asyncio.sleep(0.25)
                continue
            self.metrics.decision.observe(d.elapsed_s)
            if self.config.log_decisions:
                decision_log.info(d.log_line())
            else:
                decision_log.debug(d.log_line())
            if d.prefill is not None:
                where = "remote" if d.remote_prefill else "local"
                self.metrics.prefill_decisions.labels(where, d.prefill.reason).inc()
            spec, ticket = remote_spec(d, self.link.key) if d.remote_prefill else (None, b"")
            epoch = self.router.workers[d.worker_id].info.epoch
            req = self.link.client.build_request(
                "POST",
                f"{self.link.url(d.worker_id)}/generate",
                json={**body, "remote_prefill": spec},
                headers=self.link.headers(d.worker_id),
            )
            try:
                resp = await relay.send(self, d, req)
            except httpx.PoolTimeout:
                # our own connection pool is full: not the worker's fault
                self._unroute(rid, d)
                raise APIError(503, "the router is overloaded; retry later") from None
            except (httpx.TransportError, WorkerLost) as e:
                # refused, reset, timed out, stopped answering or broke before a response:
                # that worker failed, and nothing has been generated there, so another may
                # take the request
                self._unroute(rid, d)
                self.link.mark_down(d.worker_id, f"request failed: {e!r}")
                msg = repr(e)
            except BaseException:
                self._unroute(rid, d)
                raise
            else:
                if resp.status_code == 200:
                    if spec is not None:  # the decode worker expects the KV: now compute it
                        start_prefill(self, d, {**body, "prompt_token_ids": context}, spec, ticket)
                    return d, resp
                try:
                    text = (await resp.aread()).decode(errors="replace")
                except httpx.HTTPError as e:
                    text = f"its answer broke off: {e!r}"
                finally:
                    await resp.aclose()
                    self._unroute(rid, d)
                try:
                    msg = json.loads(text).get("error", text)
                except (ValueError, AttributeError):
                    msg = text
                if resp.status_code == 400:
                    raise APIError(400, msg)
                if resp.status_code in (401, 403, 409):
                    # the worker does not take this router's requests (credential, scopes)
                    log.error("worker %s refused a request: %s", d.worker_id, msg)
                    self.link.mark_down(d.worker_id, f"refused this router ({resp.status_code})")
                else:  # failing or busy (a stuck engine answers 503): another may take it
                    log.warning("worker %s could not take %s (%d): %s", d.worker_id, rid,
                                resp.status_code, msg)  # fmt: skip
            tried[d.worker_id] = epoch
            attempts += 1
            if attempts > self.config.max_retries:
                raise APIError(
                    503, f"no worker could take the request (tried {', '.join(tried)}): {msg}"
                )

    def _unroute(self, rid: str, d: Decision) -> None:
        """The decision was not carried out (the worker refused or is gone)."""
        now = time.monotonic()
        self.router.on_finish(rid, now)
        if d.remote_prefill:
            self.router.on_prefill_done(rid, now)

    def _still_excluded(self, tried: dict[str, str]) -> list[str]:
        """The workers of ``tried`` still in the life that failed (a restarted one is new)."""
        out = []
        for wid, epoch in tried.items():
            w = self.router.workers.get(wid)
            if w is not None and w.info.epoch == epoch:
                out.append(wid)
        return out

    def deltas(self, d: Decision, resp: httpx.Response):
        """Worker messages; raises WorkerLost if the worker dies or stalls mid-stream."""
        return relay.deltas(self, d, resp)

    def abort(self, d: Decision, rid: str) -> None:
        async def _abort():
            with contextlib.suppress(httpx.HTTPError, KeyError):
                await self.link.client.post(
                    f"{self.link.url(d.worker_id)}/abort/{rid}",
                    headers=self.link.headers(d.worker_id),
                    timeout=self.config.probe_s,
                )

        asyncio.get_running_loop().create_task(_abort())

    # ---- introspection -------------------------------------------------------------------

    async def state(self) -> dict:
        """What is held now, for checks that everything returns to idle: admission slots,
        open requests, routes in flight per worker, migrations, and each worker's own
        report (requests, G1 blocks in use, store pins and leases, background I/O)."""
        sched = self.scheduler
        ws = dict(self.router.workers)
        up = [wid for wid, w in ws.items() if w.up]
        reports = await asyncio.gather(*(self._worker_get(wid, "/internal/state") for wid in up))
        by_worker = dict(zip(up, reports))
        migrations: dict[str, float] = {}
        for counter in (self.metrics.migrations, self.metrics.migrated_requests):
            for metric in counter.collect():
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        k = sample.labels["outcome"]
                        migrations[k] = migrations.get(k, 0) + sample.value
        return {
            "admission": {"running": sched.running, "waiting": sched.waiting(),
                          "max_concurrent": sched.max_concurrent, "runs": len(self.runs),
                          "remote_prefills": len(self.background)},
            "router": {"inflight": {wid: len(w.inflight) for wid, w in ws.items()}},
            "migrations": migrations,
            "workers": {
                wid: {"up": w.up, "url": w.info.url, "freshness": self.router.freshness(wid),
                      "state": by_worker.get(wid)}
                for wid, w in ws.items()
            },
        }  # fmt: skip

    async def _worker_get(self, wid: str, path: str, body: dict | None = None) -> dict | None:
        """A worker's JSON answer on its internal API (POST with ``body``); None if none."""
        w = self.router.workers.get(wid)
        if w is None:
            return None
        url, hdr = f"{w.info.url}{path}", self.link.headers(wid)
        try:
            if body is None:
                r = await self.link.client.get(url, headers=hdr, timeout=self.config.probe_s)
            else:
                r = await self.link.client.post(
                    url, json=body, headers=hdr, timeout=self.config.probe_s
                )
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    async def set_faults(self, spec: dict) -> dict[str, dict | None]:
        """Set the injected faults (kvgrid.failpoints) of every worker up; their answers."""
        up = [wid for wid, w in self.router.workers.items() if w.up]
        answers = await asyncio.gather(*(self._worker_get(w, "/internal/faults", spec) for w in up))
        return dict(zip(up, answers))

    # ---- the endpoint body ---------------------------------------------------------------

    async def handle(self, request: Request, chat: bool) -> Response:
        t_arrival = time.monotonic()
        try:
            tenant = self.authenticate(request)
            body = await request.body()
            req = parse_request(ChatCompletionRequest if chat else CompletionRequest, body)
            self.check_model(req.model)
            prep = prepare(req, self.config.tokenizer, self.tool_parser)
            params, tokens = prep.params, prep.tokens
            if self.autoscaler is not None:
                self.autoscaler.window.arrived(len(tokens), params.max_tokens or 0)
            try:
                await asyncio.wait_for(self.scheduler.acquire(tenant), self.config.queue_timeout_s)
            except QueueFull as e:
                raise APIError(429, str(e), code="rate_limit_exceeded") from None
            except TimeoutError:
                raise APIError(
                    503, f"no admission slot within {self.config.queue_timeout_s:.0f}s"
                ) from None
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
        except BaseException as e:  # a bug or a cancellation: the slot goes back all the same
            self.scheduler.release(tenant.name)
            self.metrics.errors.labels(self.config.model_name, "500").inc()
            if not isinstance(e, Exception):
                raise
            log.exception("request %s failed before reaching a worker", rid)
            return APIError(500, "internal error before the request reached a worker").response()
        run = RequestRun(self, rid, chat, req, prep, tenant, d, resp, t_arrival)
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


def create_frontend_app(fe: Frontend) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        from kvgrid.gc_tuning import tune_gc

        await fe.link.start()
        if fe.fleet is not None:
            await fe.fleet.start()
        if fe.autoscaler is not None:
            fe.autoscaler.start()
        tune_gc()
        try:
            yield
        finally:
            if fe.autoscaler is not None:
                await fe.autoscaler.stop()
            if fe.fleet is not None:
                await fe.fleet.stop()
            await fe.link.stop()

    app = FastAPI(title="kvgrid", lifespan=lifespan)
    install_openapi(app)

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

    async def parse_for(request: Request, cls: type) -> Any:
        fe.authenticate(request)
        req = parse_request(cls, await request.body())
        fe.check_model(req.model)
        return req

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        try:
            req = await parse_for(request, TokenizeRequest)
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
            req = await parse_for(request, DetokenizeRequest)
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
                        "max_model_len": fe.max_model_len(),
                    }
                ],
            }
        )

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

    add_operator_routes(app, fe)
    return app


def build_frontend(
    model: str | None = None,
    load_format: str = "auto",
    served_model_name: str | None = None,
    worker_urls: list[str] = (),
    policy: str = DEFAULT_POLICY,
    api_keys_file: str | None = None,
    max_concurrent: int = 256,
    heartbeat_timeout_s: float = 10.0,
    disagg: DisaggConfig | None = None,
    control_key: auth.ControlKey | None = None,
    public: bool = False,
    **options: Any,
) -> Frontend:
    """The frontend for a model: its tokenizer, tenants, a router and the fleet link.
    ``control_key``: the cluster key workers are checked against (None: loopback workers
    only); ``public``: bound beyond loopback; ``options``: more FrontendConfig fields."""
    from kvgrid.models.loader import load_tokenizer, resolve_model
    from kvgrid.server.tenants import load_server_secret, scope_id

    if control_key is not None and not control_key.is_cluster:
        raise auth.CredentialError(
            f"a router needs the cluster control key, not worker {control_key.worker_id!r}'s"
        )
    spec = resolve_model(model, load_format)
    tokenizer = load_tokenizer(spec)
    keys_configured = bool(api_keys_file or envs.KVGRID_API_KEYS.is_set())
    secret = load_server_secret()[0] if keys_configured else None
    tenants = TenantRegistry.from_config(api_keys_file, secret)
    if tenants.auth_required and control_key is None:
        raise auth.CredentialError(
            "tenants need a control key: workers take tenant scopes only from a router that "
            "proves itself (--control-key-file, or KVGRID_CONTROL_KEY / KVGRID_CONTROL_KEY_FILE)"
        )
    router = Router(policy, heartbeat_timeout_s=heartbeat_timeout_s, disagg=disagg)
    link = FleetLink(router, list(worker_urls), control_key, scope_id(secret))
    return Frontend(
        router,
        link,
        tenants,
        FairScheduler(max_concurrent),
        FrontendConfig(
            served_model_name or spec.name,
            tokenizer,
            public=public,
            scope_id=scope_id(secret),
            **options,
        ),
    )
