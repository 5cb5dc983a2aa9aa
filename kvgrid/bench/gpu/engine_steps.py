"""Engine runs the engine benchmark times: a workload through ``step()`` with per-token
times, each step's shape and time (``StepRecorder``), the roofline of those steps, and
torch.profiler tables of a request's first steps."""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import statistics
import time

from kvgrid.bench.gpu.engine_common import PROFILES, Energy
from kvgrid.bench.gpu.harness import pct, sync


class StepRecorder:
    """Logs each engine step's shape (for the roofline and the calibration fit) and its
    measured time (the engine's own: GPU time between events with asynchronous scheduling,
    launch to synchronisation without), from the engine's speed hook; and, per step, where
    the host time goes."""

    def __init__(self, eng):
        self.eng = eng
        # (tokens, seq_lens, q_lens, seconds)
        self.steps: list[tuple[int, list[int], list[int], float]] = []
        self.host: list[dict[str, float]] = []
        self._shapes: dict[int, tuple[int, list[int], list[int]]] = {}
        self._orig = {
            "record": eng._record_speed,
            "step": eng.step,
            "launch": eng._launch,
            "complete": eng._complete,
            "schedule": eng.scheduler.schedule,
            "prepare": eng.runner.prepare,
            "execute": eng.runner.execute,
        }
        cur: dict[str, float] = {}

        def timed(key, fn):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    cur[key] = cur.get(key, 0.0) + time.perf_counter() - t0

            return wrapper

        def launch(sched, prev):
            batch = sched.scheduled
            # shapes before the launch advances the sequences
            self._shapes[id(sched)] = (
                sum(s.num_tokens for s in batch),
                [s.seq.num_computed_tokens + s.num_tokens for s in batch],
                [s.num_tokens for s in batch],
            )
            return self._orig["launch"](sched, prev)

        def record(sched, seconds):
            self.steps.append((*self._shapes.pop(id(sched)), seconds))
            return self._orig["record"](sched, seconds)

        step_fn = timed("step", self._orig["step"])

        def step():
            cur.clear()
            out = step_fn()
            if "execute" in cur:
                self.host.append(dict(cur))
            return out

        eng._record_speed = record
        eng.step = step
        eng._launch = timed("launch", launch)
        eng._complete = timed("complete", self._orig["complete"])
        eng.scheduler.schedule = timed("schedule", self._orig["schedule"])
        eng.runner.prepare = timed("prepare", self._orig["prepare"])
        eng.runner.execute = timed("execute", self._orig["execute"])

    def close(self):
        for name in ("step", "_record_speed", "_launch", "_complete"):
            self.eng.__dict__.pop(name, None)
        self.eng.scheduler.__dict__.pop("schedule", None)
        self.eng.runner.__dict__.pop("prepare", None)
        self.eng.runner.__dict__.pop("execute", None)

    def host_breakdown(self, decode_only: bool = True) -> dict:
        """Median milliseconds per step call: the whole call; scheduling; input preparation;
        the forward's launch (execute, prepare included); the launch with sampling; the
        completion of a step (waiting for its GPU work, then output bookkeeping)."""
        rows = [h for h, st in zip(self.host, self.steps) if not decode_only or max(st[2]) == 1]
        if not rows:
            return {}
        keys = ("step", "schedule", "prepare", "execute", "launch", "complete")
        med = {k: statistics.median(r.get(k, 0.0) for r in rows) * 1e3 for k in keys}
        med["steps"] = len(rows)
        return {f"{k}_ms" if k != "steps" else k: v for k, v in med.items()}


def roofline_seconds(steps, cfg, bw_GBps: float, tflops: float) -> tuple[float, float]:
    """Sum over steps of max(bytes / bandwidth, flops / matmul rate); also the pure-bytes sum."""
    kv_tok = cfg.kv_bytes_per_token(2)
    weight_bytes = (cfg.param_count() - cfg.vocab_size * cfg.hidden_size) * 2  # embedding: a gather
    dense_flops_per_tok = 2 * (cfg.param_count() - cfg.vocab_size * cfg.hidden_size)
    hq, d, layers = cfg.num_attention_heads, cfg.head_dim, cfg.num_hidden_layers
    total = mem_only = 0.0
    for tokens, seq_lens, q_lens, *_ in steps:
        kv_read = sum(seq_lens) * kv_tok
        byts = weight_bytes + kv_read + tokens * kv_tok
        flops = dense_flops_per_tok * tokens + sum(
            4 * hq * d * layers * q * (s - q + (q + 1) / 2) for s, q in zip(seq_lens, q_lens)
        )
        t_mem = byts / (bw_GBps * 1e9)
        total += max(t_mem, flops / (tflops * 1e12))
        mem_only += t_mem
    return total, mem_only


