"""`kvgrid serve --ray` on a real two-node Ray cluster: the head in this network namespace
(site "a", dear), a second node in a namespace of its own with its own address (site "b",
cheap, 5 ms away), the default model, a multi-turn chat workload through the OpenAI SDK.

One deployment, one run, in the order an operator would see it: one worker (placed on the
cheap site's node), scale to two under load (the second lands on the other node), requests
on both nodes with KV reused and predicted, a worker actor SIGKILLed mid-run and restarted
by Ray, scale back to one under load (the dear site's worker drains). The cluster helper is
tests/support/ray_cluster.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import httpx
import pytest

from kvgrid.server.auth import NONCE_HEADER, ControlKey
from tests.support.live_scale import free_port, inflight, scale_state, wait_for
from tests.support.live_server import stop
from tests.support.ray_cluster import Unavailable, two_node_cluster

CLIENTS = 3
TURNS = 5  # per conversation; then a new one (prompts stay well inside max-model-len)
SYSTEM = (
    "You are a concise assistant for a travel agency. Answer in one short sentence. "
    "Remember the traveller's earlier questions; prefer trains to planes; quote prices in "
    "euros; never invent timetables. " * 4
)


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray", reason="the test extra installs Ray: pip install -e '.[test]'")
    try:
        with two_node_cluster(head_site="a", node_site="b") as c:
            yield c
    except Unavailable as e:
        warnings.warn(f"SKIPPING the Ray cluster test: {e}", stacklevel=1)
        pytest.skip(f"SKIPPED LOUDLY: a second Ray node needs a network namespace: {e}")


@dataclass
class Done:
    t0: float
    t1: float
    status: int  # HTTP status; -1: no response
    worker: str
    client: int
    turn: int
    cached: int = 0
    predicted: int = -1
    error: str = ""


class ChatLoad:
    """CLIENTS multi-turn conversations at once, each turn sent when the last answered."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.done: list[Done] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def _client(self, i: int) -> None:
        import openai

        oc = openai.OpenAI(base_url=f"{self.url}/v1", api_key="-", max_retries=0, timeout=120)
        conv = 0
        while not self.stop.is_set() and conv < 100:
            msgs = [{"role": "system", "content": SYSTEM}]
            for turn in range(TURNS):
                if self.stop.is_set():
                    return
                q = f"Traveller {i}.{conv}, question {turn}: how do I get from city {turn} to "
                msgs.append({"role": "user", "content": q + f"city {turn + i + 1}?"})
                t0 = time.monotonic()
                try:
                    raw = oc.chat.completions.with_raw_response.create(
                        model=self.model,
                        messages=msgs,
                        max_tokens=6 + 3 * i,  # unequal: the clients do not move in lock-step
                        temperature=0,
                    )
                    r = raw.parse()
                    u = r.usage
                    self.done.append(
                        Done(t0, time.monotonic(), raw.status_code,
                             raw.headers.get("x-kvgrid-worker", ""), i, turn,
                             u.prompt_tokens_details.cached_tokens,
                             int(raw.headers.get("x-kvgrid-predicted-cached-tokens", -1)))
                    )  # fmt: skip
                    msgs.append({"role": "assistant", "content": r.choices[0].message.content})
                except openai.APIStatusError as e:
                    self.done.append(Done(t0, time.monotonic(), e.status_code,
                                          e.response.headers.get("x-kvgrid-worker", ""), i, turn,
                                          error=str(e)[:300]))  # fmt: skip
                except openai.APIConnectionError as e:
                    self.done.append(Done(t0, time.monotonic(), -1, "", i, turn, error=repr(e)))
            conv += 1


def _up(url: str, wid: str) -> dict | None:
    w = scale_state(url)["workers"][wid]
    return w["where"] if w["up"] and w["where"]["status"] == "up" else None


