"""`kvgrid serve` with two real worker processes and the default model, driven by real clients.

One server for the module (starting workers costs seconds on this machine); the worker-death
test runs last since it kills a worker and waits for it to rejoin.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from kvgrid.server.auth import ControlKey
from tests.support.chat_sessions import multi_turn
from tests.support.live_server import stop

KEYS = {"keys": {"sk-alice": "alice", "sk-bob": {"tenant": "bob", "max_concurrent": 4}}}
ALICE = {"Authorization": "Bearer sk-alice"}
BOB = {"Authorization": "Bearer sk-bob"}
ADMIN = {"Authorization": "Bearer admin-secret"}
# the cluster key `kvgrid serve` uses (instead of generating one), so that the tests can
# also speak to the workers as their router does
CLUSTER = ControlKey.generate()


def _as_router(worker_id: str) -> dict:
    return CLUSTER.router_headers(worker_id)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _router_state(url: str) -> dict:
    return httpx.get(f"{url}/debug/router", headers=ADMIN, timeout=5).json()


def _wait_workers(url: str, n: int, timeout: float, exclude_epochs=()) -> dict:
    deadline = time.monotonic() + timeout
    state = {}
    while time.monotonic() < deadline:
        try:
            state = _router_state(url)
            ws = state["workers"]
            ok = [
                w
                for w in ws.values()
                if w["up"]
                and w["freshness"] == "exact"
                and w["load"]["epoch"] not in exclude_epochs
            ]
            if len(ok) >= n:
                return state
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"workers not ready in {timeout}s: {state}")


SERVE: dict = {}  # the module's `kvgrid serve` process (the last test stops it)


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(
        os.environ,
        KVGRID_API_KEYS=json.dumps(KEYS),
        KVGRID_SERVER_SECRET="test-secret",
        KVGRID_ADMIN_TOKEN="admin-secret",
        KVGRID_CONTROL_KEY=CLUSTER.dumps(),
        KVGRID_LOG="WARNING",
    )
    cmd = [
        sys.executable,
        "-m",
        "kvgrid.cli",
        "serve",
        "--workers",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        str(default_model_dir),
        "--max-model-len",
        "1024",
        "--kv-cache-memory-gb",
        "0.3",
        "--threads",
        "1",
    ]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    SERVE["proc"] = proc
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_workers(url, 2, 120)
        yield url
    finally:
        stop(proc, log, wait_s=20, tail=3000)


def test_openai_sdk_chat_and_completions(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-alice", max_retries=0)
    model = client.models.list().data[0].id
    c = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert c.choices[0].text and c.usage.completion_tokens == 4
    assert c.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(
        client.completions.create(
            model=model,
            prompt="The capital of France is",
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == c.choices[0].text  # greedy: streamed equals whole
    assert chunks[-1].usage.completion_tokens == 4
    msgs = [{"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=5, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.prompt_tokens_details.cached_tokens is not None
    stream = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=5, temperature=0, stream=True
    )
    parts = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(parts) == r.choices[0].message.content


def test_bad_requests_get_clear_errors_and_server_keeps_serving(server):
    url = f"{server}/v1/completions"
    h = {**ALICE, "content-type": "application/json"}

    def err(resp, status, needle):
        assert resp.status_code == status, resp.text
        e = resp.json()["error"]
        assert needle in e["message"].lower() and e["type"], e
        return e

    err(httpx.post(url, content=b"{not json", headers=h), 400, "json")
    e = err(httpx.post(url, json={"model": "gpt-9", "prompt": "x"}, headers=ALICE), 404, "gpt-9")
    assert e["code"] == "model_not_found"
    err(httpx.post(url, json={"prompt": "x", "max_tokens": -3}, headers=ALICE), 400, "max_tokens")
    err(
        httpx.post(url, json={"prompt": "hello " * 1100, "max_tokens": 4}, headers=ALICE),
        400,
        "context",
    )
    err(
        httpx.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer sk-wrong"}),
        401,
        "api key",
    )
    err(httpx.post(url, json={"prompt": "x"}), 401, "api key")
    err(
        httpx.post(f"{server}/v1/chat/completions", json={"messages": []}, headers=ALICE),
        400,
        "messages",
    )
    err(httpx.post(url, json={"prompt": "x", "temperature": -1}, headers=ALICE), 400, "temperature")
    ok = httpx.post(url, json={"prompt": "Hi", "max_tokens": 2}, headers=ALICE, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_multi_turn_predicted_cached_tokens_match_workers(server):
    """Concurrent multi-turn chats on 2 workers: the router's predicted cached tokens (sent
    back in a header) equal the cached tokens the worker reports, for >= 95% of requests."""
    results = multi_turn(server, ALICE)
    assert len(results) == 12
    matches = sum(p == a for p, a, _, _ in results)
    print("predicted, reported, worker, turn:", results)
    assert matches / len(results) >= 0.95, results
    assert len({w for _, _, w, _ in results}) == 2, results  # both workers served
    # later turns do reuse their history
    assert all(a > 0 for _, a, _, turn in results if turn > 0), results


def test_tenants_do_not_share_cached_prefixes(server):
    prompt = "Tenant isolation check. " * 40
    body = {"prompt": prompt, "max_tokens": 1}
    url = f"{server}/v1/completions"
    a1 = httpx.post(url, json=body, headers=ALICE, timeout=60)
    assert a1.json()["usage"]["prompt_tokens"] > 128
    # on the very worker that holds alice's blocks (wherever bob's request goes), the
    # router sees them for alice and not for bob
    holder = a1.headers["x-kvgrid-worker"]

    def matched(who: dict) -> int:
        d = httpx.get(f"{server}/debug/route", params={"prompt": prompt}, headers=who).json()
        return next(c["matched_blocks"] for c in d["candidates"] if c["worker_id"] == holder)

    assert matched(ALICE) >= 2 and matched(BOB) == 0
    b1 = httpx.post(url, json=body, headers=BOB, timeout=60)
    a2 = httpx.post(url, json=body, headers=ALICE, timeout=60).json()
    assert b1.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert b1.headers["x-kvgrid-predicted-cached-tokens"] == "0"
    assert a2["usage"]["prompt_tokens_details"]["cached_tokens"] >= 128


def test_client_disconnect_aborts_at_the_worker(server):
    workers = _router_state(server)["workers"]
    before = {
        wid: httpx.get(f"{w['url']}/load", headers=_as_router(wid), timeout=10).json()
        for wid, w in workers.items()
    }
    body = {
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json=body, headers=ALICE, timeout=60
    ) as r:
        wid = r.headers["x-kvgrid-worker"]
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data:"):
                seen += 1
            if seen >= 3:
                break
    # the stream is closed after 3 events: the worker must drop the request and its blocks
    wurl = _router_state(server)["workers"][wid]["url"]
    deadline = time.monotonic() + 20
    load = {}
    while time.monotonic() < deadline:
        load = httpx.get(f"{wurl}/load", headers=_as_router(wid), timeout=10).json()
        if load["num_running"] == 0 and load["num_waiting"] == 0 and load["kv_usage"] == 0.0:
            break
        time.sleep(0.2)
    assert load["num_running"] == 0 and load["kv_usage"] == 0.0, load
    # this request's tokens only (the counter is the worker's lifetime total): it stopped
    # soon after the client left, far from its 400
    made = load["generation_tokens"] - before[wid]["generation_tokens"]
    assert 0 < made < 200, made


def test_metrics_and_explained_decisions(server):
    text = httpx.get(f"{server}/metrics").text
    for name in (
        "kvgrid:time_to_first_token_seconds_bucket",
        "kvgrid:prompt_tokens_total",
        "kvgrid:generation_tokens_total",
        "kvgrid:num_requests_running",
        "kvgrid:kv_cache_usage_perc",
        "kvgrid:prefix_cache_hits_total",
        "kvgrid:engine_steps_total",
        "kvgrid:computed_prompt_tokens_total",
        "kvgrid:num_room_waits_total",
        "kvgrid:e2e_request_latency_seconds",
        "kvgrid:router_decision_seconds",
        "kvgrid:request_success_total",
    ):
        assert name in text, name
    assert 'kvgrid:router_worker_freshness{state="exact",worker="w0"} 1.0' in text
    assert 'kvgrid:request_errors_total{model_name="SmolLM2-135M-Instruct",status="401"}' in text
    d = httpx.get(f"{server}/debug/route", params={"prompt": "hello there"}, headers=ALICE).json()
    assert {c["worker_id"] for c in d["candidates"]} == {"w0", "w1"}
    assert {"matched_blocks", "backlog_tokens", "predicted_ttft_s"} <= d["candidates"][0].keys()
    assert httpx.get(f"{server}/debug/decisions", headers=ALICE).json()


def test_workers_run_the_context_store_by_default(server):
    """`kvgrid serve` puts G2 and a per-worker G3 below each worker's G1, and says so."""
    workers = _router_state(server)["workers"]
    g3_dirs = set()
    for wid, w in workers.items():
        text = httpx.get(f"{w['url']}/metrics", headers=_as_router(wid), timeout=5).text
        assert 'kvgrid_store_capacity_bytes{tier="G2"}' in text, wid
        assert 'kvgrid_store_capacity_bytes{tier="G3"}' in text, wid
        assert w["load"]["tier_bytes_per_s"].keys() >= {"G2", "G3"}, wid
        g3_dirs.add(os.path.join(os.environ["KVGRID_STORE_DIR"], "g3", wid))
    # each worker owns its own G3 folder (one owner per capacity), inside the test's store dir
    assert all(os.path.isdir(d) for d in g3_dirs) and len(g3_dirs) == 2


