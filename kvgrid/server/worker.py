"""The worker process: one engine, an internal HTTP API for the router, a KV event stream.

HTTP (FastAPI), for routers only:
    GET  /info          identity, scope, block size, event endpoint (WorkerInfo); answers a
                        router's nonce (x-kvgrid-nonce) with a proof of the worker's key
    GET  /health        200 while the engine loop is alive and not stuck in one step (no
                        credential: a liveness probe)
    GET  /load          the current load report
    GET  /metrics       the context store's series
    GET  /internal/state  what must return to idle (requests, G1 blocks, store pins, leases)
    GET|POST /internal/faults  injected faults (kvgrid.failpoints; --allow-fault-injection only)
    GET  /kv/snapshot   msgpack: every key per tier with the event seq it reflects
    POST /generate      {request_id, prompt_token_ids, params, tenant (hex), scope_id,
                        shared_prefix_tokens, resume?} -> NDJSON stream of deltas; a dropped
                        connection aborts the request (blocks freed). ``resume``:
                        {output_token_ids, emitted_text_len} of a request that another
                        worker started (LLMEngine.add_request)
    POST /abort/{id}
    and the disaggregation endpoints of ``worker_transfers`` (/prefill, /role, ...)
ZeroMQ PUB (msgpack, kvgrid.router.wire): topic ``kv`` numbered event batches, topic ``load``
load reports every 0.5 s (the heartbeat), CURVE-encrypted (kvgrid.server.publisher).

With a control key (kvgrid.server.auth) every endpoint but /health needs the router's token
for this worker: only a router sends requests and tenant scopes. Without one the worker
binds loopback only and takes requests of the public tenant scope only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvgrid import failpoints
from kvgrid.engine.sampling_params import RequestError, SamplingParams
from kvgrid.router import wire
from kvgrid.router.workers import WorkerInfo
from kvgrid.server.auth import (
    NONCE_HEADER,
    ControlKey,
    CredentialError,
    is_loopback_host,
    is_wildcard_host,
    load_control_key,
    require_router,
    url_host,
)
from kvgrid.server.publisher import EventPublisher
from kvgrid.server.worker_stream import check_scope, compile_grammar, stream_outputs
from kvgrid.server.worker_transfers import (
    ROLES,
    WorkerTransfers,
    add_transfer_routes,
    remote_generate,
)

log = logging.getLogger(__name__)

_PARAM_FIELDS = set(SamplingParams.__dataclass_fields__)


def device_identity(device: Any) -> str:
    """What the engine computes on, as the router compares it: processes with the same
    identity share one device's compute (a GPU's UUID; on CPU, the host's cores)."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        idx = torch.device(device).index
        idx = torch.cuda.current_device() if idx is None else idx
        props = torch.cuda.get_device_properties(idx)
        return f"cuda:{props.uuid}"
    return f"{socket.gethostname()}/cpu"


