"""`kvgrid router` and `kvgrid worker` as separate processes: a worker announces itself."""

import os
import socket
import subprocess
import sys
import time

import httpx

from tests.support.live_server import stop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_registers_itself_with_a_router(default_model_dir, tmp_path):
    rport, wport = _free_port(), _free_port()
    url = f"http://127.0.0.1:{rport}"
    env = dict(os.environ, KVGRID_LOG="WARNING")
    env.pop("KVGRID_API_KEYS", None)
    log = (tmp_path / "procs.log").open("w")
    router = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvgrid.cli",
            "router",
            "--port",
            str(rport),
            "--model",
            str(default_model_dir),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    worker = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{url}/health")
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        # no worker yet: not healthy, and requests fail with a clear 503
        assert r.status_code == 503
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 503 and "no worker" in r.json()["error"]["message"]
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvgrid.cli",
                "worker",
                "--port",
                str(wport),
                "--worker-id",
                "solo",
                "--router",
                url,
                "--model",
                str(default_model_dir),
                "--max-model-len",
                "512",
                "--kv-cache-memory-gb",
                "0.1",
                "--threads",
                "1",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        state = {}
        while time.monotonic() < deadline:
            state = httpx.get(f"{url}/debug/router").json()
            w = state["workers"].get("solo")
            if w and w["up"] and w["freshness"] == "exact":
                break
            time.sleep(0.3)
        assert state["workers"]["solo"]["url"] == f"http://127.0.0.1:{wport}", state
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.headers["x-kvgrid-worker"] == "solo"
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        if worker is not None:
            stop(worker, wait_s=15)
        stop(router, wait_s=15)
        log.close()
