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

Here: the Frontend (authentication, routing a request and starting it on a worker, trying
another when one cannot take it), its config, and the app. The public routes are in
kvgrid.server.public_routes, the operator routes (and who may call them) in
kvgrid.server.operator; a request's life after it reached a worker is in kvgrid.server.run,
and a worker lost on the way hands the request to another one (kvgrid.server.relay).
/v1 needs an API key when keys are configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response

from kvgrid import envs
from kvgrid.engine.sampling_params import SamplingParams
from kvgrid.router.decision import Decision
from kvgrid.router.disagg import DisaggConfig
from kvgrid.router.policies import DEFAULT_POLICY
from kvgrid.router.router import NoWorkerError, Router, RouteRequest
from kvgrid.server import auth, relay
from kvgrid.server.config import FrontendConfig
from kvgrid.server.disagg import remote_spec, start_prefill
from kvgrid.server.links import FleetLink
from kvgrid.server.metrics import FrontendMetrics
from kvgrid.server.openapi import install_openapi
from kvgrid.server.operator import add_operator_routes
from kvgrid.server.prepare import prompt_tokens
from kvgrid.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
)
from kvgrid.server.public_routes import add_completion_routes, add_model_routes, add_token_routes
from kvgrid.server.relay import WorkerLost
from kvgrid.server.run import RequestRun
from kvgrid.server.tenants import FairScheduler, Tenant, TenantRegistry
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
        route_req = RouteRequest(
            rid, context, tenant.scope, self.config.model_name,
            shared_prefix_tokens=shared,
            whole_prompt=params.prompt_logprobs is not None,
        )  # fmt: skip
        wait_until = time.monotonic() + self.config.worker_wait_s
        attempts = 0
        while True:
            d = await self._route(route_req, tried, wait_until)
            epoch = self.router.workers[d.worker_id].info.epoch
            resp, msg = await self._start_on(rid, d, body, context)
            if resp is not None:
                return d, resp
            tried[d.worker_id] = epoch
            attempts += 1
            if attempts > self.config.max_retries:
                raise APIError(
                    503, f"no worker could take the request (tried {', '.join(tried)}): {msg}"
                )

    async def _route(self, req: RouteRequest, tried: dict[str, str], wait_until: float) -> Decision:
        """The router's decision, leaving out the workers that failed this request; a
        request that found no worker at all waits for one (starting, restarting, rejoining a
        restarted router) until ``wait_until``, one whose workers failed it does not."""
        while True:
            try:
                d = self.router.route(req, time.monotonic(), exclude=self._still_excluded(tried))
            except NoWorkerError as e:
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
            return d

    async def _start_on(
        self, rid: str, d: Decision, body: dict, context: list[int]
    ) -> tuple[httpx.Response | None, str]:
        """Send the request to ``d``'s worker (and start its remote prefill, if any): the
        worker's streaming response, or None and why the worker could not take it (then the
        decision is undone and another worker may take it)."""
        spec, ticket = remote_spec(d, self.link.key) if d.remote_prefill else (None, b"")
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
            # refused, reset, timed out, stopped answering or broke before a response: that
            # worker failed, and nothing has been generated there, so another may take it
            self._unroute(rid, d)
            self.link.mark_down(d.worker_id, f"request failed: {e!r}")
            return None, repr(e)
        except BaseException:
            self._unroute(rid, d)
            raise
        if resp.status_code == 200:
            if spec is not None:  # the decode worker expects the KV: now compute it
                start_prefill(self, d, {**body, "prompt_token_ids": context}, spec, ticket)
            return resp, ""
        return None, await self._refusal(rid, d, resp)

    async def _refusal(self, rid: str, d: Decision, resp: httpx.Response) -> str:
        """Why the worker answered ``resp`` (not 200), after undoing the decision. A 400 is
        the request's own fault (raised); a worker that refuses this router is marked down."""
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
        return msg

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


def _lifespan(fe: Frontend):
    """What the app starts and stops with it, in order: the fleet link, the Ray fleet (if
    any) and the autoscaler (if any); stopped in reverse."""

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

    return lifespan


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return APIError(500, f"internal error: {exc!r}").response()


def create_frontend_app(fe: Frontend) -> FastAPI:
    """The HTTP app serving ``fe``: the public routes (kvgrid.server.public_routes) and the
    operator ones (kvgrid.server.operator)."""
    app = FastAPI(title="kvgrid", lifespan=_lifespan(fe))
    install_openapi(app)
    app.add_exception_handler(Exception, _internal_error)
    add_completion_routes(app, fe)
    add_token_routes(app, fe)
    add_model_routes(app, fe)
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
    tenants = TenantRegistry.from_config(api_keys_file, secret, local_max_concurrent=max_concurrent)
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