def _control_plane_is_closed(wid: str, w: dict, key: ControlKey) -> None:
    """The worker actor answers its router's token for its own id only, proves its key on
    /info, and publishes its events over CURVE."""
    url = w["url"]
    assert httpx.get(f"{url}/info", timeout=5).status_code == 401
    other = key.router_headers("w9")  # a valid token, but another worker's
    assert httpx.get(f"{url}/info", headers=other, timeout=5).status_code == 401
    wrong = ControlKey.generate().router_headers(wid)
    for path in ("/load", "/internal/state", "/internal/faults"):
        assert httpx.get(f"{url}{path}", headers=wrong, timeout=5).status_code == 401, path
    nonce = "n-" + os.urandom(8).hex()
    r = httpx.get(
        f"{url}/info", headers={**key.router_headers(wid), NONCE_HEADER: nonce}, timeout=5
    )
    info = r.json()
    assert r.status_code == 200 and key.check_info_proof(wid, nonce, info["proof"]), info
    assert info["events_secure"] and info["events_endpoint"].startswith(f"tcp://{w['node_ip']}:")


def test_serve_on_a_two_node_ray_cluster(cluster, default_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    head_ip, node_ip = cluster.head.ip, cluster.node.ip
    cmd = [sys.executable, "-m", "kvgrid.cli", "serve", "--ray", cluster.address,
           "--workers", "1", "--max-workers", "2", "--port", str(port),
           "--site", "a:0:2.0", "--site", "b:5:1.0", "--ray-worker-cpus", "1",
           "--model", str(default_model_dir), "--max-model-len", "1024",
           "--kv-cache-memory-gb", "0.2",
           # G3 of its own, as a deployment has: the session's servers share the default
           "--kv-store-dir", str(tmp_path / "kv")]  # fmt: skip
    key = ControlKey.generate()  # the operator's cluster key: the test checks the workers with it
    env = {**cluster.env, "KVGRID_LOG": "INFO", "KVGRID_CONTROL_KEY": key.dumps()}
    env.pop("KVGRID_API_KEYS", None)
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    load = None
    t_start = time.monotonic()
    phases: dict[str, float] = {}
    try:
        # one worker, on the cheaper site's node, restartable by Ray
        w0 = wait_for(lambda: _up(url, "w0"), 120, "w0 up", url)
        assert (w0["site"], w0["node_ip"]) == ("b", node_ip), w0
        phases["w0 up"] = time.monotonic() - t_start
        # its internal API is on the node's address, open to its router only (its own key)
        _control_plane_is_closed("w0", w0, key)
        model = httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
        load = ChatLoad(url, model)
        load.start()

        # 1 -> 2 under load: the new worker lands on the other node (site b has no room left)
        r = httpx.post(f"{url}/admin/scale", json={"workers": 2}, timeout=10).json()
        assert [a["kind"] for a in r["done"]] == ["add"], r
        w1 = wait_for(lambda: _up(url, "w1"), 90, "w1 up", url)
        assert (w1["site"], w1["node_ip"]) == ("a", head_ip), w1
        phases["w1 up"] = time.monotonic() - t_start
        # the router weighs each site's round trip on the real cluster
        route = httpx.get(f"{url}/debug/route", params={"prompt": "hi"}, timeout=5).json()
        net = {c["worker_id"]: c["ttft_parts"]["network_s"] for c in route["candidates"]}
        assert net == {"w0": 0.005, "w1": 0.0}, route

        # a worker actor killed mid-run (a request in flight on it): Ray restarts it
        wait_for(lambda: inflight(url).get("w0"), 60, "a request in flight on w0", url)
        t_kill = time.monotonic()
        os.kill(w0["pid"], signal.SIGKILL)
        restarted = lambda: (w := _up(url, "w0")) and w["restarts"] == 1 and w
        back = wait_for(restarted, 120, "w0 restarted by Ray", url)
        t_back = time.monotonic()
        phases["w0 back"] = time.monotonic() - t_start
        assert back["pid"] != w0["pid"] and back["epoch"] != w0["epoch"], (w0, back)
        assert (back["site"], back["node_ip"]) == ("b", node_ip), back

        # 2 -> 1 under load: the dear site's worker drains (it holds the conversations now,
        # so it has requests to finish), and the restarted w0 serves everything after
        wait_for(lambda: inflight(url).get("w1"), 60, "w1 busy", url)
        t_drain = time.monotonic()
        r = httpx.post(f"{url}/admin/scale", json={"workers": 1}, timeout=10).json()
        t_drain_ack = time.monotonic()
        assert [(a["kind"], a["worker_id"]) for a in r["done"]] == [("drain", "w1")], r
        retired = wait_for(
            lambda: [x for x in scale_state(url)["retired"] if x["worker_id"] == "w1"],
            90,
            "w1 drained",
            url,
        )[0]
        phases["w1 drained"] = time.monotonic() - t_start
        wait_for(lambda: any(d.t0 > t_drain_ack for d in load.done), 60, "an answer after it", url)
        load.join()
        migrations = httpx.get(f"{url}/admin/state", timeout=10).json()["migrations"]
    finally:
        if load is not None:
            load.join()
        stop(proc, wait_s=60)
        phases["stopped"] = time.monotonic() - t_start
        text = log.read_text()
        print(text[-6000:])
        print("phases (s since start):", {k: round(v, 1) for k, v in phases.items()})
    assert proc.returncode == 0
    # no key in the driver's log, which carries every actor's too
    assert key.key.hex() not in text
    assert not any(key.for_worker(w).key.hex() in text for w in ("w0", "w1"))

    done = load.done
    ok = [d for d in done if d.status == 200]
    # served on both nodes
    assert {d.worker for d in ok} == {"w0", "w1"}
    # No request failed: those in flight on w0 when it was killed moved to w1 (request
    # migration, on by default) and finished there, with the text they would have had
    failed = [d for d in done if d.status != 200]
    assert not failed, failed
    moved = [d for d in ok if d.worker == "w0" and d.t0 < t_kill < d.t1]
    assert moved, "no request was in flight on w0 when it was killed"
    assert migrations.get("resumed", 0) >= 1 and migrations.get("completed", 0) >= 1, migrations
    assert not migrations.get("error") and not migrations.get("limit"), migrations
    print(f"{len(done)} requests, none failed; {len(moved)} moved off w0: {migrations}")
    for d in done:  # what a failure below is read from
        print(
            f"  {d.t0 - t_kill:+6.1f}s {d.t1 - d.t0:4.1f}s {d.worker} c{d.client} t{d.turn} "
            f"cached {d.cached} predicted {d.predicted}{' moved' if d in moved else ''}"
        )
    # the drain lost nothing and sent nothing new to the drained worker
    assert retired["inflight_at_drain"] >= 1, retired
    during = [d for d in done if d.t1 > t_drain]
    assert all(d.status == 200 for d in during), [d for d in during if d.status != 200]
    assert {d.worker for d in done if d.t0 > t_drain_ack} == {"w0"}
    assert retired["where"]["status"] == "stopped" and retired["where"]["site"] == "a"
    with socket.socket() as s:  # the drained actor is gone: its port refuses connections
        s.settimeout(2)
        host, p = retired["where"]["url"].rsplit("/", 1)[1].rsplit(":", 1)
        assert s.connect_ex((host, int(p))) != 0
    # KV reused across turns, and predicted by the router from the workers' events, but for
    # requests sent just as w0 died or came back, before the router heard of it, and those in
    # flight on it when it died: they moved to w1 and finished with its cache, which need not
    # hold their conversation (how many move depends on how many were in flight at the kill)
    steady = [
        d
        for d in ok
        if abs(d.t0 - t_kill) > 1 and abs(d.t0 - t_back) > 1 and not d.t0 < t_kill < d.t1
    ]
    later = [d for d in steady if d.turn > 0]
    assert later and sum(d.cached > 0 for d in later) >= 0.8 * len(later)
    match = sum(d.predicted == d.cached for d in steady) / len(steady)
    print(f"predicted cached tokens match the worker's for {match:.0%} of {len(steady)}")
    assert match >= 0.9
