"""Replay metrics: exact math on hand-made results, and end to end against a small local
OpenAI-style SSE server (a real HTTP server) that emits tokens at known times."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from kvgrid.bench.replay import SLO, Replayer, RequestResult, compute_metrics, plot, report
from kvgrid.bench.workloads import no_reuse, shared_system_prompt

TTFT_S, ITL_S = 0.06, 0.01


def test_metric_math_exact():
    a = RequestResult(
        "a",
        0.0,
        sent_s=0.0,
        ttft_s=0.1,
        e2el_s=0.5,
        output_tokens=5,
        prompt_tokens=100,
        cached_tokens=50,
        success=True,
    )
    a.chunk_times_s = [0.1, 0.2, 0.3, 0.4, 0.5]
    b = RequestResult(
        "b",
        1.0,
        sent_s=1.0,
        ttft_s=0.3,
        e2el_s=0.3,
        output_tokens=1,
        prompt_tokens=100,
        cached_tokens=0,
        success=True,
    )
    b.chunk_times_s = [1.3]
    c = RequestResult("c", 1.0, sent_s=1.0, error="HTTP 500: boom")
    m = compute_metrics([a, b, c], duration_s=2.0, slo=SLO(ttft_s=0.2, tpot_s=0.2))
    assert m["completed"] == 2 and m["failed"] == 1
    assert a.tpot_s == pytest.approx(0.1)  # (0.5 - 0.1) / (5 - 1)
    assert b.tpot_s is None  # one token: no TPOT (vLLM skips it)
    assert m["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert m["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert m["itl_ms"]["mean"] == pytest.approx(100.0)
    assert m["e2el_ms"]["max"] == pytest.approx(500.0)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["request_goodput"] == pytest.approx(0.5)  # only a meets TTFT <= 200 ms
    assert m["measured_hit_rate"] == pytest.approx(0.25)
    assert m["errors"] == ["HTTP 500: boom"]


def _app(log: list) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()
        log.append(body)
        prompt = body["prompt"]
        n = int(body["max_tokens"])

        async def gen():
            await asyncio.sleep(TTFT_S)
            for i in range(n):
                if i:
                    await asyncio.sleep(ITL_S)
                chunk = {"choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {
                "prompt_tokens": len(prompt),
                "completion_tokens": n,
                "prompt_tokens_details": {"cached_tokens": len(prompt) // 2},
            }
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def sse_server():
    log: list = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(_app(log), host="127.0.0.1", port=port, log_level="warning")
    )
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}", log
    server.should_exit = True
    th.join(5)


def test_replay_open_loop_against_sse_server(sse_server, tmp_path):
    url, log = sse_server
    w = no_reuse(num_requests=12, input_tokens=64, output_tokens=8, spread=0, rate=40.0, seed=0)
    results, dur = asyncio.run(Replayer(url).run(w, speed=1.0, progress=False))
    assert len(results) == 12 and all(r.success for r in results)
    sent = log[-12:]
    assert all(isinstance(b["prompt"], list) and b["stream"] for b in sent)
    assert sorted(b["prompt"] for b in sent) == sorted(w.prompt_tokens(r) for r in w.requests)
    # open loop: sends follow the workload's times
    t0 = w.requests[0].arrival_s
    for r, q in zip(
        sorted(results, key=lambda r: r.request_id), sorted(w.requests, key=lambda q: q.request_id)
    ):
        assert r.sent_s == pytest.approx(q.arrival_s - t0, abs=0.05)
    rep = report(w, results, dur, SLO(ttft_s=0.5, tpot_s=0.05), 64, {"open_loop": True})
    m = rep["metrics"]
    assert m["ttft_ms"]["p50"] == pytest.approx(TTFT_S * 1e3, abs=30)
    assert m["tpot_ms"]["p50"] == pytest.approx(ITL_S * 1e3, abs=6)
    assert m["itl_ms"]["p50"] == pytest.approx(ITL_S * 1e3, abs=6)
    assert m["total_output_tokens"] == 12 * 8
    assert m["measured_hit_rate"] == pytest.approx(0.5)
    assert m["goodput_fraction"] == 1.0
    assert rep["theoretical_hit_rate"]["token_weighted"] == 0.0
    paths = plot(results, tmp_path / "r", "test")
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)


def test_replay_closed_loop_respects_concurrency(sse_server):
    url, _ = sse_server
    w = shared_system_prompt(
        num_requests=8, system_tokens=128, user_tokens=32, output_tokens=4, rate=1000.0, seed=0
    )
    for r in w.requests:
        r.max_tokens = 4
    results, dur = asyncio.run(Replayer(url).run(w, concurrency=2, progress=False))
    assert all(r.success for r in results)
    # 8 requests, 2 at a time, each ~TTFT + 3 ITL long: about 4 rounds, never all at once
    one = TTFT_S + 3 * ITL_S
    assert dur >= 3.5 * one
    spans = sorted((r.sent_s, r.sent_s + r.e2el_s) for r in results)
    for t, _ in spans:
        assert sum(1 for s, e in spans if s <= t + 1e-4 < e) <= 2


def test_replay_command_with_the_shipped_mooncake_trace(sse_server, tmp_path, capsys):
    """`kvgrid bench replay` as the README runs it on a CPU: a slice of the bundled trace,
    prompts scaled and capped; JSON and plots written."""
    from kvgrid.cli import main

    url, log = sse_server
    out = tmp_path / "replay.json"
    spec = "mooncake:conversation,tokens_per_block=64,max_input_tokens=512,max_output_tokens=4"
    argv = ["bench", "replay", "--url", url, "--limit", "6", "--workload", spec]
    assert main([*argv, "--concurrency", "3", "--out", str(out), "--no-progress"]) == 0
    rep = json.loads(out.read_text())
    assert rep["metrics"]["completed"] == 6 and rep["workload"]["requests"] == 6
    sent = log[-6:]
    assert all(len(b["prompt"]) <= 512 and b["max_tokens"] <= 4 for b in sent)
    assert (tmp_path / "replay_cdf.png").exists()
    assert "completed 6" in capsys.readouterr().out
    assert main(["bench", "replay", "--url", url, "--workload", "mooncake:nope"]) == 2
    assert "unknown Mooncake trace 'nope'" in capsys.readouterr().err
