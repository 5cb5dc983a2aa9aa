"""The frontend's part of a disaggregated request: the decode worker is told what KV to expect,
then the prefill worker is told to compute and stream it.

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

from kvgrid.router.router import Decision

if TYPE_CHECKING:
    from kvgrid.server.frontend import Frontend

log = logging.getLogger(__name__)


def remote_spec(d: Decision) -> dict:
    """The ``remote_prefill`` field of the decode worker's /generate body."""
    p = d.prefill
    return {
        "transfer_id": secrets.token_hex(16),
        "start_block": p.start_block,
        "num_blocks": p.num_blocks,
        "deadline_s": p.deadline_s,
        "stall_s": p.stall_s,
    }


def start_prefill(
    fe: Frontend, d: Decision, rid: str, tokens: list[int], tenant_scope: bytes, spec: dict
) -> asyncio.Task:
    """Ask the prefill worker to compute and stream; runs beside the decode worker's stream."""
    task = asyncio.get_running_loop().create_task(_prefill(fe, d, rid, tokens, tenant_scope, spec))
    fe.background.add(task)
    task.add_done_callback(fe.background.discard)
    return task


async def _prefill(
    fe: Frontend, d: Decision, rid: str, tokens: list[int], tenant_scope: bytes, spec: dict
) -> dict | None:
    p = d.prefill
    router, link = fe.router, fe.link
    failure = None
    try:
        endpoint = router.workers[d.worker_id].info.transfer_endpoint
        url = link.url(p.worker_id)
        body = {
            "request_id": rid,
            "prompt_token_ids": tokens,
            "tenant": tenant_scope.hex(),
            "transfer": {
                "transfer_id": spec["transfer_id"],
                "endpoint": endpoint,
                "start_block": p.start_block,
                "num_blocks": p.num_blocks,
            },
        }
        r = await link.client.post(f"{url}/prefill", json=body, timeout=None)
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
        router.on_prefill_done(rid, time.monotonic())
    log.warning(
        "prefill of %s on %s failed (%s): %s recomputes it", rid, p.worker_id, failure, d.worker_id
    )
    fe.metrics.prefill_failures.inc()
    with contextlib.suppress(httpx.HTTPError, KeyError):
        await link.client.post(
            f"{link.url(d.worker_id)}/transfer/{spec['transfer_id']}/cancel", timeout=5.0
        )
    return None
