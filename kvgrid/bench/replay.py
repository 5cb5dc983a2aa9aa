"""Replay a workload against any OpenAI-compatible server and measure it.

Open loop (requests sent at the workload's arrival times, divided by ``speed``) or closed
loop (``concurrency`` requests in flight, each sent as soon as a slot frees). Requests go to
``/v1/completions`` with streaming on and ``stream_options.include_usage``, the prompt as a
list of token ids (the OpenAI completions API accepts one) or as text.

Metric names and definitions follow `vllm bench serve` and AIPerf:
- TTFT: send to the first chunk that carries output.
- E2EL (AIPerf "request latency"): send to the last chunk.
- TPOT (AIPerf "inter token latency"): (E2EL - TTFT) / (output tokens - 1), per request with
  more than one output token.
- ITL / inter-chunk latency: every gap between consecutive output chunks.
- Request / output-token / total-token throughput: counts over the benchmark's duration
  (first send to last completion).
- Goodput: requests per second over the same duration that met every given limit
  (TTFT, TPOT, E2EL); a request with one output token has no TPOT and meets that limit.
Cached tokens come from ``usage.prompt_tokens_details.cached_tokens``; the measured hit rate
(cached / prompt tokens) is reported next to the workload's theoretical one.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from kvgrid import envs
from kvgrid.bench.workload import Request, Workload
from kvgrid.bench.workloads import SPEC_HELP, load_workload
from kvgrid.stats import Summary

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    request_id: str
    scheduled_s: float  # when the workload wanted it sent (relative to the benchmark start)
    sent_s: float = 0.0
    ttft_s: float | None = None
    e2el_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)  # arrivals of output chunks
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    success: bool = False
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2el_s is None or self.output_tokens <= 1:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def inter_chunk_s(self) -> list[float]:
        t = self.chunk_times_s
        return [b - a for a, b in itertools.pairwise(t)]


@dataclass
class SLO:
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2el_s: float | None = None

    def met(self, r: RequestResult) -> bool:
        if not r.success:
            return False
        if self.ttft_s is not None and (r.ttft_s is None or r.ttft_s > self.ttft_s):
            return False
        tpot = r.tpot_s
        if self.tpot_s is not None and tpot is not None and tpot > self.tpot_s:
            return False
        return not (self.e2el_s is not None and (r.e2el_s is None or r.e2el_s > self.e2el_s))


def summarize(xs: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """mean/std/p50/p90/p99/max, in ms by default (vLLM's ``*_ms`` fields)."""
    return Summary.of(np.asarray(xs, dtype=float) * scale, PERCENTILES).as_dict()


def span_s(results: list[RequestResult], open_end: float) -> float:
    """Seconds from the first send to the last completion (``open_end``, on the same clock,
    when no request completed)."""
    ends = [r.sent_s + r.e2el_s for r in results if r.e2el_s is not None]
    return (max(ends) if ends else open_end) - min(r.sent_s for r in results)


def compute_metrics(
    results: list[RequestResult], duration_s: float, slo: SLO | None = None
) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)
    dur = max(duration_s, 1e-9)
    slo = slo or SLO()
    good = sum(1 for r in ok if slo.met(r))
    itl = [g for r in ok for g in r.inter_chunk_s]
    with_cache = [r for r in ok if r.cached_tokens is not None]
    cached = sum(r.cached_tokens or 0 for r in with_cache)
    cached_prompt = sum(r.prompt_tokens for r in with_cache)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "request_throughput": len(ok) / dur,
        "output_throughput": out_tok / dur,
        "total_token_throughput": (in_tok + out_tok) / dur,
        "request_goodput": good / dur,
        "goodput_fraction": good / len(results) if results else 0.0,
        "slo": asdict(slo),
        "ttft_ms": summarize([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": summarize([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": summarize(itl),
        "e2el_ms": summarize([r.e2el_s for r in ok if r.e2el_s is not None]),
        "cached_tokens": cached,
        "measured_hit_rate": cached / cached_prompt if cached_prompt else None,
        "requests_reporting_cache": len(with_cache),
        "errors": sorted({r.error for r in results if r.error})[:10],
    }


class Replayer:
    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        use_text: bool = False,
        ignore_eos: bool = True,
        max_connections: int = 1024,
    ) -> None:
        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout_s, connect=30.0)
        self.use_text = use_text
        self.ignore_eos = ignore_eos
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=64)

    async def _resolve_model(self, client: httpx.AsyncClient) -> str:
        if self.model:
            return self.model
        r = await client.get(f"{self.base}/models", headers=self.headers)
        r.raise_for_status()
        data = r.json().get("data") or []
        if not data:
            raise RuntimeError(f"{self.base}/models lists no model; pass --model")
        return data[0]["id"]

    def _body(self, w: Workload, req: Request, model: str) -> dict[str, Any]:
        if req.prompt_text is not None:
            prompt: Any = req.prompt_text
        elif self.use_text:
            raise ValueError("--text needs a workload with prompt_text")
        else:
            prompt = w.prompt_tokens(req)
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": req.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.0,
        }
        if self.ignore_eos:  # vLLM's extension: produce exactly max_tokens, as traces say
            body["ignore_eos"] = True
        return body

    async def _one(
        self,
        client: httpx.AsyncClient,
        w: Workload,
        req: Request,
        model: str,
        t0: float,
        scheduled: float,
    ) -> RequestResult:
        res = RequestResult(req.request_id, scheduled)
        body = self._body(w, req, model)
        res.prompt_tokens = req.input_length or len(body["prompt"])
        start = time.perf_counter()
        res.sent_s = start - t0
        n_chunks = 0
        usage = None
        try:
            async with client.stream(
                "POST", f"{self.base}/completions", json=body, headers=self.headers
            ) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:300]
                    res.error = f"HTTP {resp.status_code}: {text}"
                    return res
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    msg = json.loads(data)
                    if "error" in msg:
                        res.error = str(msg["error"].get("message", msg["error"]))[:300]
                        return res
                    if msg.get("usage"):
                        usage = msg["usage"]
                    choices = msg.get("choices") or []
                    if choices and (choices[0].get("text") or choices[0].get("token_ids")):
                        if res.ttft_s is None:
                            res.ttft_s = now - start
                        res.chunk_times_s.append(now - t0)
                        n_chunks += 1
            res.e2el_s = time.perf_counter() - start
        except (TimeoutError, httpx.HTTPError, json.JSONDecodeError) as e:
            res.error = f"{type(e).__name__}: {e}"[:300]
            return res
        if usage:
            res.output_tokens = int(usage.get("completion_tokens") or n_chunks)
            res.prompt_tokens = int(usage.get("prompt_tokens") or res.prompt_tokens)
            det = usage.get("prompt_tokens_details") or {}
            if det.get("cached_tokens") is not None:
                res.cached_tokens = int(det["cached_tokens"])
        else:
            res.output_tokens = n_chunks
        res.success = res.ttft_s is not None or res.output_tokens == 0
        if not res.success:
            res.error = "no output"
        return res

    async def run(
        self,
        w: Workload,
        speed: float | None = 1.0,
        concurrency: int | None = None,
        progress: bool = True,
    ) -> tuple[list[RequestResult], float]:
        """Open loop when ``concurrency`` is None, else closed loop. Returns the results and
        the duration (first send to last completion)."""
        reqs = w.requests
        if not reqs:
            raise ValueError("empty workload")
        bar = _progress(len(reqs), progress)
        async with httpx.AsyncClient(timeout=self.timeout, limits=self.limits) as client:
            model = await self._resolve_model(client)
            t0 = time.perf_counter()
            first = reqs[0].arrival_s

            in_flight = failed = 0

            async def tracked(req: Request, scheduled: float) -> RequestResult:
                # the bar moves as requests are sent, not only as long ones complete
                nonlocal in_flight, failed
                in_flight += 1
                bar.set_postfix_str(f"in flight {in_flight}, failed {failed}")
                r = await self._one(client, w, req, model, t0, scheduled)
                in_flight -= 1
                failed += not r.success
                bar.set_postfix_str(f"in flight {in_flight}, failed {failed}", refresh=False)
                bar.update(1)
                return r

            if concurrency is None:
                sp = speed or 1.0

                async def timed(req: Request) -> RequestResult:
                    at = (req.arrival_s - first) / sp
                    delay = at - (time.perf_counter() - t0)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    return await tracked(req, at)

                results = await asyncio.gather(*(timed(r) for r in reqs))
            else:
                if concurrency < 1:
                    raise ValueError("concurrency must be >= 1")
                queue = list(reversed(reqs))
                results = []

                async def worker() -> None:
                    while queue:
                        req = queue.pop()
                        results.append(await tracked(req, time.perf_counter() - t0))

                await asyncio.gather(*(worker() for _ in range(concurrency)))
            duration = span_s(results, time.perf_counter() - t0)
        bar.close()
        return list(results), duration


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="replay", unit="req", dynamic_ncols=True)


