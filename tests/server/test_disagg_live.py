"""Disaggregated serving with real processes: `kvgrid serve` with a prefill worker and a decode
worker (a tiny random Llama with the default model's tokenizer), every request's prompt
computed on the prefill worker and its KV streamed to the decode worker (``--disagg always``).

Each answer is compared with the decode worker computing the same prompt itself (its internal
API, under another tenant, so none of the transferred KV can serve it). The prompt is cut into
16-token blocks and prefilled 64 tokens a step, so blocks stream while the prefill runs. Every
failure of a transfer (damaged block, dropped connection, stalled stream, killed prefill
worker) must still give the same answer, from the blocks that landed plus recompute, and leave
no request, KV block or pinned G2 slot behind on either worker. The kill test runs last.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from kvgrid import keys
from kvgrid.server.auth import ControlKey
from kvgrid.transfer import auth, wire
from tests.support.live_server import stop

SECRET = "disagg-test-secret"
CLUSTER = ControlKey.generate()  # the router's; each worker gets its own key from serve
ALICE = {"Authorization": "Bearer sk-alice"}
ADMIN = {"Authorization": "Bearer disagg-admin"}
REF_TENANT = "ab" * 16  # the reference runs' tenant scope: no KV shared with alice's
BS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tok(model_dir):
    from kvgrid.models.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(str(model_dir)))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def serve(model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("disagg") / "serve.log"
    env = dict(
        os.environ,
        KVGRID_API_KEYS=json.dumps({"keys": {"sk-alice": "alice"}}),
        KVGRID_SERVER_SECRET=SECRET,
        KVGRID_CONTROL_KEY=CLUSTER.dumps(),
        KVGRID_ADMIN_TOKEN="disagg-admin",
        KVGRID_LOG="WARNING",
    )
    cmd = [sys.executable, "-m", "kvgrid.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--model", str(model_dir),
           "--prefill-workers", "1", "--decode-workers", "1", "--disagg", "always",
           "--transfer-stall-s", "3", "--allow-fault-injection",
           "--block-size", str(BS), "--max-num-batched-tokens", "64", "--max-model-len", "1024",
           "--kv-cache-memory-gb", "0.2", "--kv-store-host-gb", "0.2",
           "--kv-store-disk-gb", "0", "--threads", "1"]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        workers: dict = {}
        while time.monotonic() < deadline:
            try:
                ws = httpx.get(f"{url}/debug/router", headers=ADMIN, timeout=5).json()["workers"]
                ready = {w for w, s in ws.items() if s["up"] and s["freshness"] == "exact"}
                if {"p0", "d0"} <= ready:
                    workers = ws
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        assert workers, "workers did not come up:\n" + log.read_text()[-3000:]
        yield {
            "url": url,
            "P": workers["p0"]["url"],
            "D": workers["d0"]["url"],
            "D_endpoint": workers["d0"]["transfer_endpoint"],
        }
    finally:
        stop(proc, log, wait_s=20)


def _reference(serve, ids: list[int], n: int) -> str:
    """The decode worker computing the whole prompt itself."""
    body = {
        "request_id": f"ref-{time.monotonic_ns()}",
        "prompt_token_ids": ids,
        "params": {"max_tokens": n, "temperature": 0.0},
        "tenant": REF_TENANT,
    }
    r = httpx.post(f"{serve['D']}/generate", json=body, headers=_as_router("D"), timeout=120)
    assert r.status_code == 200, r.text
    lines = [json.loads(x) for x in r.text.splitlines() if x]
    assert "error" not in lines[-1] and lines[-1]["completion_tokens"] == n
    return "".join(m.get("text", "") for m in lines)


def _complete(serve, ids: list[int], n: int) -> tuple[str, dict, httpx.Headers]:
    body = {"prompt": ids, "max_tokens": n, "temperature": 0}
    r = httpx.post(f"{serve['url']}/v1/completions", json=body, headers=ALICE, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    return out["choices"][0]["text"], out["usage"], r.headers


def _as_router(worker: str) -> dict:
    """What the router sends worker P (p0) or D (d0): its token for that worker."""
    return CLUSTER.router_headers({"P": "p0", "D": "d0"}[worker])


def _state(serve, worker: str) -> dict:
    r = httpx.get(f"{serve[worker]}/debug/transfers", headers=_as_router(worker), timeout=10)
    return r.json()


def _outcomes(serve) -> dict:
    return dict(_state(serve, "D")["receiver"]["outcomes"])


def _delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def _assert_no_leaks(serve, workers=("P", "D")) -> None:
    """Nothing left on either side once the requests are done."""
    deadline = time.monotonic() + 15
    while True:
        states = {w: _state(serve, w) for w in workers}
        leaks = {
            w: s
            for w, s in states.items()
            if s["engine"]["num_running"]
            or s["engine"]["num_waiting"]
            or s["engine"]["kv_usage"]
            or s["g2_pinned_blocks"]
            or s["receiver"]["active"]
            or s["sender"]["active"]
        }
        if not leaks:
            return
        assert time.monotonic() < deadline, f"left behind: {leaks}"
        time.sleep(0.2)


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text)


def _alice_scope() -> bytes:
    return keys.tenant_scope(SECRET.encode(), "alice")


def _warm(serve, worker: str, ids: list[int]) -> None:
    """Compute a prompt on one worker directly, as alice: its blocks stay in its caches."""
    body = {
        "request_id": f"warm-{time.monotonic_ns()}",
        "prompt_token_ids": ids,
        "params": {"max_tokens": 1, "temperature": 0.0},
        "tenant": _alice_scope().hex(),
    }
    r = httpx.post(f"{serve[worker]}/generate", json=body, headers=_as_router(worker), timeout=120)
    assert r.status_code == 200 and "error" not in r.text, r.text


def _prefix_hits(serve, worker: str) -> int:
    r = httpx.get(f"{serve[worker]}/load", headers=_as_router(worker), timeout=10)
    return r.json()["prefix_cache_hits"]


STORY = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the "
    "steps as his father had taught him, and from the lamp room he watched the fishing "
    "boats come home across the grey water while the gulls circled the harbour wall. "
)


def test_outputs_equal_local_ones_fresh_and_with_prefixes_cached_on_either_side(serve, tok):
    n = 12
    # fresh: nothing cached anywhere
    fresh = _ids(tok, "Chapter one. " + STORY * 4)
    before = _outcomes(serve)
    text, usage, headers = _complete(serve, fresh, n)
    assert headers["x-kvgrid-prefill-worker"] == "p0" and headers["x-kvgrid-worker"] == "d0"
    assert _delta(before, _outcomes(serve)) == {"complete": 1}
    # the transferred blocks served the prompt: all but its last partial block and token
    assert usage["prompt_tokens_details"]["cached_tokens"] == (len(fresh) - 1) // BS * BS
    assert text == _reference(serve, fresh, n)

    # a prefix cached on the prefill side: it computes only the rest, sends all of it
    shared = _ids(tok, "Chapter two. " + STORY * 5)[: 10 * BS]
    assert len(shared) == 10 * BS
    _warm(serve, "P", shared + _ids(tok, " The first ending."))
    hits = _prefix_hits(serve, "P")
    prompt = shared + _ids(tok, " Another ending: " + STORY)
    before = _outcomes(serve)
    text, usage, _ = _complete(serve, prompt, n)
    assert _prefix_hits(serve, "P") - hits >= 9 * BS  # its cached blocks were reused there
    assert _delta(before, _outcomes(serve)) == {"complete": 1}
    assert usage["prompt_tokens_details"]["cached_tokens"] == (len(prompt) - 1) // BS * BS
    assert text == _reference(serve, prompt, n)

    # a prefix cached on the decode side: only the blocks it lacks are moved
    shared = _ids(tok, "Chapter three. " + STORY * 5)[: 10 * BS]
    assert len(shared) == 10 * BS
    _warm(serve, "D", shared + _ids(tok, " A short ending."))
    prompt = shared + _ids(tok, " The long ending: " + STORY)
    route = {}
    for _ in range(50):  # until the router has the decode worker's KV events
        route = httpx.post(
            f"{serve['url']}/debug/route", json={"prompt": prompt}, headers=ALICE, timeout=10
        ).json()
        if route["prefill"]["start_block"] >= 10:
            break
        time.sleep(0.1)
    assert route["prefill"]["start_block"] >= 10, route
    before = _outcomes(serve)
    text, usage, _ = _complete(serve, prompt, n)
    decision = httpx.get(f"{serve['url']}/debug/decisions", headers=ALICE).json()[-1]
    assert decision["prefill"]["remote"] and decision["prefill"]["start_block"] >= 10
    assert decision["prefill"]["reason"] == "forced"
    assert _delta(before, _outcomes(serve)) == {"complete": 1}
    assert usage["prompt_tokens_details"]["cached_tokens"] == (len(prompt) - 1) // BS * BS
    assert text == _reference(serve, prompt, n)

    metrics = httpx.get(f"{serve['url']}/metrics").text
    assert 'kvgrid:kv_transfers_total{outcome="complete"} 3.0' in metrics
    assert 'kvgrid:prefill_decisions_total{reason="forced",where="remote"} 3.0' in metrics
    worker_metrics = httpx.get(f"{serve['D']}/metrics", headers=_as_router("D")).text
    assert 'kvgrid_kv_transfers_total{outcome="complete",side="receive"} 3.0' in worker_metrics
    _assert_no_leaks(serve)


@pytest.mark.parametrize(
    "fault, outcome, landed",
    [
        ({"corrupt_block": 2}, "rejected", 2),
        ({"drop_after": 3}, "connection_lost", 3),
        ({"stall_after": 3}, "stalled", 3),
    ],
    ids=["corrupted-block", "dropped-connection", "stalled-stream"],
)
def test_a_failed_transfer_ends_in_the_same_answer_by_recompute(serve, tok, fault, outcome, landed):
    prompt = _ids(tok, f"Case {fault}. " + STORY * 3)
    r = httpx.post(f"{serve['P']}/debug/faults", json=fault, headers=_as_router("P"))
    assert r.status_code == 200, r.text
    before = _outcomes(serve)
    t0 = time.monotonic()
    text, usage, _ = _complete(serve, prompt, 8)
    assert _delta(before, _outcomes(serve)) == {outcome: 1}
    # what landed before the failure was used, the rest recomputed
    assert usage["prompt_tokens_details"]["cached_tokens"] == landed * BS
    assert text == _reference(serve, prompt, 8)
    assert time.monotonic() - t0 < 60  # bounded by the stall limit, never hung
    _assert_no_leaks(serve)


def test_only_the_router_and_its_ticket_open_a_transfer(serve, tok):
    """Every door of the transfer path refuses a peer without the router's grant: the prefill
    worker's API, a ticket handed to a worker that derives its own, and the receiver's socket
    to anyone whose ticket is not the one the router made for that transfer into that worker."""
    prompt = _ids(tok, "Nobody else may send this. " + STORY * 2)
    other = ControlKey.generate()  # another cluster's key
    for headers in ({}, other.router_headers("p0"), CLUSTER.router_headers("d0")):
        r = httpx.post(f"{serve['P']}/prefill", json={}, headers=headers, timeout=10)
        assert r.status_code == 401, r.text
    tid = os.urandom(16)
    spec = {"transfer_id": tid.hex(), "start_block": 0, "num_blocks": 3, "deadline_s": 30,
            "stall_s": 5}  # fmt: skip
    body = {
        "request_id": f"door-{time.monotonic_ns()}",
        "prompt_token_ids": prompt,
        "params": {"max_tokens": 6, "temperature": 0.0},
        "tenant": REF_TENANT,
        "remote_prefill": {**spec, "ticket": auth.new_ticket().hex()},
    }
    r = httpx.post(f"{serve['D']}/generate", json=body, headers=_as_router("D"), timeout=30)
    assert r.status_code == 400 and "derives its transfer tickets" in r.text
    before = _outcomes(serve)
    body["remote_prefill"] = spec
    with httpx.stream(
        "POST", f"{serve['D']}/generate", json=body, headers=_as_router("D"), timeout=60
    ) as resp:
        assert resp.status_code == 200
        host, port = wire.parse_endpoint(serve["D_endpoint"])
        for ticket in (
            auth.new_ticket(),
            other.transfer_ticket("d0", tid),
            CLUSTER.transfer_ticket("p0", tid),  # made for another worker
            CLUSTER.transfer_ticket("d0", os.urandom(16)),  # for another transfer
        ):
            sock = socket.create_connection((host, port), 5)
            with sock, pytest.raises(auth.AuthError, match="ticket"):
                auth.client_handshake(sock, ticket, tid)
        assert _state(serve, "D")["receiver"]["active"][0]["landed_blocks"] == 0
        with socket.create_connection((host, port), 5) as sock:  # the router's grant
            auth.client_handshake(sock, CLUSTER.transfer_ticket("d0", tid), tid)
            wire.send_frame(sock, wire.END, 0)  # nothing sent: D recomputes it all
        lines = [json.loads(x) for x in resp.iter_lines() if x]
    assert lines[-1]["transfer"]["outcome"] == "partial"
    assert _delta(before, _outcomes(serve)) == {"partial": 1}
    text = "".join(m.get("text", "") for m in lines)
    assert text == _reference(serve, prompt, 6)
    _assert_no_leaks(serve)


def test_a_bandwidth_probe_runs_only_where_it_is_expected(serve):
    pid = os.urandom(16)
    probe = {"endpoint": serve["D_endpoint"], "bytes": 4 << 20, "probe_id": pid.hex(),
             "ticket": CLUSTER.transfer_ticket("d0", pid).hex()}  # fmt: skip
    url, h = f"{serve['P']}/transfer/probe", _as_router("P")
    r = httpx.post(url, json=probe, headers=h, timeout=30)
    assert r.status_code == 502 and "unknown transfer" in r.text  # D does not expect it
    r = httpx.post(
        f"{serve['D']}/transfer/probe/expect", json={"probe_id": pid.hex()},
        headers=_as_router("D"), timeout=10,
    )  # fmt: skip
    assert r.status_code == 200 and r.json()["endpoint"] == serve["D_endpoint"]
    r = httpx.post(url, json=probe, headers=h, timeout=30)
    assert r.status_code == 200 and r.json()["receiver"]["bytes"] == 4 << 20, r.text
    r = httpx.post(url, json=probe, headers=h, timeout=30)
    assert r.status_code == 502  # once


def _reference_choices(serve, ids: list[int], params: dict) -> dict[int, dict]:
    """Per choice index: the decode worker's text, token ids and sampled tokens' logprobs
    for ``params``, computing the whole prompt itself."""
    body = {
        "request_id": f"ref-{time.monotonic_ns()}",
        "prompt_token_ids": ids,
        "params": params,
        "tenant": REF_TENANT,
    }
    r = httpx.post(f"{serve['D']}/generate", json=body, headers=_as_router("D"), timeout=120)
    assert r.status_code == 200, r.text
    out: dict[int, dict] = {}
    for m in (json.loads(x) for x in r.text.splitlines() if x):
        assert "error" not in m, m
        c = out.setdefault(m["index"], {"text": "", "ids": [], "lps": []})
        c["text"] += m.get("text", "")
        c["ids"] += m.get("ids", [])
        c["lps"] += [e[str(t)] for t, e in zip(m.get("ids", []), m.get("logprobs", []))]
    return out


def test_agent_api_features_compose_with_a_remote_prefill(serve, tok):
    """n, seeds, logprobs, penalties, logit_bias, a grammar and a forced tool call on the
    decode worker of a remote prefill answer as that worker computing the prompt itself;
    a request for prompt logprobs (echo) is prefilled where it decodes."""
    url = serve["url"]
    prompts = [_ids(tok, f"Features, part {i}. " + STORY * 3) for i in range(3)]
    prompt = prompts[0]
    sampled = {"n": 3, "seed": 11, "temperature": 0.9, "logprobs": 2, "max_tokens": 8,
               "frequency_penalty": 0.5, "presence_penalty": 0.3, "repetition_penalty": 1.2,
               "logit_bias": {str(prompt[5]): 4.0}}  # fmt: skip
    schema = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"],
              "additionalProperties": False}  # fmt: skip
    guided = {"guided": {"kind": "json_schema", "spec": json.dumps(schema)},
              "temperature": 0.0, "max_tokens": 20}  # fmt: skip
    cases = [
        (sampled, dict(sampled)),
        ({"guided_json": schema, "temperature": 0, "max_tokens": 20}, guided),
    ]
    before = _outcomes(serve)
    # each case has its own prompt: one already on the decode side would be prefilled there
    for (api, internal), prompt in zip(cases, prompts):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, **api}, headers=ALICE,
                       timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.headers.get("x-kvgrid-prefill-worker") == "p0", r.headers
        got = r.json()["choices"]
        ref = _reference_choices(serve, prompt, internal)
        assert len(got) == len(ref) == api.get("n", 1)
        for c in got:
            want = ref[c["index"]]
            assert c["text"] == want["text"]
            if c["logprobs"] is not None:
                assert c["logprobs"]["token_logprobs"] == pytest.approx(want["lps"], abs=1e-4)
        if "guided_json" in api:
            assert json.loads(got[0]["text"]) in ({"k": "a"}, {"k": "b"})
    assert _delta(before, _outcomes(serve)) == {"complete": 2}

    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"x": {"enum": ["up", "down"]}}, "required": ["x"],
        "additionalProperties": False}}}  # fmt: skip
    msgs = [{"role": "user", "content": "Pick a direction. " + STORY * 3}]
    body = {"messages": msgs, "tools": [tool], "tool_choice": "required", "max_tokens": 40,
            "temperature": 0}  # fmt: skip
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=ALICE, timeout=120)
    assert r.status_code == 200 and r.headers["x-kvgrid-prefill-worker"] == "p0", r.text
    ch = r.json()["choices"][0]
    assert ch["finish_reason"] == "tool_calls", ch
    assert json.loads(ch["message"]["tool_calls"][0]["function"]["arguments"])["x"] in (
        "up",
        "down",
    )

    # prompt logprobs need every prompt position's logits: computed where it decodes
    prompt = prompts[2]
    body = {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 2, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=ALICE, timeout=120)
    assert r.status_code == 200, r.text
    assert "x-kvgrid-prefill-worker" not in r.headers
    decision = httpx.get(f"{url}/debug/decisions", headers=ALICE).json()[-1]
    assert decision["prefill"] == {**decision["prefill"], "remote": False,
                                   "reason": "prompt_logprobs"}  # fmt: skip
    lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert lps[0] is None and len(lps) == len(prompt) + 2 and all(v < 0 for v in lps[1:])
    _assert_no_leaks(serve)


def test_killed_prefill_worker_mid_transfer(serve, tok):
    prompt = _ids(tok, "The prefill worker dies. " + STORY * 3)
    pid = httpx.get(f"{serve['P']}/info", headers=_as_router("P")).json()["pid"]
    # hold the stream after two blocks, so the kill comes mid-transfer
    httpx.post(f"{serve['P']}/debug/faults", json={"stall_after": 2}, headers=_as_router("P"))
    before = _outcomes(serve)
    result: dict = {}

    def request() -> None:
        result["out"] = _complete(serve, prompt, 8)

    th = threading.Thread(target=request)
    th.start()
    deadline = time.monotonic() + 60
    killed = False
    while time.monotonic() < deadline and not killed:
        active = _state(serve, "D")["receiver"]["active"]
        if active and active[0]["landed_blocks"] >= 2:
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.02)
    th.join(60)
    assert killed and "out" in result
    text, usage, _ = result["out"]
    # the connection died with the process: noticed at once, not at the stall limit
    assert _delta(before, _outcomes(serve)) == {"connection_lost": 1}
    assert usage["prompt_tokens_details"]["cached_tokens"] == 2 * BS
    assert text == _reference(serve, prompt, 8)
    _assert_no_leaks(serve, workers=("D",))
