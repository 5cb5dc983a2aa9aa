"""Workers whose store cannot be used still serve: one with its store directory on a full
disk, one with a garbage master key. Neither may crash at start (under `kvgrid serve`'s
supervisor that would repeat forever, and the server would never be healthy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx

from kvgrid.chaos import disk
from kvgrid.server.serve import free_port

# the workers run without a control key: loopback only, and no credential to present
HDR: dict[str, str] = {}


def start_worker(model: str, store: str, env: dict, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "kvgrid.cli", "worker", "--port", str(port), "--threads", "1",
            "--model", model, "--max-model-len", "512", "--kv-cache-memory-gb", "0.002",
            "--kv-store-dir", store, "--kv-store-host-gb", "0.001"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"worker exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("worker never became healthy")


def generate(url: str) -> list[int]:
    body = {"request_id": "r1", "prompt_token_ids": list(range(100, 300)),
            "params": {"max_tokens": 4, "temperature": 0}}  # fmt: skip
    r = httpx.post(f"{url}/generate", json=body, headers=HDR, timeout=60)
    assert r.status_code == 200
    ids = []
    for line in r.text.splitlines():
        ids += json.loads(line).get("ids", [])
    return ids


def test_full_disk_and_garbage_key_turn_tiers_off_and_workers_serve(
    tiny_model_dir, tmp_path, tmpfs
):
    model = str(tiny_model_dir("llama"))
    full = tmpfs(256 * 1024)
    disk.fill(full)
    keydir = tmp_path / "keys"
    keydir.mkdir()
    (keydir / "master.key").write_text("not a key at all\n")
    os.chmod(keydir / "master.key", 0o600)
    base = dict(os.environ, KVGRID_LOG="WARNING")
    for var in ("KVGRID_CONTROL_KEY", "KVGRID_CONTROL_KEY_FILE"):
        base.pop(var, None)
    base.pop("KVGRID_MASTER_KEY", None)
    good_key = dict(base, KVGRID_MASTER_KEY="1:" + "ab" * 32)
    bad_key = dict(base, KVGRID_STORE_DIR=str(keydir))
    procs = []
    with open(tmp_path / "workers.log", "w") as log:
        try:
            a = start_worker(model, str(full / "g3"), good_key, log)
            b = start_worker(model, str(tmp_path / "g3"), bad_key, log)
            procs = [a[0], b[0]]
            for proc, url in (a, b):
                wait_healthy(proc, url)
            assert generate(a[1]) == generate(b[1])  # both serve (and agree)
            for url, reason in ((a[1], "disk_full"), (b[1], "bad_key")):
                st = httpx.get(f"{url}/internal/state", headers=HDR, timeout=10).json()
                assert st["store"]["tiers"]["G3"] == {"up": False, "fault": reason}
                text = httpx.get(f"{url}/metrics", headers=HDR, timeout=10).text
                assert f'kvgrid_store_tier_faults_total{{reason="{reason}",tier="G3"}} 1.0' in text
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    logs = (tmp_path / "workers.log").read_text()
    assert "G3 (disk) off: disk_full" in logs and "master key cannot be used" in logs
