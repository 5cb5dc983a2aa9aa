"""A fleet across hosts: router, two workers, a client and an outsider, each its own network
namespace (its own address on one bridge), started with the README's multi-machine commands.

- KV events and heartbeats cross hosts: the router predicts the cached tokens each worker
  reports, and no worker is ever marked down (a heartbeat timeout of 3 s here, so that
  missing heartbeats would show within seconds; the down count is checked over the run);
- an outsider fails at every door (registration, worker API, event stream, debug, admin);
- tenant B learns nothing of tenant A, both pinned to one worker by a second router that
  knows only that worker (and shares the first router's server secret, as it must);
- KV moves between workers on different hosts on the router's grant only: a transfer from
  w1 to w2 at w2's advertised transfer address, and none for the outsider.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import httpx
import pytest
import zmq

from kvgrid.cli import main as kvgrid
from kvgrid.server.auth import ControlKey
from kvgrid.transfer import auth as transfer_auth
from kvgrid.transfer import wire as transfer_wire
from tests.support.chat_sessions import multi_turn
from tests.support.netns import Net

ALICE = {"Authorization": "Bearer sk-alice"}
BOB = {"Authorization": "Bearer sk-bob"}
ADMIN_TOKEN = "admin-" + os.urandom(8).hex()
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HEARTBEAT_TIMEOUT_S = 3.0
ENGINE = ["--max-model-len", "1024", "--kv-cache-memory-gb", "0.3", "--threads", "1"]


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except (httpx.HTTPError, ValueError, KeyError) as e:
            last = e
        time.sleep(0.3)
    raise AssertionError(f"{what} not within {timeout}s: {last!r}")


@pytest.fixture(scope="module")
def fleet(default_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    net = Net.create(["router", "w1", "w2", "client", "outsider"])
    try:
        yield _start(net, d, default_model_dir)
    finally:
        net.close()
        for log in sorted(d.glob("*.log")):
            print(f"---- {log.name}\n{log.read_text()[-2500:]}")


def _start(net: Net, d, model) -> dict:
    h = net.hosts
    R, W1, W2 = h["router"].addr, h["w1"].addr, h["w2"].addr
    # the README's key set-up, on the router's machine
    assert kvgrid(["control-key", "new", "--out", str(d / "cluster.key")]) == 0
    for w in ("w1", "w2"):
        argv = ["control-key", "worker", w, "--cluster", str(d / "cluster.key")]
        assert kvgrid([*argv, "--out", str(d / f"{w}.key")]) == 0
    (d / "keys.json").write_text(json.dumps({"keys": {"sk-alice": "alice", "sk-bob": "bob"}}))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("KVGRID_CONTROL", "KVGRID_API"))
    }
    env.update(
        KVGRID_STORE_DIR=str(d / "store"),
        KVGRID_SERVER_SECRET="fleet-" + os.urandom(8).hex(),
        KVGRID_ADMIN_TOKEN=ADMIN_TOKEN,
        KVGRID_LOG="INFO",
    )
    kv = [sys.executable, "-m", "kvgrid.cli"]
    router = ["router", "--port", "8000", "--api-keys", str(d / "keys.json"),
              "--control-key-file", str(d / "cluster.key"), "--model", str(model),
              "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S)]  # fmt: skip
    net.start("router", [*kv, *router], d / "router.log", env)
    # a second router that knows only w1: both tenants' requests go there
    router2 = [*router[:2], "8001", *router[3:], "--worker", f"http://{W1}:9001"]
    net.start("router", [*kv, *router2], d / "router2.log", env)
    for w, addr in (("w1", W1), ("w2", W2)):
        worker = ["worker", "--host", "0.0.0.0", "--port", "9001", "--events-port", "9002",
                  "--advertise-url", f"http://{addr}:9001", "--router", f"http://{R}:8000",
                  "--control-key-file", str(d / f"{w}.key"), "--model", str(model),
                  *ENGINE]  # fmt: skip
        net.start(w, [*kv, *worker], d / f"{w}.log", env)
    fleet = {
        "net": net,
        "dir": d,
        "url": f"http://{R}:8000",
        "url2": f"http://{R}:8001",
        "w1": f"http://{W1}:9001",
        "w2": f"http://{W2}:9001",
        "cluster": ControlKey.loads((d / "cluster.key").read_text()),
    }
    client = h["client"]

    def ready(url: str, n: int) -> bool:
        ws = httpx.get(f"{url}/debug/router", headers=ADMIN, timeout=5).json()["workers"]
        return sum(w["up"] and w["freshness"] == "exact" for w in ws.values()) >= n

    client.call(_wait, lambda: ready(fleet["url"], 2), 180, "two workers on the router")
    state = client.call(lambda: httpx.get(f"{fleet['url']}/debug/router", headers=ADMIN).json())
    for w in ("w1", "w2"):
        fleet[f"{w}_transfers"] = state["workers"][w]["transfer_endpoint"]
    client.call(_wait, lambda: ready(fleet["url2"], 1), 60, "w1 on the second router")
    fleet["ready_at"] = time.monotonic()
    return fleet


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_kv_events_and_heartbeats_cross_hosts(fleet):
    client = fleet["net"].hosts["client"]
    results = client.call(multi_turn, fleet["url"], ALICE)
    print("predicted, reported, worker, turn:", results)
    assert len(results) == 12
    matches = sum(p == a for p, a, _, _ in results)
    assert matches / len(results) >= 0.95, results
    assert {w for _, _, w, _ in results} == {"w1", "w2"}  # both hosts served
    assert all(a > 0 for _, a, _, turn in results if turn > 0), results
    state = client.call(lambda: httpx.get(f"{fleet['url']}/debug/router", headers=ADMIN).json())
    for wid, w in state["workers"].items():
        # the workers' own addresses, not 0.0.0.0: events and heartbeats came from there
        assert w["url"] == fleet[wid] and w["up"] and w["freshness"] == "exact", state
        assert w["load"]["num_kv_blocks"] > 0 and w["cached_blocks"] > 0
    assert state["counters"]["workers_lost"] == 0 and not state["bad_messages"], state


def _outsider_doors(fleet: dict) -> dict:
    """Everything an outsider host tries, and what it got."""
    got: dict = {}
    url, w1 = fleet["url"], fleet["w1"]
    me = fleet["net"].hosts["outsider"].addr
    with httpx.Client(timeout=10) as c:
        got["register"] = c.post(f"{url}/internal/workers", json={"url": f"http://{me}:9001"})
        forged = {"authorization": "Bearer kvw1.w1." + "ab" * 32}
        body = {"url": f"http://{me}:9001", "worker_id": "w1"}
        got["register_forged"] = c.post(f"{url}/internal/workers", json=body, headers=forged)
        gen = {"request_id": "x", "prompt_token_ids": [1, 2, 3], "params": {"max_tokens": 1},
               "tenant": "00" * 32}  # fmt: skip
        got["generate"] = c.post(f"{w1}/generate", json=gen)
        got["generate_as_router"] = c.post(
            f"{w1}/generate", json=gen, headers={"authorization": "Bearer kvr1." + "0" * 64}
        )
        for path in ("/info", "/kv/snapshot", "/load", "/metrics", "/internal/state",
                     "/internal/faults", "/debug/transfers"):  # fmt: skip
            got[path] = c.get(f"{w1}{path}")
        got["set_faults"] = c.post(f"{w1}/internal/faults", json={"event_drop": 1.0})
        got["transfer_faults"] = c.post(f"{w1}/debug/faults", json={"drop_after": 0})
        got["abort"] = c.post(f"{w1}/abort/anything")
        got["health"] = c.get(f"{w1}/health")
        for path in ("/debug/router", "/debug/decisions", "/admin/scale", "/metrics",
                     "/admin/state"):  # fmt: skip
            got["router" + path] = c.get(f"{url}{path}")
        got["router/admin/faults"] = c.post(f"{url}/admin/faults", json={"event_drop": 1.0})
        got["debug_route"] = c.get(f"{url}/debug/route", params={"prompt": "hi"})
        got["completions"] = c.post(f"{url}/v1/completions", json={"prompt": "hi"})
        got["prefill"] = c.post(f"{w1}/prefill", json={})
    # the KV transfer port: no transfer opens without the router's ticket for it
    got["transfer"] = []
    for ticket in (transfer_auth.new_ticket(), fleet["cluster"].transfer_ticket("w2", bytes(16))):
        sock = socket.create_connection(transfer_wire.parse_endpoint(fleet["w1_transfers"]), 5)
        try:
            transfer_auth.client_handshake(sock, ticket, os.urandom(16))
            got["transfer"].append("opened")
        except transfer_auth.AuthError as e:
            got["transfer"].append(str(e))
        finally:
            sock.close()
    # the event stream: a subscriber with keys of its own, and one without CURVE
    from zmq.utils.monitor import recv_monitor_message

    host = w1.split("//")[1].split(":")[0]
    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.curve_serverkey = fleet["cluster"].curve_server("w1")[0]  # public; stolen
        sub.curve_publickey, sub.curve_secretkey = zmq.curve_keypair()
        mon = sub.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED
        )
        sub.connect(f"tcp://{host}:9002")
        plain = ctx.socket(zmq.SUB)
        plain.setsockopt(zmq.SUBSCRIBE, b"")
        plain.connect(f"tcp://{host}:9002")
        got["events_handshake"] = recv_monitor_message(mon) if mon.poll(5000) else None
        got["events_messages"] = sub.poll(1500) or plain.poll(500)
    finally:
        ctx.destroy(0)
    return got


def test_an_outsider_fails_at_every_door(fleet):
    net = fleet["net"]
    got = net.hosts["outsider"].call(_outsider_doors, fleet)
    assert got["register"].status_code == 401 and got["register_forged"].status_code == 401
    for door in ("generate", "generate_as_router", "/info", "/kv/snapshot", "/load", "/metrics",
                 "/internal/state", "/internal/faults", "set_faults", "/debug/transfers",
                 "transfer_faults", "abort", "router/debug/router", "router/admin/scale",
                 "router/metrics", "router/admin/state", "router/admin/faults",
                 "router/debug/decisions", "debug_route", "completions", "prefill"):  # fmt: skip
        assert got[door].status_code in (401, 403), (door, got[door].status_code, got[door].text)
    assert got["health"].status_code == 200 and got["health"].json() == {"status": "ok"}
    ev = got["events_handshake"]
    assert ev is not None and ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH and ev["value"] == 400
    assert not got["events_messages"]
    assert got["transfer"] == ["transfer refused: unknown transfer"] * 2
    # nothing of it reached the router's fleet
    state = net.hosts["client"].call(
        lambda: httpx.get(f"{fleet['url']}/debug/router", headers=ADMIN).json()
    )
    assert set(state["workers"]) == {"w1", "w2"}
    assert {w["url"] for w in state["workers"].values()} == {fleet["w1"], fleet["w2"]}


def _impostors(fleet: dict) -> dict:
    """A holder of w2's key claiming w1, and w1's key naming another address while w1 lives."""
    url, me = fleet["url"], fleet["net"].hosts["outsider"].addr
    w1, w2 = (fleet["cluster"].for_worker(w) for w in ("w1", "w2"))
    body = {"url": f"http://{me}:9001", "worker_id": "w1"}
    with httpx.Client(timeout=10) as c:
        as_other = c.post(f"{url}/internal/workers", json=body, headers=w2.worker_headers("w2"))
        elsewhere = c.post(f"{url}/internal/workers", json=body, headers=w1.worker_headers("w1"))
    return {"as_other": as_other, "elsewhere": elsewhere}


def test_no_one_replaces_another_workers_registration(fleet):
    got = fleet["net"].hosts["outsider"].call(_impostors, fleet)
    assert got["as_other"].status_code == 403, got["as_other"].text
    # w1's own key, but nothing at that address proves it is w1: not registered
    assert got["elsewhere"].status_code == 200 and not got["elsewhere"].json()["registered"]
    state = (
        fleet["net"]
        .hosts["client"]
        .call(lambda: httpx.get(f"{fleet['url']}/debug/router", headers=ADMIN).json())
    )
    assert state["workers"]["w1"]["url"] == fleet["w1"] and state["workers"]["w1"]["up"]


def _tenants(url: str) -> dict:
    plan = " ".join(f"item {i} is {i * 7}" for i in range(30))
    secret = "Tenant A's confidential plan: " + plan
    body = {"prompt": secret, "max_tokens": 1, "temperature": 0}
    out: dict = {}
    with httpx.Client(timeout=120) as c:
        out["a1"] = c.post(f"{url}/v1/completions", json=body, headers=ALICE)
        out["a2"] = c.post(f"{url}/v1/completions", json=body, headers=ALICE)
        for who, h in (("a", ALICE), ("b", BOB)):
            out[f"route_{who}"] = c.get(f"{url}/debug/route", params={"prompt": secret}, headers=h)
        out["b1"] = c.post(f"{url}/v1/completions", json=body, headers=BOB)
        for who, h in (("a", ALICE), ("b", BOB)):
            out[f"decisions_{who}"] = c.get(f"{url}/debug/decisions", headers=h)
        for path in ("/debug/router", "/metrics", "/admin/scale"):
            out["b" + path] = c.get(f"{url}{path}", headers=BOB)
        out["admin_decisions"] = c.get(f"{url}/debug/decisions", headers=ADMIN)
    return out


def test_tenant_b_learns_nothing_of_tenant_a_on_the_same_worker(fleet):
    got = fleet["net"].hosts["client"].call(_tenants, fleet["url2"])
    a1, a2, b1 = got["a1"], got["a2"], got["b1"]
    assert a1.status_code == a2.status_code == b1.status_code == 200
    # one worker: all three ran on w1
    assert {r.headers["x-kvgrid-worker"] for r in (a1, a2, b1)} == {"w1"}
    n = a1.json()["usage"]["prompt_tokens"]
    assert n > 192
    # A's own hits, predicted and real...
    cached_a = a2.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached_a >= n - 64 and int(a2.headers["x-kvgrid-predicted-cached-tokens"]) == cached_a
    assert got["route_a"].json()["candidates"][0]["matched_blocks"] >= cached_a // 64
    # ...and nothing of them for B, in any answer it can get
    assert b1.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert b1.headers["x-kvgrid-predicted-cached-tokens"] == "0"
    route_b = got["route_b"].json()
    assert route_b["predicted_cached_tokens"] == 0
    assert all(c["matched_blocks"] == 0 for c in route_b["candidates"])
    mine_a = {d["request_id"] for d in got["decisions_a"].json()}
    mine_b = {d["request_id"] for d in got["decisions_b"].json()}
    assert mine_b == {b1.headers["x-request-id"]}
    assert {a1.headers["x-request-id"], a2.headers["x-request-id"]} <= mine_a
    assert not mine_a & mine_b
    for path in ("/debug/router", "/metrics", "/admin/scale"):
        assert got["b" + path].status_code in (401, 403), path
    all_ids = {d["request_id"] for d in got["admin_decisions"].json()}
    assert mine_a | mine_b <= all_ids  # the operator sees everyone's


def _transfer_across_hosts(fleet: dict) -> dict:
    """What the router does for a remote prefill, by hand: w2 expects the transfer (it
    derives the ticket from its own key), w1 computes the prompt and sends it with the
    ticket the cluster key grants; then w2 computes the same prompt itself under another
    tenant scope (none of the moved KV can serve it)."""
    cluster = fleet["cluster"]
    prompt = [(i * 31) % 5000 + 10 for i in range(3 * 64 + 9)]
    tid = os.urandom(16)
    out: dict = {}

    def gen(tenant: str, remote: dict | None):
        body = {"request_id": f"x-{tenant}-{time.monotonic_ns()}", "prompt_token_ids": prompt,
                "params": {"max_tokens": 4, "temperature": 0.0}, "tenant": tenant,
                "remote_prefill": remote}  # fmt: skip
        return httpx.stream(
            "POST", f"{fleet['w2']}/generate", json=body, headers=cluster.router_headers("w2"),
            timeout=120,
        )  # fmt: skip

    spec = {"transfer_id": tid.hex(), "start_block": 0, "num_blocks": 3, "deadline_s": 60,
            "stall_s": 30}  # fmt: skip
    prefill = {"request_id": "x", "prompt_token_ids": prompt, "tenant": "11" * 32,
               "transfer": {"transfer_id": tid.hex(), "endpoint": fleet["w2_transfers"],
                            "ticket": cluster.transfer_ticket("w2", tid).hex(),
                            "start_block": 0, "num_blocks": 3}}  # fmt: skip
    with gen("11" * 32, spec) as decode:  # answered: w2 expects the transfer
        assert decode.status_code == 200
        out["sent"] = httpx.post(
            f"{fleet['w1']}/prefill",
            json=prefill,
            headers=cluster.router_headers("w1"),
            timeout=120,
        ).json()
        out["remote"] = [json.loads(x) for x in decode.iter_lines() if x]
    with gen("22" * 32, None) as local:
        out["local"] = [json.loads(x) for x in local.iter_lines() if x]
    return out


def test_kv_moves_between_hosts_on_the_routers_ticket(fleet):
    got = fleet["net"].hosts["router"].call(_transfer_across_hosts, fleet)
    assert fleet["w2_transfers"].startswith(fleet["w2"].split("//")[1].split(":")[0] + ":")
    assert got["sent"]["outcome"] == "complete" and got["sent"]["blocks_sent"] == 3, got["sent"]
    last = got["remote"][-1]
    assert last["transfer"]["outcome"] == "complete" and last["cached_tokens"] == 3 * 64, last
    ids = [[t for m in got[k] for t in m.get("ids", ())] for k in ("remote", "local")]
    assert ids[0] == ids[1] and len(ids[0]) == 4
    assert got["local"][-1]["cached_tokens"] == 0


def test_no_worker_was_ever_marked_down(fleet):
    """Last: the whole run, from the workers' start, without a single missed heartbeat."""
    client = fleet["net"].hosts["client"]
    # KVGRID_TEST_FLEET_RUN_S=60 holds the fleet up a minute at least before this check;
    # the suite checks the module's own run (heartbeats time out after 3 s here, not 10)
    run_s = float(os.environ.get("KVGRID_TEST_FLEET_RUN_S", "0"))
    time.sleep(max(0.0, run_s - (time.monotonic() - fleet["ready_at"])))
    text = client.call(lambda: httpx.get(f"{fleet['url']}/metrics", headers=ADMIN).text)
    ran = time.monotonic() - fleet["ready_at"]
    assert ran >= run_s
    assert _metric(text, "kvgrid:router_workers_lost_total") == 0, ran
    assert _metric(text, "kvgrid:router_workers_up") == 2
    # that many heartbeat timeouts passed without one being missed
    print(f"no worker marked down in {ran:.0f}s ({ran / HEARTBEAT_TIMEOUT_S:.0f} timeouts)")
    for log in ("router.log", "router2.log"):
        assert "marked down" not in (fleet["dir"] / log).read_text(), log
