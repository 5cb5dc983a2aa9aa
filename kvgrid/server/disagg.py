"""The frontend's part of a disaggregated request: the decode worker is told what KV to expect,
then the prefill worker is told to compute and stream it.

The router grants the transfer: a fresh id and its ticket (kvgrid.transfer.auth), the
ticket keyed under the decode worker's key, which the router derives from the cluster key
and the decode worker from its own; without a control key a random one, handed to both.

Order matters: the decode worker registers the transfer before it answers /generate, so
the prefill worker, asked only then, always finds it expected. If the prefill worker cannot
be reached or refuses, the decode worker is told to stop waiting (it recomputes the prompt
at once rather than at the transfer's stall limit). Whatever happens, the decode worker's
stream ends with a correct answer or a clean error: the transfer decides only how much of
the prompt it computes itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING

import httpx

from kvgrid.router.decision import Decision
from kvgrid.server.auth import ControlKey
from kvgrid.transfer.auth import new_ticket

if TYPE_CHECKING:
    from kvgrid.server.frontend import Frontend

log = logging.getLogger(__name__)

PREFILL_GRACE_S = 30.0


def grant(key: ControlKey | None, worker_id: str) -> tuple[bytes, bytes]:
    """(transfer id, ticket) of a new transfer into ``worker_id``."""
    tid = secrets.token_bytes(16)
    return tid, key.transfer_ticket(worker_id, tid) if key is not None else new_ticket()


def remote_spec(d: Decision, key: ControlKey | None) -> tuple[dict, bytes]:
    """The ``remote_prefill`` field of the decode worker's /generate body, and the ticket
    the prefill worker proves the transfer with (in the field only without a key)."""
    p = d.prefill
    tid, ticket = grant(key, d.worker_id)
    spec = {
        "transfer_id": tid.hex(),
        "start_block": p.start_block,
        "num_blocks": p.num_blocks,
        "deadline_s": p.deadline_s,
        "stall_s": p.stall_s,
    }
    if key is None:
        spec["ticket"] = ticket.hex()
    return spec, ticket


def start_prefill(fe: Frontend, d: Decision, body: dict, spec: dict, ticket: bytes) -> asyncio.Task:
    """Ask the prefill worker to compute and stream; runs beside the decode worker's stream.
    ``body``: the decode worker's /generate body (the request, its tenant and scope)."""
    task = asyncio.get_running_loop().create_task(_prefill(fe, d, body, spec, ticket))
    fe.background.add(task)
    task.add_done_callback(fe.background.discard)
    return task


async def _prefill(fe: Frontend, d: Decision, body: dict, spec: dict, ticket: bytes) -> dict | None:
    p = d.prefill
    router, link = fe.router, fe.link
    rid = body["request_id"]
    failure = None
    try:
        endpoint = router.workers[d.worker_id].info.transfer_endpoint
        url = link.url(p.worker_id)
        req = {
            **{k: body[k] for k in ("request_id", "prompt_token_ids", "tenant", "scope_id")},
            "shared_prefix_tokens": body.get("shared_prefix_tokens", 0),
            "transfer": {
                "transfer_id": spec["transfer_id"],
                "ticket": ticket.hex(),
                "endpoint": endpoint,
                "start_block": p.start_block,
                "num_blocks": p.num_blocks,
            },
        }
        # it answers when the transfer has ended, by its deadline at the latest; a prefill
        # worker that stopped answering is given up a while after that
        r = await link.client.post(
            f"{url}/prefill",
            json=req,
            headers=link.headers(p.worker_id),
            timeout=httpx.Timeout(5.0, read=float(spec["deadline_s"]) + PREFILL_GRACE_S),
        )
        if r.status_code == 200:
            summary = r.json()
            if summary.get("outcome") != "complete":
                log.warning("prefill of %s on %s: %s", rid, p.worker_id, summary)
            return summary
        failure = f"{r.status_code} {r.text[:200]}"
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        link.mark_down(p.worker_id, f"connect failed: {e!r}")
        failure = repr(e)
    except (httpx.HTTPError, KeyError, ValueError) as e:
        failure = repr(e)
    finally:
        router.on_prefill_done(d.request_id, time.monotonic())  # the router's id (not rid~N)
    log.warning(
        "prefill of %s on %s failed (%s): %s recomputes it", rid, p.worker_id, failure, d.worker_id
    )
    fe.metrics.prefill_failures.inc()
    with contextlib.suppress(httpx.HTTPError, KeyError):
        await link.client.post(
            f"{link.url(d.worker_id)}/transfer/{spec['transfer_id']}/cancel",
            headers=link.headers(d.worker_id),
            timeout=5.0,
        )
    return None