class Worker:
    def __init__(
        self,
        engine: Any,
        worker_id: str,
        advertise_url: str,
        model_name: str,
        pub_host: str = "127.0.0.1",
        pub_port: int = 0,
        events_endpoint: str | None = None,
        load_interval_s: float = 0.5,
        key: ControlKey | None = None,
        site: str = "",
        role: str = "both",
        transfer_port: int | None = 0,
        transfer_endpoint: str | None = None,
        allow_fault_injection: bool = False,
        device_group: str = "",
        stall_s: float = 60.0,
    ) -> None:
        """``events_endpoint``: the event stream's address as routers reach it (default:
        the advertise URL's host and the bound port); never a wildcard address.
        ``transfer_port``: where KV transfers arrive (0: any free port; None: no
        transfers), ``transfer_endpoint`` the HOST:PORT prefill workers reach it at
        (default: the advertise URL's host and that port). ``role``: see
        ``worker_transfers``. ``stall_s``: /health reports the worker unhealthy once its
        engine thread has been in one step this long with requests waiting (the router
        then moves them away). ``allow_fault_injection``: drills only (transfer faults,
        kvgrid.failpoints). ``device_group``: the device's name in routing decisions
        (default: ``device_identity``)."""
        from kvgrid.server.engine_loop import EngineLoop

        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        if allow_fault_injection:
            failpoints.enable()
        self.engine = engine
        self.stall_s = stall_s
        self.key = key.for_worker(worker_id) if key is not None else None
        self.epoch = uuid.uuid4().hex[:12]
        host = url_host(advertise_url) or pub_host
        if events_endpoint is None and is_wildcard_host(host):
            raise ValueError(
                f"the advertise URL {advertise_url!r} names no address other hosts can reach"
            )
        self.publisher = EventPublisher(pub_host, pub_port, self.epoch, self.key, worker_id)
        self.events_endpoint = events_endpoint or f"tcp://{host}:{self.publisher.port}"
        # the first router's server-secret fingerprint: tenant scopes of a router with
        # another secret would give one tenant two scopes here
        self.scope_id: str | None = None
        self.loop = EngineLoop(
            engine,
            worker_id,
            self.epoch,
            self.publisher.publish_events,
            self.publisher.publish_load,
            load_interval_s,
        )
        cfg = engine.config
        mc = engine.model_config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        dtype_bytes = 2 if engine.scope.dtype in ("bfloat16", "float16") else 4
        self.info = WorkerInfo(
            worker_id=worker_id,
            url=advertise_url,
            epoch=self.epoch,
            model=model_name,
            scope=engine.scope.with_tenant(b""),
            block_size=cfg.block_size,
            max_model_len=engine.max_model_len,
            bytes_per_block=(
                2
                * mc.num_hidden_layers
                * mc.num_key_value_heads
                * head_dim
                * cfg.block_size
                * dtype_bytes
            ),
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            site=site,
            device=device_group or device_identity(getattr(engine, "device", None)),
        )
        self.transfers = None
        try:
            if transfer_port is not None:
                self.transfers = WorkerTransfers.create(
                    self, pub_host, host, transfer_port, transfer_endpoint, allow_fault_injection
                )
            elif role != "both":
                raise ValueError(f"a {role} worker needs KV transfers")
        except BaseException:
            self.publisher.close()
            raise
        endpoint = self.transfers.receiver.endpoint if self.transfers is not None else None
        self.info = dataclasses.replace(self.info, role=role, transfer_endpoint=endpoint)
        self.loop.load_extra.append(self._load_fields)

    def _load_fields(self) -> dict:
        out = {"role": self.role}
        if self.transfers is not None:
            out.update(self.transfers.load_fields())
        return out

    def info_dict(self) -> dict:
        d = self.info.to_dict()
        d["events_endpoint"] = self.events_endpoint
        d["events_secure"] = self.publisher.secure
        d["scope_id"] = self.scope_id
        d["pid"] = os.getpid()
        return d


