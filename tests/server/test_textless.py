"""A model without a tokenizer (random weights of a named shape) served end to end: its stream
carries token ids, so the replay (and any client) sees every token and its timing."""

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx

from kvgrid.bench.replay import Replayer, report
from kvgrid.bench.workloads import no_reuse
from tests.support.live_server import stop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_replay_counts_the_tokens_of_a_model_without_a_tokenizer(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "kvgrid.cli", "serve", "--port", str(port),
           "--model", "smollm2-135m", "--load-format", "dummy", "--max-model-len", "512",
           "--kv-cache-memory-gb", "0.2", "--threads", "1", "--no-kv-store"]  # fmt: skip
    env = dict(os.environ, KVGRID_LOG="WARNING")
    with open(tmp_path / "serve.log", "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        w = no_reuse(num_requests=3, input_tokens=64, output_tokens=8, seed=1)
        results, duration = asyncio.run(Replayer(url).run(w, concurrency=3))
        m = report(w, results, duration, None, 64, {})["metrics"]
        assert m["completed"] == 3, [r.error for r in results]
        assert m["total_output_tokens"] == 3 * 8
        assert all(r.ttft_s is not None and r.chunk_times_s for r in results)
    finally:
        stop(proc)
