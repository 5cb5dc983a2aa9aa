"""Disaggregation without a control key, as the rest of the control plane runs without one:
workers on loopback only, public tenant scope only, and each transfer's ticket a random one
the router hands to both workers. Two real workers (engines, HTTP servers, transfer sockets)
in this process, and the router's frontend in front of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from kvgrid.router.disagg import DisaggConfig
from kvgrid.router.router import Router
from kvgrid.server.auth import ControlKey
from kvgrid.server.frontend import Frontend, FrontendConfig, create_frontend_app
from kvgrid.server.links import FleetLink
from kvgrid.server.tenants import FairScheduler, TenantRegistry
from kvgrid.server.worker import Worker, create_worker_app
from kvgrid.server.worker_transfers import receiver_ticket
from kvgrid.store.config import StoreConfig
from kvgrid.transfer import auth

BS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(model: str):
    from kvgrid.engine.llm_engine import LLMEngine

    store = StoreConfig(g2_bytes=32 << 20, g3_bytes=0, sweep_interval_s=0, probe_tiers=False)
    return LLMEngine(
        model=model, block_size=BS, num_kv_blocks=96, max_num_batched_tokens=64,
        max_model_len=512, kv_store=store,
    )  # fmt: skip


class _Served:
    """A worker's app on a real port, in a thread of this process."""

    def __init__(self, worker: Worker, port: int) -> None:
        cfg = uvicorn.Config(
            create_worker_app(worker), host="127.0.0.1", port=port, log_level="warning"
        )
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "worker did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def fleet(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    served, urls = [], {}
    try:
        for wid, role in (("p0", "prefill"), ("d0", "decode")):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            w = Worker(_engine(model), wid, url, "m", role=role)  # no key
            served.append(_Served(w, port))
            urls[wid] = url
            urls[wid + "_worker"] = w
        yield urls
    finally:
        for s in served:
            s.stop()


def _frontend(urls: dict) -> Frontend:
    router = Router(
        "round_robin", heartbeat_timeout_s=30.0, disagg=DisaggConfig(mode="always", stall_s=3.0)
    )
    link = FleetLink(router, [urls["p0"], urls["d0"]])  # no control key
    return Frontend(
        router, link, TenantRegistry(None, None), FairScheduler(8), FrontendConfig(model_name="m")
    )


async def _complete(fe: Frontend, ids: list[int], n: int) -> httpx.Response:
    transport = httpx.ASGITransport(app=create_frontend_app(fe))
    async with httpx.AsyncClient(transport=transport, base_url="http://fe") as c:
        body = {"prompt": ids, "max_tokens": n, "temperature": 0}
        return await c.post("/v1/completions", json=body, timeout=120)


def _keys(worker: Worker, ids: list[int], n: int) -> list[bytes]:
    from kvgrid import keys

    return keys.block_keys(ids[: n * BS], worker.engine.scope.with_tenant(b"").digest, BS)


def _generate(url: str, ids: list[int], n: int) -> str:
    """A worker computing the whole prompt itself (its internal API)."""
    body = {
        "request_id": f"ref-{time.monotonic_ns()}",
        "prompt_token_ids": ids,
        "params": {"max_tokens": n, "temperature": 0.0},
    }
    r = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    lines = [json.loads(x) for x in r.text.splitlines() if x]
    assert lines[-1]["completion_tokens"] == n
    return "".join(m.get("text", "") for m in lines)


def test_the_router_hands_a_random_ticket_to_both_sides(fleet):
    ids = [(i * 37) % 1000 + 5 for i in range(7 * BS + 5)]
    # the reference: the prefill worker computes it all (the decode worker must not hold it)
    want = _generate(fleet["p0"], ids, 6)
    fe = _frontend(fleet)

    async def run() -> httpx.Response:
        await fe.link.start()
        try:
            deadline = time.monotonic() + 30
            while not {"p0", "d0"} <= {w for w, s in fe.router.workers.items() if s.up}:
                assert time.monotonic() < deadline, "workers did not join"
                await asyncio.sleep(0.1)
            return await _complete(fe, ids, 6)
        finally:
            await fe.link.stop()

    r = asyncio.run(run())
    assert r.status_code == 200, r.text
    assert r.headers["x-kvgrid-prefill-worker"] == "p0" and r.headers["x-kvgrid-worker"] == "d0"
    # the blocks came over: all but the last partial block and token
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 7 * BS
    st = httpx.get(f"{fleet['d0']}/debug/transfers", timeout=10).json()
    assert st["receiver"]["outcomes"] == {"complete": 1} and st["g2_pinned_blocks"] == 0
    assert r.json()["choices"][0]["text"] == want
    # the sent blocks went through the prefill worker's store: its G1 gives them up first
    bm = fleet["p0_worker"].engine.block_manager
    sent = [bm.cached.get(k) for k in _keys(fleet["p0_worker"], ids, 7)]
    assert None not in sent and all(bm.blocks[b].below for b in sent)


def test_a_keyless_worker_takes_public_scopes_on_loopback_only(fleet):
    body = {"request_id": "x", "prompt_token_ids": [5] * 40, "tenant": "ab" * 16,
            "transfer": {"transfer_id": os.urandom(16).hex(), "ticket": auth.new_ticket().hex(),
                         "endpoint": "127.0.0.1:1", "start_block": 0, "num_blocks": 2}}  # fmt: skip
    r = httpx.post(f"{fleet['p0']}/prefill", json=body, timeout=10)
    assert r.status_code == 403 and "control key" in r.text


def test_tickets_come_from_the_key_or_from_the_router():
    cluster = ControlKey.generate()
    own = cluster.for_worker("d0")  # all the decode worker holds
    tid = os.urandom(16)
    # with a key: the router's ticket is the one the worker derives; none is handed over
    assert receiver_ticket(own, "d0", tid, None) == cluster.transfer_ticket("d0", tid)
    with pytest.raises(ValueError, match="derives its transfer tickets"):
        receiver_ticket(own, "d0", tid, auth.new_ticket().hex())
    # without: the router's random ticket, which the worker must be given
    given = auth.new_ticket()
    assert receiver_ticket(None, "d0", tid, given.hex()) == given
    with pytest.raises(ValueError, match="carries none"):
        receiver_ticket(None, "d0", tid, None)
    with pytest.raises(ValueError, match="32 bytes"):
        receiver_ticket(None, "d0", tid, "ab")