def run_engine(eng, workload, energy: Energy | None = None, record=None) -> dict:
    from kvgrid.engine.sampling_params import SamplingParams

    times: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    sync()
    j0 = energy.read() if energy else None
    t0 = time.perf_counter()
    for i, (prompt, n_out) in enumerate(workload):
        rid = f"r{i}-{time.monotonic_ns()}"
        eng.add_request(
            rid, prompt, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True)
        )
        times[rid] = []
        tokens[rid] = []
    steps = 0
    step_s = []
    n_outs = []
    gc_log: list[tuple[int, float, float]] = []  # (generation, start from t0, seconds)
    gc_t: list[float] = []

    def on_gc(phase, info):
        if phase == "start":
            gc_t[:] = [time.perf_counter()]
        elif gc_t:
            gc_log.append((info["generation"], gc_t[0] - t0, time.perf_counter() - gc_t[0]))

    gc.callbacks.append(on_gc)
    while eng.has_unfinished_requests():
        a = time.perf_counter()
        outs = eng.step()
        now = time.perf_counter()
        step_s.append(now - a)
        n_outs.append(len(outs))
        steps += 1
        for o in outs:
            times[o.request_id] += [now] * len(o.new_token_ids)
            tokens[o.request_id] += o.new_token_ids
    elapsed = time.perf_counter() - t0
    gc.callbacks.remove(on_gc)
    n_out = sum(len(t) for t in times.values())
    ttft = [t[0] - t0 for t in times.values()]
    itl = [b - a for t in times.values() for a, b in itertools.pairwise(t)]
    res = {
        "requests": len(workload),
        "input_tokens": sum(len(p) for p, _ in workload),
        "output_tokens": n_out,
        "elapsed_s": elapsed,
        "steps": steps,
        "output_tok_s": n_out / elapsed,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50) * 1e3,
        "itl_p90_ms": pct(itl, 90) * 1e3,
        "itl_p99_ms": pct(itl, 99) * 1e3,
        "itl_max_ms": max(itl, default=0.0) * 1e3,
        "step_p50_ms": pct(step_s, 50) * 1e3,
        "step_p99_ms": pct(step_s, 99) * 1e3,
        # the slowest step() calls: (index, ms), for hiccups behind the ITL tail
        "slowest_steps": sorted(enumerate(step_s), key=lambda x: -x[1])[:12],
        "step_ms_and_outputs": [(round(x * 1e3, 2), n) for x, n in zip(step_s, n_outs)],
        "gc": {
            f"gen{g}": [sum(1 for x in gc_log if x[0] == g), sum(x[2] for x in gc_log if x[0] == g)]
            for g in range(3)
        },
        "gc_gen12_at_s": [(g, round(at, 3), round(sec * 1e3, 2)) for g, at, sec in gc_log if g],
        "preemptions": eng.stats()["num_preemptions"],
        # per request, in workload order: compares runs of the same workload
        "token_digests": [
            hashlib.blake2b(json.dumps(t).encode(), digest_size=8).hexdigest()
            for t in tokens.values()
        ],
    }
    # where the long gaps fall (seconds from the start), to tell a burst from a steady tail
    p50 = pct(itl, 50) if itl else 0.0
    long_at = sorted(
        a - t0 for t in times.values() for a, b in itertools.pairwise(t) if b - a > 1.5 * p50
    )
    res["itl_over_1.5x_p50"] = len(long_at)
    res["itl_over_1.5x_p50_at_s"] = [round(x, 3) for x in long_at[:: max(1, len(long_at) // 40)]]
    res["itl_p99_over_p50"] = res["itl_p99_ms"] / res["itl_p50_ms"] if itl else float("nan")
    if energy:
        res["J_per_token"] = energy.per_token(j0, n_out)
    return res


def profile_steps(eng, prompt, n_steps: int, title: str, sort: str = "self_cpu_time_total"):
    """torch.profiler over one request's first steps; the table goes to $OUT/profiles.txt."""
    from torch.profiler import ProfilerActivity, profile

    from kvgrid.engine.sampling_params import SamplingParams

    eng.add_request(
        f"prof-{time.monotonic_ns()}",
        prompt,
        SamplingParams(max_tokens=n_steps, temperature=0, ignore_eos=True),
    )
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        while eng.has_unfinished_requests():
            eng.step()
        sync()
    PROFILES.append(f"==== {title}\n" + prof.key_averages().table(sort_by=sort, row_limit=18))
    eng.block_manager.reset_prefix_cache()