def create_worker_app(worker: Worker, router_url: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.loop.start()
        task = asyncio.create_task(_register_loop(worker, router_url)) if router_url else None
        try:
            yield
        finally:
            if task:
                task.cancel()
            if worker.transfers is not None:
                worker.transfers.close()
            worker.loop.stop()
            worker.publisher.close()
            worker.loop.engine.close()

    app = FastAPI(title="kvgrid worker", lifespan=lifespan)

    require_router(app, worker.key, worker.info.worker_id)

    @app.get("/info")
    async def info(request: Request) -> dict:
        d = worker.info_dict()
        nonce = request.headers.get(NONCE_HEADER)
        if nonce and worker.key is not None:
            d["proof"] = worker.key.info_proof(worker.info.worker_id, nonce)
        return d

    @app.get("/health")
    async def health() -> Response:
        if worker.loop.failed is not None or not worker.loop.is_alive():
            return JSONResponse({"status": "engine failed"}, status_code=503)
        stuck = worker.loop.stalled_for()
        if stuck > worker.stall_s:
            msg = f"engine stuck in one step for {stuck:.0f}s"
            return JSONResponse({"status": msg}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/internal/state")
    async def state() -> Response:
        try:
            report = await worker.loop.call(worker.loop.idle_report, timeout_s=10.0)
        except TimeoutError:
            return JSONResponse({"error": "engine thread busy"}, status_code=503)
        report.update(worker_id=worker.info.worker_id, pid=os.getpid(), epoch=worker.epoch)
        return JSONResponse(report)

    @app.api_route("/internal/faults", methods=["GET", "POST"])
    async def inject(request: Request) -> Response:
        if not failpoints.ENABLED:
            return JSONResponse({"error": "fault injection is off"}, status_code=404)
        if request.method == "POST":
            try:
                failpoints.set_active(json.loads(await request.body()))
            except (ValueError, TypeError) as e:
                return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse(dataclasses.asdict(failpoints.active()))

    @app.get("/metrics")
    async def metrics() -> Response:
        # the context store's per-tier, per-tenant series; request series live on the router
        conn = worker.loop.engine.connector
        body = generate_latest(conn.store.metrics.registry) if conn is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/load")
    async def load() -> dict:
        return await worker.loop.call(worker.loop.load_report)

    @app.get("/kv/snapshot")
    async def snapshot() -> Response:
        seq, tiers = await worker.loop.snapshot()
        body = wire.encode_snapshot(worker.info.worker_id, worker.epoch, seq, tiers)
        return Response(body, media_type="application/msgpack")

    @app.post("/abort/{request_id}")
    async def abort(request_id: str) -> dict:
        return {"aborted": await asyncio.wrap_future(worker.loop.abort(request_id))}

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            rid = str(body["request_id"])
            prompt = body["prompt_token_ids"]
            raw = {k: v for k, v in (body.get("params") or {}).items() if k in _PARAM_FIELDS}
            params = SamplingParams(**raw)
            tenant = bytes.fromhex(body.get("tenant", ""))
            shared = int(body.get("shared_prefix_tokens", 0))
            scope_id = body.get("scope_id") or None
            resume = body.get("resume") or {}
            resume = {
                "resume_output": resume.get("output_token_ids"),
                "emitted_text_len": resume.get("emitted_text_len"),
            }
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return JSONResponse({"error": f"bad generate request: {e!r}"}, status_code=400)
        refused = check_scope(worker, tenant, scope_id)
        if refused is not None:
            return refused
        if body.get("remote_prefill") is not None:
            return await remote_generate(
                worker, rid, prompt, params, tenant, shared, body["remote_prefill"], resume
            )
        aloop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        sink = lambda out: aloop.call_soon_threadsafe(q.put_nowait, out)
        try:
            await compile_grammar(worker, params)
            await worker.loop.add_request(rid, prompt, params, tenant, sink, shared, **resume)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except TimeoutError:
            return JSONResponse({"error": "engine thread busy"}, status_code=503)
        return StreamingResponse(stream_outputs(worker, rid, q), media_type="application/x-ndjson")

    add_transfer_routes(app, worker)
    return app


async def _register_loop(worker: Worker, router_url: str, every_s: float = 2.0) -> None:
    """Announce ourselves to the router, again and again: a restarted router relearns us."""
    wid = worker.info.worker_id
    headers = worker.key.worker_headers(wid) if worker.key is not None else {}
    body = {"url": worker.info.url, "worker_id": wid}
    last = None
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            try:
                r = await client.post(
                    f"{router_url.rstrip('/')}/internal/workers", json=body, headers=headers
                )
                status = r.status_code
                if status != last and status >= 400:
                    log.warning("router %s refused this worker: %s", router_url, r.text)
            except httpx.HTTPError as e:
                status = None
                log.debug("router %s not reachable: %s", router_url, e)
            last = status
            await asyncio.sleep(every_s)


def worker_identity(args) -> tuple[str, ControlKey | None]:
    """The worker id and control key the flags and environment give; ValueError (a message
    for the operator) when they do not fit together or the bind address needs a key."""
    key = load_control_key(getattr(args, "control_key_file", None))
    if key is not None and not key.is_cluster:
        if args.worker_id and args.worker_id != key.worker_id:
            raise CredentialError(
                f"the control key belongs to worker {key.worker_id!r}, not {args.worker_id!r}"
            )
        worker_id = key.worker_id
    else:
        worker_id = args.worker_id or f"{args.host}:{args.port}"
    if key is None and not is_loopback_host(args.host):
        raise CredentialError(
            f"binding {args.host} needs a control key (--control-key-file, or "
            "KVGRID_CONTROL_KEY / KVGRID_CONTROL_KEY_FILE): without one anyone who reaches "
            "this worker could send it requests and tenant scopes"
        )
    if is_wildcard_host(args.host) and not args.advertise_url:
        raise ValueError(
            f"--host {args.host} needs --advertise-url: the address other hosts reach this "
            "worker at (it is also where its event stream is advertised)"
        )
    if args.advertise_url and is_wildcard_host(url_host(args.advertise_url)):
        raise ValueError(f"--advertise-url {args.advertise_url} must name a reachable host")
    return worker_id, key


def _exit_with_parent() -> None:
    """Stop as on SIGTERM (G1 is offloaded to the store) once the process that started this
    one is gone: a supervisor killed outright must not leave its workers running."""
    import signal

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        log.warning("parent process %d is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="kvgrid-parent-watch", daemon=True).start()


def build_worker(
    args,
    worker_id: str,
    url: str,
    host: str,
    key: ControlKey | None,
    events_port: int = 0,
    events_endpoint: str | None = None,
    site: str = "",
) -> Worker:
    """Load the engine the engine flags in ``args`` describe and wrap it in a Worker whose
    HTTP API is reached at ``url`` and whose event stream and KV transfers bind ``host``
    (its role and transfer port from `kvgrid worker`'s flags; without them: both, any free
    port). ValueError: a configuration the engine or its store cannot use."""
    from kvgrid.engine.args import engine_config_from_args
    from kvgrid.engine.llm_engine import LLMEngine
    from kvgrid.gc_tuning import tune_gc

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.time()
    engine = LLMEngine(engine_config_from_args(args, re.sub(r"[^\w.-]", "-", worker_id)))
    model_name = getattr(args, "served_model_name", None) or engine.spec.name
    tune_gc()  # the model, KV pool and graphs live as long as this process
    try:
        worker = Worker(
            engine,
            worker_id,
            url,
            model_name,
            pub_host=host,
            pub_port=events_port,
            events_endpoint=events_endpoint,
            key=key,
            site=site,
            role=getattr(args, "role", "both"),
            transfer_port=getattr(args, "transfer_port", 0),
            transfer_endpoint=getattr(args, "advertise_transfers", None),
            allow_fault_injection=getattr(args, "allow_fault_injection", False),
            device_group=getattr(args, "device_group", None) or "",
            stall_s=getattr(args, "engine_stall_timeout", 60.0),
        )
    except BaseException:
        engine.close()
        raise
    if getattr(args, "exit_with_parent", False):
        _exit_with_parent()
    log.info(
        "worker %s (%s): engine ready in %.1fs (%s), events on %s (%s), transfers on %s",
        worker.info.worker_id,
        worker.role,
        time.time() - t0,
        model_name,
        worker.events_endpoint,
        "CURVE" if worker.publisher.secure else "no control key: loopback only",
        worker.info.transfer_endpoint,
    )
    return worker


def run_worker(args) -> int:
    """`kvgrid worker`: load the engine, then serve until stopped."""
    import sys

    import uvicorn

    try:
        worker_id, key = worker_identity(args)
        url = args.advertise_url or f"http://{args.host}:{args.port}"
        worker = build_worker(
            args, worker_id, url, args.host, key, args.events_port, args.advertise_events
        )
    except (ValueError, OSError) as e:  # a configuration the worker cannot use, a port taken
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_worker_app(worker, args.router)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


__all__ = ["Worker", "build_worker", "create_worker_app", "run_worker", "worker_identity"]
