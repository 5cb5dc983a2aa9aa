"""A worker's part in disaggregated serving: its role, the KV it sends and receives.

Roles: ``prefill`` (computes prompts for others and streams their KV), ``decode`` (generates;
prefills itself when the router says so), ``both``. The role is what the router uses a
worker for; it is advertised in /info and in every load report, so ``POST /role`` changes
it without a restart (the planner can move a worker between pools).

Internal HTTP API (the router's, like the rest of the worker's: its token guards it):
    POST /generate with "remote_prefill": {transfer_id, start_block, num_blocks, deadline_s,
         stall_s, ticket (only to a worker without a control key)}: the prompt's blocks
         start..start+num arrive from a prefill worker; the request is admitted once they
         have landed in G2 or the transfer has ended (what did not arrive is recomputed),
         then streams as any /generate
    POST /prefill {request_id, prompt_token_ids, tenant, scope_id, shared_prefix_tokens,
         transfer: {transfer_id, ticket, endpoint, start_block, num_blocks}}: compute the
         prompt's blocks, stream them to endpoint; answers when the transfer has ended:
         {outcome, blocks_sent, bytes_sent, ...}
    POST /transfer/{id}/cancel   stop waiting for an incoming transfer (recompute the rest)
    POST /transfer/probe/expect {probe_id, ticket (no control key only)}: accept one probe
    POST /transfer/probe {endpoint, bytes, probe_id, ticket}: raw bandwidth of the channel
         to a receiver that expects the probe
    POST /role {"role": ...}; GET /debug/transfers; POST /debug/faults (drills only)

A transfer's ticket (kvgrid.transfer.auth) is what its two workers prove themselves with: a
worker with a control key derives the ticket of a transfer into it from its own key, and
refuses one handed to it; without a key (loopback only) the router hands it to both.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvgrid import keys as kvkeys
from kvgrid.engine.sampling_params import RequestError, SamplingParams
from kvgrid.server.auth import ControlKey, is_loopback_host, is_wildcard_host
from kvgrid.server.worker_stream import check_scope, compile_grammar, stream_outputs
from kvgrid.transfer import auth, wire
from kvgrid.transfer.faults import Faults, FaultSwitch
from kvgrid.transfer.metrics import TransferMetrics
from kvgrid.transfer.probe import probe_link
from kvgrid.transfer.receiver import Inbound, KVReceiver
from kvgrid.transfer.sender import KVSender

if TYPE_CHECKING:
    from kvgrid.server.worker import Worker

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "both")
PREFILL_SUFFIX = "#prefill"  # the prefill worker's request id for a remote prefill


class WorkerTransfers:
    """The receiver and sender of one worker (None of it without a store to land KV in)."""

    def __init__(
        self,
        worker: Worker,
        host: str,
        advertise_host: str,
        port: int,
        endpoint: str | None,
        allow_faults: bool,
    ) -> None:
        """Receive on ``host``:``port``, advertised at ``endpoint`` (HOST:PORT; None: the
        bound port at ``advertise_host``)."""
        if worker.key is None and not is_loopback_host(host):
            raise ValueError(
                f"taking KV transfers on {host} needs a control key: without one, transfers "
                "stay on loopback"
            )
        if endpoint is not None:
            wire.parse_endpoint(endpoint)
        elif is_wildcard_host(advertise_host):
            raise ValueError(f"{advertise_host!r} is no address prefill workers can reach")
        engine = worker.engine
        self.worker_id = worker.info.worker_id
        self.key = worker.key
        registry = engine.connector.store.metrics.registry
        self.metrics = TransferMetrics(registry)
        self.faults = FaultSwitch(allow_faults)
        self.receiver = KVReceiver(engine.connector.store, host, port, advertise_host, self.metrics)
        if endpoint is not None:
            self.receiver.endpoint = endpoint
        self.sender = KVSender(
            engine, lambda rid: worker.loop.abort(rid), self.metrics, self.faults
        )
        worker.loop.after_step.append(self.sender.after_step)

    @classmethod
    def create(
        cls,
        worker: Worker,
        host: str,
        advertise_host: str,
        port: int,
        endpoint: str | None,
        allow_faults: bool,
    ) -> WorkerTransfers | None:
        """The worker's transfers, or None for a worker of role "both" without G2."""
        conn = worker.engine.connector
        if conn is not None and conn.store.g2 is not None:
            return cls(worker, host, advertise_host, port, endpoint, allow_faults)
        why = "it has no context store with host memory (G2) to land KV in"
        if worker.role != "both":
            raise ValueError(f"a {worker.role} worker must move KV, but {why}")
        log.info("KV transfers off: %s", why)
        return None

    def ticket(self, tid: bytes, given: object) -> bytes:
        return receiver_ticket(self.key, self.worker_id, tid, given)

    def load_fields(self) -> dict:
        return {
            "transfer_bytes_per_s": self.receiver.bytes_per_s,
            "transfer_setup_s": self.sender.setup_s,
        }

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()


