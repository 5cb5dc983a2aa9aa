# ruff: noqa: E501  (summary rows are long)
"""Per-step records of the store benchmark's replay: ``StepLog`` (where each engine step's
time goes), ``KernelWindow`` (a window of CUDA activity) and their summaries."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from kvgrid.bench.gpu.harness import GPU, pct, sync
from kvgrid.store import transfer

_WAIT_KINDS = {"writeback": "wb_wait_ms", "landing": "land_wait_ms", "fence": "fence_ms",
               "slot_ready": "fence_ms"}  # fmt: skip
_WAIT_COLS = ("wb_wait_ms", "land_wait_ms", "fence_ms")


class StepLog:
    """Per engine step() of a replay, where its time goes: what it launched (prefill tokens
    computed, decode sequences, store tokens that became usable), its wall time, the device
    time the engine measured for the step it launched (GPU events; on the CPU, launch to
    completion), the engine-thread time inside store calls, and (GPU) how long the device
    stalled at the store's cross-stream waits (``transfer.STREAM_WAITS``). With asynchronous
    scheduling a step() launches step N and waits for step N-1, so its wall time follows the
    previous launch's device time: the device time is the one to set against a composition.
    Columns are lists (one entry per step()) so the JSON stays compact."""

    COLS = ("t_s", "wall_ms", "launch_ms", "device_ms", "prefill", "decode", "loaded",
            "store_ms", *_WAIT_COLS)  # fmt: skip

    def __init__(self, eng, t0: float) -> None:
        self.eng, self.t0 = eng, t0
        self.cols: dict[str, list] = {c: [] for c in self.COLS}
        self._open: dict[int, tuple[object, int]] = {}  # id(sched) -> (sched, row)
        self._device: dict[int, float] = {}  # row -> ms (a step may complete within its step())
        self._launched = None
        self._schedule, self._record = eng.scheduler.schedule, eng._record_speed
        self._launch = eng._launch
        self._launch_s = 0.0
        eng.scheduler.schedule = self._on_schedule
        eng._record_speed = self._on_record
        eng._launch = self._on_launch
        self.waits = transfer.StreamWaits() if GPU else None
        transfer.STREAM_WAITS = self.waits

    def _on_schedule(self):
        self._launched = out = self._schedule()
        if out.scheduled:  # held: ids stay unique until completed
            self._open[id(out)] = (out, len(self.cols["t_s"]))
        return out

    def _on_launch(self, *a, **kw):
        # host time to issue the step (schedule excluded): a step whose device time
        # follows this one is launch-bound, and the device idled inside it
        t = time.perf_counter()
        try:
            return self._launch(*a, **kw)
        finally:
            self._launch_s += time.perf_counter() - t

    def _on_record(self, sched, seconds: float) -> None:
        got = self._open.pop(id(sched), None)
        if got is not None:
            self._device[got[1]] = round(seconds * 1e3, 3)
        self._record(sched, seconds)

    def _store_s(self) -> float:
        conn = self.eng.scheduler.connector
        return sum(conn.engine_time.seconds.values()) if conn is not None else 0.0

    def begin(self) -> None:
        self._launched = None
        self._launch_s = 0.0
        self._loaded0 = self.eng.scheduler.store_loaded_tokens
        self._store0 = self._store_s()
        if self.waits is not None:
            self.waits.tag = len(self.cols["t_s"])
        self._t = time.perf_counter()

    def end(self, t_end: float) -> None:
        items = self._launched.scheduled if self._launched is not None else []
        c = self.cols
        c["t_s"].append(round(self._t - self.t0, 4))
        c["wall_ms"].append(round((t_end - self._t) * 1e3, 3))
        c["launch_ms"].append(round(self._launch_s * 1e3, 3))
        # the engine's own split (_record_speed): a chunk of more than one token prefills
        c["prefill"].append(sum(s.num_tokens for s in items if s.num_tokens > 1))
        c["decode"].append(sum(1 for s in items if s.num_tokens == 1))
        c["loaded"].append(self.eng.scheduler.store_loaded_tokens - self._loaded0)
        c["store_ms"].append(round((self._store_s() - self._store0) * 1e3, 3))
        for k in _WAIT_COLS:
            c[k].append(0.0)

    def close(self) -> dict[str, list]:
        """Restore the engine; the columns, stream waits read (after a device sync)."""
        self.eng.scheduler.schedule, self.eng._record_speed = self._schedule, self._record
        del self.eng._launch  # the bound method again
        transfer.STREAM_WAITS = None
        self.cols["device_ms"] = [self._device.get(j) for j in range(len(self.cols["t_s"]))]
        if self.waits is not None:
            sync()
            for row, kind, ms in self.waits.take():
                col = self.cols[_WAIT_KINDS[kind]]
                if row < len(col):
                    col[row] = round(col[row] + ms, 3)
        else:  # nothing measured them
            for k in _WAIT_COLS:
                self.cols[k] = None
        return self.cols


class KernelWindow:
    """The device's view of a slice of a replay: torch.profiler with CUDA activity only
    (CUPTI's kernel and copy records; no per-op host instrumentation, which would slow the
    launches being judged). Per stream busy time, the compute stream's idle gaps, and the
    kernels that took the time: tells a device that idled inside steps (launch-bound) from
    kernels that ran slower."""

    CATS = ("kernel", "gpu_memcpy", "gpu_memset")

    def __init__(self, start_s: float, end_s: float) -> None:
        self.start_s, self.end_s = start_s, end_s
        self.prof = None
        self.summary: dict | None = None

    def tick(self, now: float) -> None:
        if self.prof is None and self.summary is None and now >= self.start_s:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t = (now, None)
        elif self.prof is not None and now >= self.end_s:
            self.stop(now)

    def stop(self, now: float) -> None:
        if self.prof is None:
            return
        t_stop = time.perf_counter()
        sync()
        self.prof.__exit__(None, None, None)
        path = Path("/tmp") / f"kvgrid-replay-trace-{os.getpid()}.json"
        self.prof.export_chrome_trace(str(path))
        self.prof = None
        try:
            self.summary = self._summarize(json.loads(path.read_text()), (self.t[0], now))
        finally:
            path.unlink(missing_ok=True)
        # the engine waited this long: every TTFT after the window carries it
        self.summary["stop_stall_s"] = round(time.perf_counter() - t_stop, 2)

    @staticmethod
    def _merge(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
        out: list[list[float]] = []
        for a, b in sorted(iv):
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return [(a, b) for a, b in out]

    def _summarize(self, trace: dict, window: tuple[float, float]) -> dict:
        ev = [e for e in trace.get("traceEvents", [])
              if e.get("ph") == "X" and e.get("cat") in self.CATS]  # fmt: skip
        if not ev:
            return {"window_s": window, "events": 0}
        streams: dict[str, list] = {}
        kernels: dict[str, list] = {}
        for e in ev:
            a = float(e["ts"])
            sid = f"{'kernel' if e['cat'] == 'kernel' else 'copy'}:{e.get('args', {}).get('stream', e.get('tid'))}"
            streams.setdefault(sid, []).append((a, a + float(e.get("dur", 0))))
            k = kernels.setdefault(e["name"][:90], [0, 0.0])
            k[0] += 1
            k[1] += float(e.get("dur", 0))
        t0 = min(a for iv in streams.values() for a, _ in iv)
        t1 = max(b for iv in streams.values() for _, b in iv)
        busy = {sid: sum(b - a for a, b in self._merge(iv)) / 1e3 for sid, iv in streams.items()}
        main = max((s for s in busy if s.startswith("kernel")), key=busy.get, default=None)
        gaps = []
        if main is not None:
            m = self._merge(streams[main])
            gaps = [(m[j + 1][0] - m[j][1]) / 1e3 for j in range(len(m) - 1)]
        every_kernel = [
            iv for sid, ivs in streams.items() if sid.startswith("kernel") for iv in ivs
        ]
        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]
        return {
            "window_s": [round(window[0], 2), round(window[1], 2)],
            "span_ms": (t1 - t0) / 1e3,
            "events": len(ev),
            "busy_ms": {k: round(v, 1) for k, v in sorted(busy.items(), key=lambda kv: -kv[1])},
            "any_kernel_busy_ms": sum(b - a for a, b in self._merge(every_kernel)) / 1e3,
            "main_stream": main,
            "main_gaps": {
                "count": len(gaps),
                "ms": sum(gaps),
                "over_0.1ms": [sum(1 for g in gaps if g > 0.1), sum(g for g in gaps if g > 0.1)],
                "over_1ms": [sum(1 for g in gaps if g > 1), sum(g for g in gaps if g > 1)],
            },
            "top_kernels": [[name, n, round(us / 1e3, 2)] for name, (n, us) in top],
        }


def step_summary(cols: dict[str, list]) -> dict:
    """Steps that prefill against decode-only ones: counts, wall and device ms (mean, p90),
    prefill tokens per second of prefill-step device time, and per step() the store's
    engine-thread ms and the device's stalls at store waits (None where not measured)."""
    n = len(cols["t_s"])
    dev = [d if d is not None else w for d, w in zip(cols["device_ms"], cols["wall_ms"])]
    out: dict = {"steps": n}
    for name, pick in (("prefill", lambda j: cols["prefill"][j] > 0),
                       ("decode", lambda j: cols["prefill"][j] == 0 and cols["decode"][j] > 0)):  # fmt: skip
        rows = [j for j in range(n) if pick(j)]
        wall, d = [cols["wall_ms"][j] for j in rows], [dev[j] for j in rows]
        launch = [cols["launch_ms"][j] for j in rows]
        out[name] = {"steps": len(rows),
                     "wall_ms_mean": statistics.fmean(wall) if wall else None,
                     "wall_ms_p90": pct(wall, 90) if wall else None,
                     "launch_ms_mean": statistics.fmean(launch) if launch else None,
                     "device_ms_mean": statistics.fmean(d) if d else None,
                     "device_ms_p90": pct(d, 90) if d else None}  # fmt: skip
    rows = [j for j in range(n) if cols["prefill"][j] > 0]
    pre_s = sum(dev[j] for j in rows) / 1e3
    out["prefill"]["tokens"] = sum(cols["prefill"][j] for j in rows)
    out["prefill"]["tok_per_s"] = out["prefill"]["tokens"] / pre_s if pre_s else None
    out["empty_steps"] = n - out["prefill"]["steps"] - out["decode"]["steps"]
    out["loaded_tokens"] = sum(cols["loaded"])
    for k in ("store_ms", *_WAIT_COLS):
        out[k + "_per_step"] = sum(cols[k]) / n if n and cols[k] is not None else None
    return out