def report(
    w: Workload,
    results: list[RequestResult],
    duration_s: float,
    slo: SLO | None,
    engine_block_size: int | None,
    mode: dict[str, Any],
) -> dict[str, Any]:
    m = compute_metrics(results, duration_s, slo)
    theo = w.theoretical_hit_rate(engine_block_size)
    return {
        "workload": w.stats(),
        "mode": mode,
        "metrics": m,
        "theoretical_hit_rate": theo,
        "theoretical_hit_rate_block_size": engine_block_size or w.block_tokens,
        "requests": [
            {
                "request_id": r.request_id,
                "scheduled_s": round(r.scheduled_s, 6),
                "sent_s": round(r.sent_s, 6),
                "ttft_s": r.ttft_s,
                "tpot_s": r.tpot_s,
                "e2el_s": r.e2el_s,
                "output_tokens": r.output_tokens,
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "error": r.error or None,
            }
            for r in results
        ],
    }


def plot(results: list[RequestResult], out_prefix: Path, title: str = "") -> list[Path]:
    """Latency over time (TTFT and E2EL by send time) and CDFs of TTFT/TPOT/ITL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in results if r.success and r.ttft_s is not None), key=lambda r: r.sent_s)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([r.sent_s for r in ok], [r.ttft_s * 1e3 for r in ok], ".", ms=3, label="TTFT")
    ax.plot([r.sent_s for r in ok], [(r.e2el_s or 0) * 1e3 for r in ok], ".", ms=3, label="E2EL")
    ax.set_xlabel("send time (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{title} latency over time")
    ax.legend()
    p = out_prefix.with_name(out_prefix.name + "_latency.png")
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    series = {
        "TTFT (ms)": [r.ttft_s * 1e3 for r in ok],
        "TPOT (ms)": [t * 1e3 for r in ok if (t := r.tpot_s) is not None],
        "ITL (ms)": [g * 1e3 for r in ok for g in r.inter_chunk_s],
    }
    for ax, (name, xs) in zip(axes, series.items()):
        if xs:
            xs = np.sort(xs)
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs))
        ax.set_xlabel(name)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} CDFs")
    fig.tight_layout()
    p = out_prefix.with_name(out_prefix.name + "_cdf.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def format_table(rep: dict[str, Any]) -> str:
    m = rep["metrics"]

    def f(x: float | None, nd: int = 1) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"

    lines = [
        f"completed {m['completed']}  failed {m['failed']}  duration {m['duration_s']:.2f} s",
        f"request throughput {m['request_throughput']:.3f} req/s  output "
        f"{m['output_throughput']:.1f} tok/s  goodput {m['request_goodput']:.3f} req/s "
        f"({100 * m['goodput_fraction']:.1f}% of requests)",
    ]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = m[key]
        lines.append(
            f"{key[:-3].upper():5s} ms  mean {f(s['mean'])}  p50 {f(s['p50'])}  "
            f"p90 {f(s['p90'])}  p99 {f(s['p99'])}"
        )
    th = rep["theoretical_hit_rate"]["token_weighted"]
    mh = m["measured_hit_rate"]
    lines.append(
        f"prefix hit rate: measured {f(None if mh is None else 100 * mh)}%  "
        f"theoretical (infinite cache) {100 * th:.1f}%"
    )
    return "\n".join(lines)


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``kvgrid bench replay``."""
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--workload", required=True, help=SPEC_HELP)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--speed", type=float, default=None, help="open loop, time speed-up")
    mode.add_argument("--concurrency", type=int, default=None, help="closed loop")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument(
        "--api-key",
        default=None,
        help="API key for a server started with --api-keys (default: $KVGRID_API_KEY)",
    )
    p.add_argument("--limit", type=int, default=None, help="first N requests only")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--slo-e2el-ms", type=float, default=None)
    p.add_argument("--block-size", type=int, default=64, help="server's KV block size")
    p.add_argument("--no-ignore-eos", action="store_true")
    p.add_argument("--out", default=None, help="JSON file (plots next to it)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """``kvgrid bench replay``: replay, print the table, write JSON and plots."""
    w = load_workload(args.workload)
    if args.limit:
        w.requests = w.requests[: args.limit]
    slo = SLO(
        None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1000,
        None if args.slo_tpot_ms is None else args.slo_tpot_ms / 1000,
        None if args.slo_e2el_ms is None else args.slo_e2el_ms / 1000,
    )
    key = args.api_key or envs.KVGRID_API_KEY.get()
    rep = Replayer(args.url, args.model, key, ignore_eos=not args.no_ignore_eos)
    speed = args.speed if args.concurrency is None else None
    try:
        results, duration = asyncio.run(
            rep.run(
                w, speed=speed or 1.0, concurrency=args.concurrency, progress=not args.no_progress
            )
        )
    except (httpx.HTTPError, RuntimeError, ValueError) as e:
        print(f"error: {args.url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    mode = (
        {"closed_loop": True, "concurrency": args.concurrency}
        if args.concurrency
        else {"open_loop": True, "speed": speed or 1.0}
    )
    out = report(w, results, duration, slo, args.block_size, mode)
    print(format_table(out))
    if args.out:
        p = Path(args.out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=1))
        for q in plot(results, p.with_suffix(""), w.name):
            print(f"wrote {q}")
        print(f"wrote {p}")
    return 0 if out["metrics"]["failed"] == 0 else 1