def receiver_ticket(key: ControlKey | None, worker_id: str, tid: bytes, given: object) -> bytes:
    """The ticket of transfer ``tid`` into worker ``worker_id``: derived from its control key,
    or (a worker without one) ``given``, the hex its router sent."""
    if key is not None:
        if given is not None:
            raise ValueError(
                "this worker derives its transfer tickets from its control key: a request "
                "must not carry one"
            )
        return key.transfer_ticket(worker_id, tid)
    if given is None:
        raise ValueError(
            "a worker without a control key takes a transfer's ticket from its router: the "
            "request carries none"
        )
    return auth.parse_ticket(given)


def _bad(msg: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


_NO_SENDER = "this worker sends no KV transfers"


def _block_keys(
    worker: Worker, prompt: list[int], tenant: bytes, shared: int, blocks: int
) -> list[bytes]:
    """Keys of the prompt's first ``blocks`` blocks, as the engine names them (a prefix
    shared across tenants keyed in the public scope)."""
    eng = worker.engine
    bs = eng.config.block_size
    return kvkeys.block_keys_shared(
        prompt[: blocks * bs],
        eng.scope.with_tenant(tenant).digest,
        bs,
        shared,
        eng.scope.with_tenant(kvkeys.PUBLIC_TENANT).digest,
    )


def _span(worker: Worker, spec: dict, prompt: list[int]) -> tuple[int, int]:
    start, num = int(spec["start_block"]), int(spec["num_blocks"])
    bs = worker.engine.config.block_size
    if start < 0 or num < 0 or (start + num) * bs > len(prompt) - 1:
        raise ValueError(
            f"blocks [{start}, {start + num}) do not fit a {len(prompt)}-token prompt "
            "(its last token is computed where it decodes)"
        )
    return start, num


async def remote_generate(
    worker: Worker,
    rid: str,
    prompt: list[int],
    params: SamplingParams,
    tenant: bytes,
    shared: int,
    spec: Any,
    resume: dict | None = None,
) -> Response:
    """/generate whose prompt KV comes from a prefill worker (see the module doc).
    ``resume``: a migrated request's ``resume_output`` and ``emitted_text_len``
    (LLMEngine.add_request); its context, whose blocks arrive, is prompt plus that output."""
    tx = worker.transfers
    if tx is None:
        return _bad("this worker takes no KV transfers")
    try:
        if not isinstance(spec, dict):
            raise TypeError("remote_prefill must be an object")
        tid = bytes.fromhex(spec["transfer_id"])
        ticket = tx.ticket(tid, spec.get("ticket"))
        resume = resume or {}
        output = resume.get("resume_output") or []
        if not isinstance(output, list):
            raise TypeError("resume output_token_ids must be a list")
        context = prompt + output
        start, num = _span(worker, spec, context)
        deadline_s, stall_s = float(spec["deadline_s"]), float(spec["stall_s"])
        if not (0 < deadline_s <= 3600 and stall_s > 0):
            raise ValueError("need 0 < deadline_s <= 3600 and stall_s > 0")
        stall_s = min(stall_s, deadline_s)
        worker.engine.check_request(prompt, params)
        await compile_grammar(worker, params)
        keys = _block_keys(worker, context, tenant, shared, start + num)[start:]
        inbound = tx.receiver.expect(tid, ticket, keys, tenant, deadline_s, stall_s)
    except RequestError as e:
        return _bad(str(e))
    except (ValueError, KeyError, TypeError) as e:
        return _bad(f"bad remote_prefill: {e!r}")
    aloop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def sink(out) -> None:
        # its blocks are in G1 once it has output: the G2 slots need not stay pinned
        tx.receiver.release(inbound)
        aloop.call_soon_threadsafe(q.put_nowait, out)

    async def body():
        try:
            await asyncio.wrap_future(inbound.done)
            try:
                await worker.loop.add_request(rid, prompt, params, tenant, sink, shared, **resume)
            except RequestError as e:
                yield json.dumps({"error": str(e)}) + "\n"
                return
            except TimeoutError:  # the engine thread is stuck: the router moves the request
                yield json.dumps({"error": "engine thread busy"}) + "\n"
                return
            async for line in stream_outputs(worker, rid, q, {"transfer": inbound.summary()}):
                yield line
        finally:
            tx.receiver.release(inbound)

    return StreamingResponse(body(), media_type="application/x-ndjson")


def _receiver_state(worker: Worker) -> dict:
    tx = worker.transfers
    return tx.receiver.state() if tx is not None else {}


def add_transfer_routes(app: FastAPI, worker: Worker) -> None:
    @app.post("/prefill")
    async def prefill(request: Request) -> Response:
        tx = worker.transfers
        if tx is None:
            return _bad(_NO_SENDER)
        eng = worker.engine
        try:
            body = json.loads(await request.body())
            rid = str(body["request_id"]) + PREFILL_SUFFIX
            prompt = body["prompt_token_ids"]
            tenant = bytes.fromhex(body.get("tenant", ""))
            shared = int(body.get("shared_prefix_tokens", 0))
            scope_id = body.get("scope_id") or None
            spec = body["transfer"]
            tid = bytes.fromhex(spec["transfer_id"])
            ticket = auth.parse_ticket(spec["ticket"])
            endpoint = str(spec["endpoint"])
            if not isinstance(prompt, list):
                raise TypeError("prompt_token_ids must be a list")
            start, num = _span(worker, spec, prompt)
            sub = prompt[: (start + num) * eng.config.block_size]
            params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
            eng.check_request(sub, params)
            keys = _block_keys(worker, sub, tenant, shared, start + num)
        except RequestError as e:
            return _bad(str(e))
        except (ValueError, KeyError, TypeError) as e:
            return _bad(f"bad prefill request: {e!r}")
        refused = check_scope(worker, tenant, scope_id)
        if refused is not None:
            return refused
        parents = [keys[i - 1] if i else None for i in range(start, start + num)]
        try:
            t = tx.sender.open(tid, ticket, endpoint, rid, keys[start:], parents, tenant)
        except ValueError as e:
            return _bad(str(e))

        def add() -> None:
            eng.add_request(rid, sub, params, tenant=tenant, shared_prefix_tokens=shared)
            tx.sender.attach(t)

        try:
            await worker.loop.call(add)
        except RequestError as e:
            tx.sender.abort(tid, "rejected")
            return _bad(str(e))
        return JSONResponse(await asyncio.wrap_future(t.done))

    @app.post("/transfer/{transfer_id}/cancel")
    async def cancel(transfer_id: str) -> Response:
        tx = worker.transfers
        try:
            tid = bytes.fromhex(transfer_id)
        except ValueError:
            return _bad("transfer id must be hex")
        return JSONResponse({"cancelled": tx is not None and tx.receiver.cancel(tid)})

    @app.post("/transfer/probe/expect")
    async def expect_probe(request: Request) -> Response:
        tx = worker.transfers
        if tx is None:
            return _bad("this worker takes no KV transfers")
        try:
            body = await request.json()
            pid = bytes.fromhex(body["probe_id"])
            tx.receiver.expect_probe(pid, tx.ticket(pid, body.get("ticket")))
        except (ValueError, KeyError, TypeError) as e:
            return _bad(f"bad probe: {e!r}")
        return JSONResponse({"endpoint": tx.receiver.endpoint})

    @app.post("/transfer/probe")
    async def probe(request: Request) -> Response:
        tx = worker.transfers
        if tx is None:
            return _bad(_NO_SENDER)
        try:
            body = await request.json()
            endpoint, nbytes = str(body["endpoint"]), int(body["bytes"])
            pid, ticket = bytes.fromhex(body["probe_id"]), auth.parse_ticket(body["ticket"])
            if not 0 < nbytes <= 1 << 36:
                raise ValueError("bytes must be in (0, 64 GiB]")
            out = await asyncio.to_thread(probe_link, endpoint, pid, ticket, nbytes)
        except (ValueError, KeyError, TypeError) as e:
            return _bad(f"bad probe: {e!r}")
        except (OSError, auth.AuthError) as e:
            return _bad(f"probe failed: {e!r}", 502)
        return JSONResponse(out)

    @app.post("/role")
    async def set_role(request: Request) -> Response:
        try:
            role = (await request.json())["role"]
        except (ValueError, KeyError, TypeError):
            return _bad('body must be {"role": "prefill" | "decode" | "both"}')
        if role not in ROLES:
            return _bad(f"role must be one of {ROLES}")
        if role != "both" and worker.transfers is None:
            return _bad(f"a {role} worker must move KV; this one cannot (no G2)")
        worker.role = role
        return JSONResponse({"role": role})

    @app.get("/debug/transfers")
    async def transfers() -> Response:
        tx = worker.transfers
        st = await worker.loop.call(worker.engine.stats)
        conn = worker.engine.connector
        return JSONResponse(
            {
                "role": worker.role,
                "receiver": _receiver_state(worker),
                "sender": tx.sender.state() if tx is not None else {},
                "engine": {
                    k: st.get(k)
                    for k in ("num_running", "num_waiting", "kv_usage", "num_kv_blocks")
                },
                "g2_pinned_blocks": conn.store.g2.pinned_count()
                if conn is not None and conn.store.g2 is not None
                else 0,
            }
        )

    @app.post("/debug/faults")
    async def faults(request: Request) -> Response:
        tx = worker.transfers
        if tx is None:
            return _bad(_NO_SENDER)
        try:
            tx.faults.arm(Faults.from_dict(await request.json()))
        except PermissionError as e:
            return _bad(str(e), 403)
        except (ValueError, TypeError) as e:
            return _bad(f"bad faults: {e}")
        return JSONResponse({"armed": True})


__all__ = [
    "ROLES",
    "Inbound",
    "WorkerTransfers",
    "add_transfer_routes",
    "receiver_ticket",
    "remote_generate",
]