def step_table(runs: dict[str, dict | None]) -> list[str]:
    """Per-step comparison of replay runs (see step_summary; device ms: the engine's GPU
    events, or wall time on the CPU; waits: device stalls per step(), '-' if not measured)."""

    def f(v, fmt: str = ".1f") -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["", "| run | steps (prefill/decode/empty) | prefill step ms wall mean/p90, device mean/p90, launch mean | decode step ms wall mean/p90, device mean/p90 | prefill tok/s of prefill-step device time | store engine-thread ms/step | write-back wait ms/step | landing wait ms/step | load fence ms/step |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, x in runs.items():
        if not x:
            continue
        p, d = x["prefill"], x["decode"]
        lines.append(
            f"| {name} | {x['steps']} ({p['steps']}/{d['steps']}/{x['empty_steps']}) "
            f"| {f(p['wall_ms_mean'])}/{f(p['wall_ms_p90'])}, {f(p['device_ms_mean'])}/{f(p['device_ms_p90'])}, {f(p.get('launch_ms_mean'))} "
            f"| {f(d['wall_ms_mean'])}/{f(d['wall_ms_p90'])}, {f(d['device_ms_mean'])}/{f(d['device_ms_p90'])} "
            f"| {f(p['tok_per_s'], '.0f')} | {f(x['store_ms_per_step'], '.2f')} | {f(x['wb_wait_ms_per_step'], '.2f')} "
            f"| {f(x['land_wait_ms_per_step'], '.2f')} | {f(x['fence_ms_per_step'], '.2f')} |"
        )
    return lines
