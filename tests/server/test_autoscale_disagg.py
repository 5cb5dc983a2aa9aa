"""`kvgrid serve --autoscale` with role pools: the planner sizes the prefill and the decode pool
apart, live, with real processes (a tiny random Llama with the default model's tokenizer).

The TTFT target is one no prefill pool on this CPU meets under load, the ITL target one any
decode pool does: with load the plan is the most prefill workers allowed and one decode
worker; idle, the fewest. The added prefill worker must then take remote prefills, and the
scale-down must drain it without one request failing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading

import httpx
import pytest

from kvgrid.planner.planner import ObservedMetrics, Planner, PlannerConfig, PoolState, ReplicaView
from kvgrid.server.cli import register
from kvgrid.server.serve import pool_bounds
from tests.support.live_scale import free_port, scale_state, wait_for
from tests.support.live_server import stop as stop_server

PROMPT = " ".join(f"word{i}" for i in range(150))  # a few hundred tokens: worth moving


def _router(url: str) -> dict:
    return httpx.get(f"{url}/debug/router", timeout=5).json()["workers"]


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with these labels in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_planner_sizes_prefill_and_decode_pools_live(tiny_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, KVGRID_LOG="INFO")
    env.pop("KVGRID_API_KEYS", None)
    cmd = [sys.executable, "-m", "kvgrid.cli", "serve", "--autoscale",
           "--prefill-workers", "1", "--decode-workers", "1", "--max-prefill-workers", "2",
           "--disagg", "always", "--autoscale-interval", "1", "--ttft-target", "0.001",
           "--itl-target", "10", "--scale-down-cooldown", "1", "--scale-down-ticks", "2",
           "--worker-startup-s", "1", "--port", str(port), "--model", str(tiny_model_dir("llama")),
           "--max-model-len", "1024", "--kv-cache-memory-gb", "0.1", "--kv-store-host-gb", "0.1",
           "--kv-store-disk-gb", "0", "--threads", "1"]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    stop = threading.Event()
    done: list[tuple[int, int]] = []  # status, completion tokens

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"prompt": f"{i} {n} {PROMPT}", "max_tokens": 4, "ignore_eos": True}
                try:
                    r = c.post(f"{url}/v1/completions", json=body)
                    toks = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
                    done.append((r.status_code, toks))
                except httpx.HTTPError:
                    done.append((-1, 0))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    try:
        wait_for(
            lambda: all(w["up"] for w in scale_state(url)["workers"].values()), 90, "p0, d0 up", url
        )
        state = scale_state(url)
        assert {w: s["role"] for w, s in state["workers"].items()} == {
            "p0": "prefill",
            "d0": "decode",
        }
        assert state["pools"]["prefill"] == {"role": "prefill", "serving": 1, "min": 1, "max": 2}
        # the decode worker measures itself (a calibration request of the planner's own)
        wait_for(lambda: scale_state(url)["calibration"], 60, "a measured calibration", url)
        assert not scale_state(url)["actions"]  # idle: nothing to add
        for t in threads:
            t.start()
        adds = wait_for(
            lambda: [a for a in scale_state(url)["actions"] if a["kind"] == "add"], 60, "add", url
        )
        (add,) = adds
        assert add["by"] == "planner" and add["pool"] == "prefill" and add["role"] == "prefill"
        assert "TTFT p95" in add["reason"] and "target" in add["reason"], add
        # the new prefill worker joins and takes remote prefills
        wait_for(lambda: scale_state(url)["workers"]["p1"]["up"], 60, "p1 up", url)
        assert _router(url)["p1"]["role"] == "prefill"
        wait_for(lambda: _router(url)["p1"]["load"]["prompt_tokens"] > 0, 30, "p1 prefills", url)
        state = scale_state(url)
        assert {w for w, s in state["workers"].items() if s["role"] == "decode"} == {"d0"}
        stop.set()
        for t in threads:
            t.join(60)
        # idle: back to the fewest prefill workers, by a drain
        wait_for(
            lambda: (
                scale_state(url)["retired"] and scale_state(url)["pools"]["prefill"]["serving"] == 1
            ),
            40,
            "scale-down to one prefill worker",
            url,
        )
        state = scale_state(url)
        drains = [a for a in state["actions"] if a["kind"] == "drain"]
        assert drains and all(a["pool"] == "prefill" for a in drains), drains
        assert "keep 1" in drains[0]["reason"]
        assert len([r for r in state["retired"] if r["role"] == "prefill"]) == 1
        assert state["pools"]["decode"]["serving"] == 1
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert _metric(metrics, "kvgrid:autoscale_actions_total", role="prefill", action="add") == 1
        assert _metric(metrics, "kvgrid:autoscale_actions_total", role="prefill", action="drain")
        assert not _metric(metrics, "kvgrid:autoscale_actions_total", role="decode")
        assert _metric(metrics, "kvgrid:autoscale_workers", role="prefill") == 1
        assert "remote:forced" in httpx.get(f"{url}/debug/router", timeout=5).text
    finally:
        stop.set()
        stop_server(proc, log, tail=5000)
    assert done and all(s == 200 and n == 4 for s, n in done), done


def _pools(n_p: int, n_d: int) -> dict[str, PoolState]:
    return {
        "prefill": PoolState("prefill", [ReplicaView(f"p{i}") for i in range(n_p)]),
        "decode": PoolState("decode", [ReplicaView(f"d{i}") for i in range(n_d)]),
    }


def _obs(rate: float, itl: float = 0.02, ttft: float = 0.5) -> ObservedMetrics:
    return ObservedMetrics(10.0, rate, 2048, 512, [ttft] * 30, [itl] * 30)


def test_each_pool_has_its_bounds_and_the_decode_pool_answers_to_the_itl():
    cfg = PlannerConfig(
        disagg=True, cooldown_s=0, down_ticks=1, pool_min={"prefill": 0}, pool_max={"prefill": 2}
    )
    p = Planner(cfg)
    need = p.required(40.0, 2048, 512)
    assert need["prefill"] > 2 and need["decode"] > 1  # what the load would take
    adds = {a.pool: a.count for a in p.decide(0, _obs(40.0), _pools(1, 1))}
    assert adds == {"prefill": 1, "decode": need["decode"] - 1}  # prefill: up to its most
    # inter-token latencies past the target make the decode pool plan for more load; the
    # prefill pool, sized on the TTFT, does not move
    q = Planner(PlannerConfig(disagg=True, cooldown_s=0, startup_s=0, interval_s=10))
    base = q.required(10.0, 2048, 512)
    for t in range(1, 6):
        q.decide(1000.0 * t, _obs(10.0, itl=0.5), _pools(base["prefill"], base["decode"]))
    assert q.itl_boost > 1.5
    boosted = q.required(10.0, 2048, 512)
    assert boosted["decode"] > base["decode"] and boosted["prefill"] == base["prefill"]
    # idle: the smoothed rate reaches zero, and each pool comes down to its fewest
    n = {"prefill": 2, "decode": 3}
    for t in range(30):
        for a in p.decide(10.0 * (t + 1), _obs(0.0), _pools(n["prefill"], n["decode"])):
            n[a.pool] -= a.count if a.kind == "drain" else -a.count
    assert p.rate == 0.0 and p.required(0.0, 2048, 512) == {"prefill": 0, "decode": 1}
    assert n == {"prefill": 0, "decode": 1}  # decode workers prefill themselves


def test_role_pool_bounds_are_checked(tiny_model_dir):
    """Bounds that contradict the pools, or autoscaling a mix of pools, are refused."""
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    for extra, msg in (
        (["--prefill-workers", "2", "--decode-workers", "1", "--max-prefill-workers", "1"],
         "must lie within"),
        (["--workers", "1", "--prefill-workers", "1", "--autoscale"], "not both at once"),
        (["--workers", "1", "--max-decode-workers", "2"], "needs role pools"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            pool_bounds(ap.parse_args(["serve", *extra]))
    args = ["serve", "--prefill-workers", "1", "--decode-workers", "2", "--max-prefill-workers",
            "3", "--min-decode-workers", "0", "--autoscale"]  # fmt: skip
    # a pool that decodes keeps one worker; prefill workers may all go
    assert pool_bounds(ap.parse_args(args)) == {"prefill": (1, 3), "decode": (1, 2)}
    cmd = [sys.executable, "-m", "kvgrid.cli", "serve", "--port", str(free_port()), "--model",
           str(tiny_model_dir("llama")), "--workers", "1", "--prefill-workers", "1",
           "--autoscale"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not both at once" in r.stderr, r.stderr
