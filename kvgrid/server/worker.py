"""The worker process: one engine, an internal HTTP API for the router, a KV event stream.

HTTP (FastAPI), for the router only; bind it to a private interface:
    GET  /info          identity, scope, block size, event endpoint (WorkerInfo)
    GET  /health        200 while the engine loop is alive
    GET  /load          the current load report
    GET  /kv/snapshot   msgpack: every key per tier with the event seq it reflects
    POST /generate      {request_id, prompt_token_ids, params, tenant (hex)} -> NDJSON stream
                        of deltas; a dropped connection aborts the request (blocks freed)
    POST /abort/{id}
    and the disaggregation endpoints of ``worker_transfers`` (/prefill, /role, ...)
ZeroMQ PUB (msgpack, kvgrid.router.wire): topic ``kv`` numbered event batches, topic ``load``
load reports every 0.5 s (the heartbeat).

When KVGRID_WORKER_TOKEN is set, the HTTP API requires it in ``x-kvgrid-worker-token``: the
router passes tenant scopes here, so nothing but the router may call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
import zmq
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvgrid.engine.sampling_params import RequestError, SamplingParams
from kvgrid.router import wire
from kvgrid.router.workers import WorkerInfo
from kvgrid.server.worker_transfers import add_transfer_routes, remote_generate
from kvgrid.transfer.auth import credential

log = logging.getLogger(__name__)

_PARAM_FIELDS = set(SamplingParams.__dataclass_fields__)


class EventPublisher:
    """ZeroMQ PUB socket; used from the engine thread only."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, epoch: str = "") -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        if port:
            self.sock.bind(f"tcp://{host}:{port}")
        else:
            port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.port = port
        self.epoch = epoch
        self._lock = threading.Lock()

    def publish_events(self, batch) -> None:
        with self._lock:
            self.sock.send_multipart([wire.TOPIC_KV, wire.encode_batch(batch, self.epoch)])

    def publish_load(self, report: dict) -> None:
        with self._lock:
            self.sock.send_multipart([wire.TOPIC_LOAD, wire.encode_load(report)])

    def close(self) -> None:
        self.sock.close(0)


class Worker:
    def __init__(
        self,
        engine: Any,
        worker_id: str,
        advertise_url: str,
        model_name: str,
        pub_host: str = "127.0.0.1",
        pub_port: int = 0,
        advertise_host: str | None = None,
        load_interval_s: float = 0.5,
        role: str = "both",
        transfer_port: int | None = 0,
        allow_fault_injection: bool = False,
    ) -> None:
        """``transfer_port``: where KV transfers arrive (0: any free port; None: no
        transfers). ``role``: see ``worker_transfers``."""
        from kvgrid.server.engine_loop import EngineLoop
        from kvgrid.server.worker_transfers import ROLES, WorkerTransfers

        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.engine = engine
        self.epoch = uuid.uuid4().hex[:12]
        self.publisher = EventPublisher(pub_host, pub_port, self.epoch)
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
        )
        host = advertise_host or pub_host
        self.events_endpoint = f"tcp://{host}:{self.publisher.port}"
        self.transfers = None
        if transfer_port is not None:
            self.transfers = WorkerTransfers.create(
                self, pub_host, host, transfer_port, allow_fault_injection, role
            )
        elif role != "both":
            raise ValueError(f"a {role} worker needs KV transfers")
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
        d["pid"] = os.getpid()
        return d


