"""``StepProfile``: where a benchmark run's time goes, step by step, on the engine's thread
(``kvgrid bench reuse`` keeps one per configuration)."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from kvgrid.stats import percentile

if TYPE_CHECKING:
    from kvgrid.engine.llm_engine import LLMEngine


class StepProfile:
    """Where a configuration's time goes, step by step: what each step ran (decodes,
    prompt tokens), how long it took on the host's clock, and the requests admitted but
    held out of it by their store loads (loading, or landing in G1). Steps that run
    nothing while loads are in flight are the engine idling on the store. The engine
    thread's own time per step: planning it, and launching it (on a GPU the launch only
    queues work: a launch that takes long is a host held up, by the GIL the store's
    threads take among others)."""

    def __init__(self, eng: LLMEngine) -> None:
        self.sched = eng.scheduler
        self.inner = self.sched.schedule
        self.runner = eng.runner
        self.execute = eng.runner.execute
        self.steps: list[tuple[int, int, int, int, int, float]] = []
        self.seconds: list[float] = []
        self.launch: list[float] = []
        self._t = None
        self.sched.schedule = self._schedule
        self.runner.execute = self._execute

    def _execute(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.execute(*args, **kwargs)
        finally:
            if self.launch:
                self.launch[-1] += time.perf_counter() - t0

    def _schedule(self):
        now = time.perf_counter()
        if self._t is not None:
            self.seconds.append(now - self._t)
        self._t = now
        out = self.inner()
        sched_s = time.perf_counter() - now
        ran = {id(s.seq) for s in out.scheduled}
        held = sum(
            1
            for s in self.sched.running
            if id(s) not in ran
            and (
                s.load_future is not None
                or (s.kv_landing is not None and not s.kv_landing.landed())
            )
        )
        decodes = sum(1 for s in out.scheduled if s.num_tokens == 1)
        prompt = sum(s.num_tokens for s in out.scheduled if s.num_tokens > 1)
        row = (decodes, prompt, held, len(self.sched.running), len(self.sched.waiting), sched_s)
        self.steps.append(row)
        self.launch.append(0.0)
        return out

    def close(self) -> dict:
        self.sched.schedule = self.inner
        self.runner.execute = self.execute
        n = len(self.seconds)
        rows, secs, launch = self.steps[:n], self.seconds, self.launch[:n]
        idle = [t for (d, p, *_), t in zip(rows, secs) if not d and not p]
        decode_only = [t for (d, p, *_), t in zip(rows, secs) if d and not p]
        with_prompt = [t for (d, p, *_), t in zip(rows, secs) if p]
        dec = [d for d, *_ in rows if d]
        return {
            "steps": n,
            "idle_steps": len(idle),
            "idle_s": sum(idle),
            "decode_only_steps": len(decode_only),
            "decode_only_s": sum(decode_only),
            "prompt_steps": len(with_prompt),
            "prompt_s": sum(with_prompt),
            "prompt_tokens": sum(p for _, p, *_ in rows),
            "decode_batch_mean": statistics.fmean(dec) if dec else None,
            "running_mean": statistics.fmean(r[3] for r in rows) if rows else None,
            "waiting_mean": statistics.fmean(r[4] for r in rows) if rows else None,
            # request-steps spent admitted but held out by a load (per step, summed)
            "load_held_seq_steps": sum(r[2] for r in rows),
            "load_held_steps": sum(1 for r in rows if r[2]),
            # the engine thread's time planning steps (admissions, lookups, write-backs)
            "schedule_s": sum(r[5] for r in rows),
            # ... and launching them: decode-only steps, steps with prompt tokens
            "launch_s": {
                "decode_only": sum(x for (d, p, *_), x in zip(rows, launch) if d and not p),
                "with_prompt": sum(x for (_, p, *_), x in zip(rows, launch) if p),
            },
            "loads": self._loads(),
            # per step: host seconds, decodes, prompt tokens, held by loads, running,
            # waiting, host seconds planning it, host seconds launching it
            "trace": [
                [round(t, 5), *r[:5], round(r[5], 5), round(x, 5)]
                for t, r, x in zip(secs, rows, launch)
            ],
        }

    def _loads(self) -> dict | None:
        """How the store loads went: queued (thread and launch gate) and issued."""
        loader = self.sched.loader
        if loader is None or not loader.timings:
            return None
        t = list(loader.timings)
        return {
            "loads": len(t),
            "layered": sum(x.layered for x in t),
            "blocks": sum(x.blocks for x in t),
            "queued_s_p50_p90": [percentile([x.queued_s for x in t], q) for q in (50, 90)],
            "issue_s_p50_p90": [percentile([x.issue_s for x in t], q) for q in (50, 90)],
        }
