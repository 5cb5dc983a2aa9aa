"""The frontend's operator and control-plane routes: /metrics, /debug/*, /admin/* (scaling,
what is held, fault injection), and /internal/workers (a worker's registration, with its
control-key token). What is held (``held_state``) and the fault settings
(``set_worker_faults``) gather every worker's answer on its internal API.

Who sees what: a tenant sees its own requests only (/debug/route, /debug/decisions); the
admin token (KVGRID_ADMIN_TOKEN) sees everything. /debug/router and /admin need it whenever
API keys are configured or the server is bound beyond loopback, as /metrics does beyond
loopback (its labels name tenants).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvgrid.router.router import NoWorkerError, RouteRequest
from kvgrid.server import auth
from kvgrid.server.links import Refused
from kvgrid.server.prepare import prepare
from kvgrid.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from kvgrid.server.tenants import Tenant

if TYPE_CHECKING:
    from kvgrid.server.frontend import Frontend


async def held_state(fe: Frontend) -> dict:
    """What is held now, for checks that everything returns to idle: admission slots,
    open requests, routes in flight per worker, migrations, and each worker's own
    report (requests, G1 blocks in use, store pins and leases, background I/O)."""
    sched = fe.scheduler
    ws = dict(fe.router.workers)
    up = [wid for wid, w in ws.items() if w.up]
    reports = await asyncio.gather(*(_worker_json(fe, wid, "/internal/state") for wid in up))
    by_worker = dict(zip(up, reports))
    migrations: dict[str, float] = {}
    for counter in (fe.metrics.migrations, fe.metrics.migrated_requests):
        for metric in counter.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    k = sample.labels["outcome"]
                    migrations[k] = migrations.get(k, 0) + sample.value
    return {
        "admission": {"running": sched.running, "waiting": sched.waiting(),
                      "max_concurrent": sched.max_concurrent, "runs": len(fe.runs),
                      "remote_prefills": len(fe.background)},
        "router": {"inflight": {wid: len(w.inflight) for wid, w in ws.items()}},
        "migrations": migrations,
        "workers": {
            wid: {"up": w.up, "url": w.info.url, "freshness": fe.router.freshness(wid),
                  "state": by_worker.get(wid)}
            for wid, w in ws.items()
        },
    }  # fmt: skip


async def set_worker_faults(fe: Frontend, spec: dict) -> dict[str, dict | None]:
    """Set the injected faults (kvgrid.failpoints) of every worker up; their answers."""
    up = [wid for wid, w in fe.router.workers.items() if w.up]
    answers = await asyncio.gather(*(_worker_json(fe, w, "/internal/faults", spec) for w in up))
    return dict(zip(up, answers))


async def _worker_json(fe: Frontend, wid: str, path: str, body: dict | None = None) -> dict | None:
    """A worker's JSON answer on its internal API (POST with ``body``); None if none."""
    w = fe.router.workers.get(wid)
    if w is None:
        return None
    url, hdr, timeout = f"{w.info.url}{path}", fe.link.headers(wid), fe.config.probe_s
    try:
        if body is None:
            r = await fe.link.client.get(url, headers=hdr, timeout=timeout)
        else:
            r = await fe.link.client.post(url, json=body, headers=hdr, timeout=timeout)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def add_operator_routes(app: FastAPI, fe: Frontend) -> None:
    _add_debug_routes(app, fe)
    _add_admin_routes(app, fe)
    _add_registration_route(app, fe)


def _add_debug_routes(app: FastAPI, fe: Frontend) -> None:
    """/metrics and /debug/*: the series, and the router's decisions and view."""

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


def _add_admin_routes(app: FastAPI, fe: Frontend) -> None:
    """/admin/*: scaling, what is held, fault injection; the admin's alone."""

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
        return JSONResponse(await held_state(fe))

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
        return JSONResponse(await set_worker_faults(fe, spec))


def _add_registration_route(app: FastAPI, fe: Frontend) -> None:
    """/internal/workers: a worker announces itself (with its control-key token)."""

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