def create_worker_app(worker: Worker, router_url: str | None = None) -> FastAPI:
    token = os.environ.get("KVGRID_WORKER_TOKEN")

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

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        if token and request.url.path != "/health":
            given = request.headers.get("x-kvgrid-worker-token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "bad worker token"}, status_code=401)
        return await call_next(request)

    @app.get("/info")
    async def info() -> dict:
        return worker.info_dict()

    @app.get("/health")
    async def health() -> Response:
        if worker.loop.failed is not None or not worker.loop.is_alive():
            return JSONResponse({"status": "engine failed"}, status_code=503)
        return JSONResponse({"status": "ok", "worker_id": worker.info.worker_id})

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
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except (ValueError, KeyError, TypeError) as e:
            return JSONResponse({"error": f"bad generate request: {e!r}"}, status_code=400)
        if body.get("remote_prefill") is not None:
            return await remote_generate(
                worker, rid, prompt, params, tenant, body["remote_prefill"]
            )
        aloop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        sink = lambda out: aloop.call_soon_threadsafe(q.put_nowait, out)
        try:
            await worker.loop.add_request(rid, prompt, params, tenant, sink)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return StreamingResponse(stream_outputs(worker, rid, q), media_type="application/x-ndjson")

    add_transfer_routes(app, worker)
    return app


async def stream_outputs(worker: Worker, rid: str, q: asyncio.Queue, final: dict | None = None):
    """NDJSON lines of a request's outputs from its queue; ``final``: more fields for the
    last line."""
    finished = False
    try:
        while True:
            out = await q.get()
            if isinstance(out, BaseException):
                yield json.dumps({"error": f"engine failed: {out!r}"}) + "\n"
                finished = True
                return
            c = out.outputs[0]
            msg = {"text": out.new_text, "ids": out.new_token_ids}
            if out.finished:
                finished = True
                msg.update(
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason if not isinstance(c.stop_reason, bytes) else None,
                    cached_tokens=out.num_cached_tokens,
                    prompt_tokens=len(out.prompt_token_ids),
                    completion_tokens=len(c.token_ids),
                    kv_seq=worker.loop.seq,
                    **(final or {}),
                )
            yield json.dumps(msg) + "\n"
            if out.finished:
                return
    finally:
        if not finished:  # the router (or its client) went away: free the blocks now
            worker.loop.abort(rid)


async def _register_loop(worker: Worker, router_url: str, every_s: float = 2.0) -> None:
    """Announce ourselves to the router, again and again: a restarted router relearns us."""
    headers = {}
    if os.environ.get("KVGRID_WORKER_TOKEN"):
        headers["x-kvgrid-worker-token"] = os.environ["KVGRID_WORKER_TOKEN"]
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            try:
                await client.post(
                    f"{router_url.rstrip('/')}/internal/workers",
                    json={"url": worker.info.url},
                    headers=headers,
                )
            except httpx.HTTPError as e:
                log.debug("router %s not reachable: %s", router_url, e)
            await asyncio.sleep(every_s)


def run_worker(args) -> int:
    """`kvgrid worker`: load the engine, then serve until stopped."""
    import uvicorn

    from kvgrid.engine.args import engine_config_from_args
    from kvgrid.engine.llm_engine import LLMEngine
    from kvgrid.gc_tuning import tune_gc

    logging.basicConfig(
        level=os.environ.get("KVGRID_LOG", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.role != "both" and credential() is None:
        log.error(
            "a %s worker moves KV to or from other workers: set KVGRID_WORKER_TOKEN (the "
            "credential its transfers authenticate with)",
            args.role,
        )
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.time()
    worker_id = args.worker_id or f"{args.host}:{args.port}"
    engine = LLMEngine(engine_config_from_args(args, re.sub(r"[^\w.-]", "-", worker_id)))
    model_name = args.served_model_name or engine.spec.name
    tune_gc()  # the model, KV pool and graphs live as long as this process
    url = args.advertise_url or f"http://{args.host}:{args.port}"
    try:
        worker = Worker(
            engine,
            worker_id,
            url,
            model_name,
            pub_host=args.host,
            pub_port=args.events_port,
            advertise_host=urlsplit(url).hostname,
            role=args.role,
            transfer_port=args.transfer_port,
            allow_fault_injection=args.allow_fault_injection,
        )
    except (ValueError, OSError) as e:
        log.error("worker %s cannot start: %s", worker_id, e)
        engine.close()
        return 2
    log.info(
        "worker %s (%s): engine ready in %.1fs (%s), events on %s, transfers on %s",
        worker.info.worker_id,
        worker.role,
        time.time() - t0,
        model_name,
        worker.events_endpoint,
        worker.info.transfer_endpoint,
    )
    app = create_worker_app(worker, args.router)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


__all__ = ["Worker", "create_worker_app", "run_worker"]
