"""Request migration and bounded waits on a live `kvgrid serve`: two worker processes (a tiny
random model, so that they start fast), workers killed or stopped under real requests; and a
disaggregated `kvgrid serve` (a prefill worker, two decode workers) whose decode worker dies
mid-stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from kvgrid.chaos.campaign import busy
from kvgrid.server.auth import ControlKey
from kvgrid.server.serve import free_port
from tests.support.live_server import stop

ADMIN = {"authorization": "Bearer admin-secret"}
BODY = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": True}


def state(url: str) -> dict:
    return httpx.get(f"{url}/admin/state", headers=ADMIN, timeout=10).json()


def wait_idle(url: str, timeout: float = 30.0) -> None:
    """Until nothing is held: slots, routes, remote prefills, each worker's requests, G1
    blocks, G2 pins and leases (kvgrid.chaos.campaign.busy)."""
    end = time.monotonic() + timeout
    while (held := busy(state(url))) and time.monotonic() < end:
        time.sleep(0.3)
    assert not held, held


def wait_workers(url: str, n: int = 2, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    st = {}
    while time.monotonic() < end:
        try:
            st = state(url)
            up = [w for w in st["workers"].values() if w["up"] and w["state"]]
            if len(up) >= n:
                return st
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{n} workers not up in {timeout}s: {st}")


def pid_of(url: str, worker: str) -> int:
    return state(url)["workers"][worker]["state"]["pid"]


def stream(
    url: str, body: dict, on_event=None, headers: dict | None = None
) -> tuple[str, list[dict], bool]:
    """(text, error events, ended with [DONE]); ``on_event(n, worker)`` after each chunk."""
    text, errors, done, n = [], [], False, 0
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=headers,
        timeout=120,
    ) as r:  # fmt: skip
        assert r.status_code == 200
        worker = r.headers["x-kvgrid-worker"]
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                errors.append(obj["error"])
                continue
            text.append(obj["choices"][0]["text"])
            n += 1
            if on_event is not None:
                on_event(n, worker)
    return "".join(text), errors, done


def _serve(args: list[str], log, n: int, env: dict | None = None):
    """`kvgrid serve` with ``args``; its URL once ``n`` workers are up."""
    port = free_port()
    env = dict(os.environ, KVGRID_ADMIN_TOKEN="admin-secret", KVGRID_LOG="WARNING", **(env or {}))
    cmd = [sys.executable, "-m", "kvgrid.cli", "serve", "--port", str(port), *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_workers(url, n, 180)
        yield url
    finally:
        stop(proc, log, sig=signal.SIGTERM)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    yield from _serve(
        ["--workers", "2", "--model", str(tiny_model_dir("llama")), "--max-model-len", "512",
         "--kv-cache-memory-gb", "0.02", "--threads", "1", "--max-concurrent", "2",
         "--stall-timeout", "2", "--heartbeat-timeout", "60", "--max-migrations", "1"],
        log, 2,
    )  # fmt: skip


def test_a_worker_killed_mid_stream_hands_the_request_on_with_identical_text(server):
    ref = httpx.post(f"{server}/v1/completions", json=BODY, timeout=60).json()
    ref_text = ref["choices"][0]["text"]
    before = state(server)["migrations"]
    killed = []

    def kill(n, worker):
        if n == 5 and not killed:
            os.kill(pid_of(server, worker), signal.SIGKILL)
            killed.append(worker)

    text, errors, done = stream(server, BODY, kill)
    assert killed and done and not errors
    assert text == ref_text  # nothing repeated, nothing lost, the same greedy tokens
    after = state(server)["migrations"]
    assert after.get("resumed", 0) == before.get("resumed", 0) + 1
    assert after.get("completed", 0) == before.get("completed", 0) + 1
    wait_workers(server)


def test_a_worker_that_stops_answering_then_dies_costs_no_slot(server):
    """SIGSTOP before the worker answers (the request waits on its response headers), then
    SIGKILL: the request must not hang, fail with a 500 or keep its admission slot for good;
    it moves on once the stalled worker fails its probe."""
    body = {**BODY, "max_tokens": 12}
    first = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    worker = first.headers["x-kvgrid-worker"]  # holds the prompt now: the router prefers it
    pid = pid_of(server, worker)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        again = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
        assert again.status_code == 200, again.text
        assert again.headers["x-kvgrid-worker"] != worker
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        assert time.monotonic() - t0 < 20
    finally:
        os.kill(pid, signal.SIGKILL)
    st = state(server)
    assert st["admission"]["running"] == 0 and st["admission"]["runs"] == 0
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    wait_workers(server)


def test_past_the_migration_limit_the_stream_ends_with_a_clean_error(server):
    """--max-migrations 1: the first worker lost is replaced, the second ends the request
    with an error event (and [DONE]), never with wrong or repeated text."""
    body = {**BODY, "max_tokens": 480}
    ref_text = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()
    ref_text = ref_text["choices"][0]["text"]
    pids = {w: s["state"]["pid"] for w, s in state(server)["workers"].items()}
    killed: list[str] = []

    def kill(n, worker):
        if n == 3:
            os.kill(pids[worker], signal.SIGKILL)
            killed.append(worker)
        elif n == 60:  # far past what the first worker made: the second one is serving
            other = next(w for w in pids if w != killed[0])
            os.kill(pids[other], signal.SIGKILL)
            killed.append(other)

    text, errors, done = stream(server, body, kill)
    assert len(killed) == 2 and done
    assert len(errors) == 1 and "limit" in errors[0]["message"], errors
    assert ref_text.startswith(text) and len(text) < len(ref_text)
    assert state(server)["migrations"].get("limit", 0) >= 1


async def test_health_says_unhealthy_while_no_request_can_be_admitted(tiny_model_dir):
    """/health is what a load balancer asks: 503 with no worker up, and 503 while every
    admission slot is held (leaked slots once left it saying ok while nothing was served)."""
    from kvgrid.router.workers import WorkerInfo
    from kvgrid.server.frontend import build_frontend, create_frontend_app

    fe = build_frontend(str(tiny_model_dir("llama")), max_concurrent=2)
    app = create_frontend_app(fe)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fe") as c:
        h = await c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "no workers"
        fe.router.add_worker(WorkerInfo("w0", epoch="e"), time.monotonic())
        assert (await c.get("/health")).status_code == 200
        tenant = fe.tenants.authenticate(None)
        for _ in range(2):
            await fe.scheduler.acquire(tenant)
        h = await c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "no admission slot free"
        assert h.json()["admission"] == {"running": 2, "max_concurrent": 2, "waiting": 0}
        fe.scheduler.release(tenant.name)
        assert (await c.get("/health")).status_code == 200


CLUSTER = ControlKey.generate()


@pytest.fixture(scope="module")
def disagg_server(tiny_model_dir, tmp_path_factory):
    """Every prompt computed on the prefill worker p0 and streamed to decode worker d0 or d1,
    on the closed control plane (each worker holds its own key)."""
    log = tmp_path_factory.mktemp("disagg") / "serve.log"
    yield from _serve(
        ["--prefill-workers", "1", "--decode-workers", "2", "--disagg", "always",
         "--model", str(tiny_model_dir("llama")), "--block-size", "16",
         "--max-num-batched-tokens", "64", "--max-model-len", "1024",
         "--kv-cache-memory-gb", "0.05", "--kv-store-host-gb", "0.1",
         "--kv-store-disk-gb", "0", "--threads", "1", "--stall-timeout", "2",
         "--heartbeat-timeout", "60"],
        log, 3, env={"KVGRID_CONTROL_KEY": CLUSTER.dumps()},
    )  # fmt: skip


def test_a_decode_worker_killed_mid_stream_hands_the_request_on_with_identical_text(
    disagg_server,
):
    """The request moves to the other decode worker; its context (prompt plus the tokens
    delivered) is prefilled on p0 again and streamed there, and the text is the same."""
    url = disagg_server
    body = {"prompt": "The harbour at dawn: " + "gulls over grey water, " * 12,
            "max_tokens": 120, "temperature": 0, "ignore_eos": True}  # fmt: skip
    ref_text, errors, done = stream(url, body, headers=ADMIN)
    assert done and not errors
    before = state(url)["migrations"]
    killed: list[str] = []

    def kill(n, worker):
        if n == 30 and not killed:
            os.kill(pid_of(url, worker), signal.SIGKILL)
            killed.append(worker)

    text, errors, done = stream(url, body, kill, headers=ADMIN)
    assert killed and killed[0].startswith("d") and done and not errors
    assert text == ref_text
    after = state(url)["migrations"]
    assert after.get("resumed", 0) == before.get("resumed", 0) + 1
    assert after.get("completed", 0) == before.get("completed", 0) + 1
    # the resumed attempt's context is prompt plus delivered output, prefilled on p0, unless
    # the new decode worker already held all but a block of it (the reference run may have
    # left the prompt there: then too little is left to move)
    first, last = httpx.get(f"{url}/debug/decisions", headers=ADMIN, timeout=10).json()[-2:]
    assert first["worker_id"] == killed[0] and last["worker_id"] not in killed, (first, last)
    assert last["prompt_tokens"] > first["prompt_tokens"], last
    assert last["prefill"]["remote"] or last["prefill"]["reason"] == "cached_prefix", last
    wait_idle(url)
