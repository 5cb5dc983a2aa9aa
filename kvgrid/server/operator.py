"""The frontend's operator and control-plane routes: /metrics, /debug/*, /admin/* (scaling,
what is held, fault injection), and /internal/workers (a worker's registration, with its
control-key token).

Who sees what: a tenant sees its own requests only (/debug/route, /debug/decisions); the
admin token (KVGRID_ADMIN_TOKEN) sees everything. /debug/router and /admin need it whenever
API keys are configured or the server is bound beyond loopback, as /metrics does beyond
loopback (its labels name tenants).
"""

from __future__ import annotations

import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvgrid.router.router import NoWorkerError, RouteRequest
from kvgrid.server import auth
from kvgrid.server.links import Refused
from kvgrid.server.prepare import prepare
from kvgrid.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from kvgrid.server.tenants import Tenant


def add_operator_routes(app: FastAPI, fe) -> None:
    """``fe``: the kvgrid.server.frontend.Frontend the routes read."""

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if fe.config.public:  # tenant names label series: the operator's view only
            try:
                fe.require_admin(request, "/metrics")
            except APIError as e:
                return e.response()
        return Response(generate_latest(fe.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def viewer(request: Request) -> Tenant | None:
        """None for the admin (sees every tenant's requests), else the caller's tenant."""
        if auth.admin_token() and auth.check_admin(request.headers.get("authorization")):
            return None
        tenant = fe.authenticate(request)
        return None if fe.is_admin(request) else tenant

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
                cls = (
                    ChatCompletionRequest
                    if isinstance(data, dict) and "messages" in data
                    else CompletionRequest
                )
                req = parse_request(cls, body)
            else:
                prompt = request.query_params.get("prompt")
                if prompt is None:
                    raise APIError(400, "give ?prompt=... or POST a completion body")
                req = CompletionRequest(prompt=prompt)
            prep = prepare(req, fe.config.tokenizer, fe.tool_parser)
            tokens = prep.tokens
            # the caller's own scope: another tenant's blocks never match
            d = fe.router.route(
                RouteRequest(
                    "debug", tokens, tenant.scope, fe.config.model_name,
                    shared_prefix_tokens=fe.shared_prefix_tokens(tenant, tokens),
                    whole_prompt=prep.params.prompt_logprobs is not None,
                ),
                time.monotonic(),
                dry_run=True,
            )  # fmt: skip
        except APIError as e:
            return e.response()
        except NoWorkerError as e:
            return APIError(503, str(e)).response()
        return JSONResponse(d.to_dict())

    @app.get("/debug/decisions")
    async def debug_decisions(request: Request, limit: int = 20) -> Response:
        try:
            who = viewer(request)
        except APIError as e:
            return e.response()
        if not 1 <= limit <= 256:
            return APIError(400, "limit must be between 1 and 256", param="limit").response()
        mine = [d for d in fe.router.decisions if who is None or d.tenant == who.scope]
        return JSONResponse([d.to_dict() for d in mine[-limit:]])

    @app.get("/debug/router")
    async def debug_router(request: Request) -> Response:
        try:
            fe.require_admin(request, "/debug/router")
        except APIError as e:
            return e.response()
        state = fe.router.snapshot_state()
        state["bad_messages"] = dict(fe.link.bad_messages)
        return JSONResponse(state)

    def admin(request: Request) -> APIError | None:
        """Scaling changes the whole server: the admin's alone."""
        try:
            fe.require_admin(request, "admin endpoints")
        except APIError as e:
            return e
        if fe.autoscaler is None:
            return APIError(
                404, "scaling is off: run `kvgrid serve` with --autoscale or --max-workers"
            )
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
        usage = (
            'body must be {"workers": N}, {"prefill_workers": N}, {"decode_workers": N} '
            'or {"drain": "WORKER_ID"}'
        )
        try:
            body = await request.json()
        except ValueError:
            return APIError(400, usage).response()
        try:
            if not isinstance(body, dict) or len(body) != 1:
                raise ValueError(usage)
            if "workers" in body:
                acts = fe.autoscaler.resize(body["workers"])
            elif "prefill_workers" in body:
                acts = fe.autoscaler.resize(body["prefill_workers"], "prefill")
            elif "decode_workers" in body:
                acts = fe.autoscaler.resize(body["decode_workers"], "decode")
            elif "drain" in body and isinstance(body["drain"], str):
                acts = fe.autoscaler.drain(body["drain"])
            else:
                raise ValueError(usage)
        except KeyError as e:
            return APIError(404, f"no worker {e} under this server's scaling").response()
        except ValueError as e:
            return APIError(400, str(e)).response()
        return JSONResponse({**fe.autoscaler.state(), "done": [a.to_dict() for a in acts]})

    @app.get("/admin/state")
    async def state(request: Request) -> Response:
        try:
            fe.require_admin(request, "/admin/state")
        except APIError as e:
            return e.response()
        return JSONResponse(await fe.state())

    @app.post("/admin/faults")
    async def faults(request: Request) -> Response:
        """Fault injection (workers started with --allow-fault-injection only)."""
        try:
            fe.require_admin(request, "/admin/faults")
            spec = await request.json()
            if not isinstance(spec, dict):
                raise ValueError
        except APIError as e:
            return e.response()
        except ValueError:
            return APIError(
                400, "body must be a JSON object of kvgrid.failpoints fields"
            ).response()
        return JSONResponse(await fe.set_faults(spec))

    @app.post("/internal/workers")
    async def register(request: Request) -> Response:
        proven = None
        if fe.link.key is not None:
            proven = fe.link.key.check_worker_token(request.headers.get("authorization"))
            if proven is None:
                return APIError(401, "registration needs a worker's control-key token").response()
        try:
            body = await request.json()
            url = body["url"]
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return APIError(400, 'body must be {"url": "http://...", "worker_id": ...}').response()
        claimed = body.get("worker_id")
        if proven is not None and claimed not in (None, proven):
            return APIError(403, f"this token is worker {proven!r}'s, not {claimed!r}'s").response()
        k = fe.link.known.get(url.rstrip("/"))
        w = fe.router.workers.get(k.worker_id) if k and k.worker_id else None
        if w is not None and w.up and (proven is None or w.worker_id == proven):
            return JSONResponse({"registered": True})
        try:
            ok = await fe.link.register(url, proven)
        except Refused as e:
            return APIError(e.status, e.reason).response()
        return JSONResponse({"registered": ok})