def test_worker_death_mid_stream_then_rejoin(server):
    body = {"prompt": "Once upon a time", "max_tokens": 60, "ignore_eos": True, "stream": True}
    events = []
    with httpx.stream(
        "POST", f"{server}/v1/completions", json=body, headers=ALICE, timeout=60
    ) as r:
        wid = r.headers["x-kvgrid-worker"]
        state = _router_state(server)
        wurl = state["workers"][wid]["url"]
        old_epoch = state["workers"][wid]["load"]["epoch"]
        pid = httpx.get(f"{wurl}/info", headers=_as_router(wid)).json()["pid"]
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(line[5:].strip())
            if len(events) == 2:
                os.kill(pid, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    # the request moved to the surviving worker and finished there (request migration)
    assert not any("error" in json.loads(e) for e in events[:-1])
    final = json.loads(events[-2])
    assert final["choices"][0]["finish_reason"] == "length"
    # new requests go to a live worker without errors: the survivor, or the dead one's
    # restarted process once it has rejoined (a new epoch)
    for _ in range(2):
        ok = httpx.post(
            f"{server}/v1/completions",
            json={"prompt": "Hi", "max_tokens": 2},
            headers=ALICE,
            timeout=60,
        )
        assert ok.status_code == 200
        if ok.headers["x-kvgrid-worker"] == wid:
            assert _router_state(server)["workers"][wid]["load"]["epoch"] != old_epoch
    # the dead process is down; on a slow host the supervisor's restart (1 s later) may
    # have rejoined already, as a new process (a new epoch)
    w = _router_state(server)["workers"][wid]
    assert not w["up"] or w["load"]["epoch"] != old_epoch
    # the supervisor restarts it; it rejoins with a new epoch and takes requests again
    _wait_workers(server, 2, 90, exclude_epochs={old_epoch})
    text = httpx.get(f"{server}/metrics").text
    assert "kvgrid:router_workers_lost_total 1.0" in text


def test_sigterm_stops_serve_and_its_workers(server):
    """Last in this module: it stops the server. A process manager's SIGTERM must take the
    worker processes down with it (uvicorn re-raises the signal after its shutdown, which
    must not kill `kvgrid serve` before it has stopped them and leave them running)."""
    workers = _router_state(server)["workers"]
    pids = [
        httpx.get(f"{w['url']}/info", headers=_as_router(wid)).json()["pid"]
        for wid, w in workers.items()
    ]
    assert len(pids) == 2
    proc = SERVE["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if _alive(p)]
    assert not alive, f"workers {alive} outlived `kvgrid serve`"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (its parent, the supervisor, has exited)
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"
