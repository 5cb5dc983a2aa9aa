"""`kvgrid serve` scales its worker processes under load: 1 -> 2 -> 1 with real processes,
the default model and clients that never stop sending, and not one request fails.

The resize goes through the planner's actuator (kvgrid.server.autoscale.LiveActuator), the
same path the planner's own decisions take; the planner loop itself is exercised against
the simulated fleet in tests/planner/test_planner.py.
"""

import os
import socket
import subprocess
import sys
import threading
import time

import httpx

from tests.support.live_scale import free_port, inflight, scale_state, wait_for
from tests.support.live_server import stop as stop_server

CLIENTS = 4


def _max_tokens(client: int) -> int:
    # unequal lengths, so that the clients do not move in lock-step waves (equal requests
    # finish in one step and are resent together): the drain below needs both workers busy
    # at once. The router spreads waves as well (tests/router/test_policies.py), but this test is
    # about scaling, not about that.
    return 12 + 5 * client


def test_scale_1_to_2_to_1_under_load_without_failures(default_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, KVGRID_LOG="INFO")
    env.pop("KVGRID_API_KEYS", None)
    cmd = [sys.executable, "-m", "kvgrid.cli", "serve", "--workers", "1", "--max-workers", "2",
           "--port", str(port), "--model", str(default_model_dir), "--max-model-len", "512",
           "--kv-cache-memory-gb", "0.2", "--threads", "1"]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    # start, end, status, worker, tokens, tokens asked for
    done: list[tuple[float, float, int, str, int, int]] = []
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            n = 0
            while not stop.is_set():
                n += 1
                body = {
                    "prompt": f"Client {i} request {n}: tell a story about the number {n}.",
                    "max_tokens": _max_tokens(i),
                    "ignore_eos": True,
                }
                t0 = time.monotonic()
                try:
                    r = c.post(f"{url}/v1/completions", json=body)
                    toks = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
                    done.append((t0, time.monotonic(), r.status_code, r.headers.get(
                        "x-kvgrid-worker", ""), toks, _max_tokens(i)))  # fmt: skip
                except httpx.HTTPError as e:
                    done.append((t0, time.monotonic(), -1, repr(e), 0, _max_tokens(i)))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    try:
        wait_for(lambda: scale_state(url)["workers"]["w0"]["up"], 90, "w0 up", url)
        for t in threads:
            t.start()
        wait_for(lambda: len(done) >= CLIENTS, 30, "first requests", url)

        r = httpx.post(f"{url}/admin/scale", json={"workers": 2}, timeout=10).json()
        assert [a["kind"] for a in r["done"]] == ["add"], r
        wait_for(lambda: scale_state(url)["workers"]["w1"]["up"], 60, "w1 up", url)
        wait_for(lambda: sum(d[3] == "w1" for d in done) >= 3, 30, "w1 serving", url)

        # both workers busy, so that whichever is drained has requests to finish
        wait_for(lambda: all(inflight(url).values()), 30, "both busy", url)
        t_drain = time.monotonic()
        r = httpx.post(f"{url}/admin/scale", json={"workers": 1}, timeout=10).json()
        t_drain_ack = time.monotonic()
        (act,) = r["done"]
        victim = act["worker_id"]
        assert act["kind"] == "drain" and victim in ("w0", "w1"), r
        retired = wait_for(
            lambda: [x for x in scale_state(url)["retired"] if x["worker_id"] == victim],
            60,
            "drain finished",
            url,
        )[0]
        # the survivor keeps serving after the drained process is gone
        n_after = len(done)
        wait_for(lambda: len(done) >= n_after + CLIENTS, 30, "requests after the drain", url)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        stop_server(proc, log)

    failed = [d for d in done if d[2] != 200 or d[4] != d[5]]
    assert not failed, failed
    assert sum(d[3] == "w1" for d in done) >= 3  # the added worker really served
    # the drained worker had work in flight when the drain began, and finished all of it
    in_flight = [d for d in done if d[3] == victim and d[0] < t_drain_ack and d[1] > t_drain]
    assert retired["inflight_at_drain"] >= 1 and in_flight, (retired, in_flight)
    assert retired["stopped_at"] >= max(d[1] for d in in_flight) - 0.5
    # nothing new was sent there once the drain was acknowledged
    assert not [d for d in done if d[3] == victim and d[0] > t_drain_ack], victim
    survivor = "w1" if victim == "w0" else "w0"
    assert {d[3] for d in done if d[0] > t_drain_ack} == {survivor}
    with socket.socket() as s:  # the drained process is gone: its port refuses connections
        s.settimeout(2)
        port_v = int(retired["url"].rsplit(":", 1)[1])
        assert s.connect_ex(("127.0.0.1", port_v)) != 0


def test_the_planner_scales_on_load_from_speeds_it_measures(default_model_dir, tmp_path):
    """`kvgrid serve --autoscale` without a calibration file: the planner models the workers
    from the speeds their load reports carry (never another machine's), has an idle worker
    measure itself, adds nothing while idle, and adds a worker when load comes."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, KVGRID_LOG="INFO")
    env.pop("KVGRID_API_KEYS", None)
    # targets this CPU cannot meet with one worker under load: the plan must be to add one
    cmd = [sys.executable, "-m", "kvgrid.cli", "serve", "--autoscale", "--min-workers", "1",
           "--max-workers", "2", "--autoscale-interval", "1", "--ttft-target", "0.05",
           "--itl-target", "0.002", "--scale-down-cooldown", "600", "--port", str(port),
           "--model", str(default_model_dir), "--max-model-len", "512",
           "--kv-cache-memory-gb", "0.2", "--threads", "1"]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    stop = threading.Event()
    served: list[str] = []

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                body = {"prompt": f"Client {i}: tell a story.", "max_tokens": 8, "ignore_eos": True}
                try:
                    r = c.post(f"{url}/v1/completions", json=body)
                    served.append(r.headers.get("x-kvgrid-worker", str(r.status_code)))
                except httpx.HTTPError:
                    served.append("error")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    try:
        wait_for(lambda: scale_state(url)["workers"]["w0"]["up"], 90, "w0 up", url)
        # idle, the planner has the worker measure itself (a calibration request of its own)
        wait_for(lambda: scale_state(url)["calibration"], 60, "a measured calibration", url)
        time.sleep(2.5)  # intervals without load: nothing to add
        assert not scale_state(url)["actions"]
        for t in threads:
            t.start()
        adds = wait_for(
            lambda: [a for a in scale_state(url)["actions"] if a["by"] == "planner"],
            60,
            "a plan",
            url,
        )
        assert adds[0]["kind"] == "add", adds
        state = scale_state(url)
        cal = state["calibration"]
        assert cal["meta"]["measured"] and cal["meta"]["source"] == "router load reports"
        w0 = httpx.get(f"{url}/debug/router", timeout=5).json()["workers"]["w0"]["load"]
        # the planner's speeds are this machine's, as the router measured them (an EWMA
        # that moves a little between the plan and now)
        measured = 1 / cal["prefill"]["per_token_s"]
        assert 0.5 < measured / w0["prefill_tokens_per_s"] < 2.0, (cal, w0)
        wait_for(lambda: scale_state(url)["workers"]["w1"]["up"], 90, "w1 up", url)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        stop_server(proc, log)
    assert "error" not in served and all(s in ("w0", "w1") for s in served), set(served)
