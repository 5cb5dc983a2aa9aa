"""What a worker's /generate and its remotely prefilled /generate share: the check of the
tenant scope a router sends, the grammar compiled off the engine thread, and the NDJSON
stream of a request's outputs (one line per engine output, usage on the last)."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse

from kvgrid import keys
from kvgrid.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvgrid.server.worker import Worker


def stream_message(out: Any, first: bool, kv_seq: int, final: dict | None = None) -> dict:
    """One engine output as a line of the /generate stream: choice ``index``'s delta (its
    logprobs as {token id: logprob}), its finish, and on the last line (``done``) the usage
    and ``final``'s fields."""
    c = out.outputs[out.index]
    msg: dict[str, Any] = {"index": out.index, "text": out.new_text, "ids": out.new_token_ids}
    if out.new_logprobs is not None:
        msg["logprobs"] = [{str(k): v for k, v in d.items()} for d in out.new_logprobs]
    if first and out.prompt_logprobs is not None:
        msg["prompt_logprobs"] = [
            None if d is None else {str(k): v for k, v in d.items()} for d in out.prompt_logprobs
        ]
    if c.finish_reason is not None:
        msg["finish_reason"] = c.finish_reason
        msg["stop_reason"] = c.stop_reason if not isinstance(c.stop_reason, bytes) else None
    if out.finished:
        msg.update(
            done=True,
            cached_tokens=out.num_cached_tokens,
            prompt_tokens=len(out.prompt_token_ids),
            completion_tokens=sum(len(o.token_ids) for o in out.outputs),
            kv_seq=kv_seq,
            **(final or {}),
        )
    return msg


async def compile_grammar(worker: Worker, params: SamplingParams) -> None:
    """Compile (and so check) the request's grammar, if any, here rather than on the thread
    that steps: compiled grammars are cached, so add_request then finds it."""
    if params.guided is not None:
        await asyncio.to_thread(worker.loop.engine.guided_matcher, params)


def check_scope(worker: Worker, tenant: bytes, scope_id: str | None) -> JSONResponse | None:
    """The refusal of a request in ``tenant``'s scope from a router with ``scope_id``, or None
    when this worker may take it."""
    if tenant != keys.PUBLIC_TENANT and worker.key is None:
        return JSONResponse(
            {"error": "tenant scopes need a control key (this worker runs without one)"},
            status_code=403,
        )
    if scope_id is not None:
        if worker.scope_id is None:
            worker.scope_id = scope_id
        elif scope_id != worker.scope_id:
            return JSONResponse(
                {"error": "a router with another server secret already sends tenant "
                 "scopes here: give every router the same KVGRID_SERVER_SECRET"},
                status_code=409,
            )  # fmt: skip
    return None


async def stream_outputs(worker: Worker, rid: str, q: asyncio.Queue, final: dict | None = None):
    """NDJSON lines of a request's outputs from its queue; ``final``: more fields for the
    last line."""
    finished = False
    first = True
    try:
        while True:
            out = await q.get()
            if isinstance(out, BaseException):
                yield json.dumps({"error": f"engine failed: {out!r}"}) + "\n"
                finished = True
                return
            yield json.dumps(stream_message(out, first, worker.loop.seq, final)) + "\n"
            first = False
            if out.finished:
                finished = True
                return
    finally:
        if not finished:  # the router (or its client) went away: free the blocks now
            worker.loop.abort(rid)
