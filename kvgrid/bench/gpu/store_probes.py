"""Probes around the store benchmark's timed runs: a store's loads, a quiet host before
timing, and the GIL pressure during a run."""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time

from kvgrid.bench.gpu.harness import pct, sync
from kvgrid.store import ContextStore


class LoadLog:
    """Wraps a store's load_into: per load, blocks, KV bytes, tiers and wall seconds."""

    def __init__(self, store: ContextStore):
        self.records: list[dict] = []
        inner = store.load_into

        def load_into(ks, tenant, dsts, deadline=None):
            t0 = time.perf_counter()
            served = inner(ks, tenant, dsts, deadline)
            dt = time.perf_counter() - t0
            nb = sum(d.nbytes for d in dsts[: len(served)])
            rec = {"blocks": len(served), "asked": len(ks), "bytes": nb, "s": dt}
            self.records.append({**rec, "tiers": sorted(set(served))})
            return served

        store.load_into = load_into
        inner_layered = store.load_layered

        def load_layered(ks, tenant, dst, block_ids):
            t_call = time.perf_counter()
            landing = inner_layered(ks, tenant, dst, block_ids)
            if landing is not None:  # timed on the device once it has landed (see take)
                rec = {"blocks": len(ks), "asked": len(ks), "bytes": landing.nbytes,
                       "t_call": t_call, "t_issued": time.perf_counter()}  # fmt: skip
                self.records.append({**rec, "tiers": ["G2"], "landing": landing})
            return landing

        store.load_layered = load_layered

    def take(self) -> list[dict]:
        out, self.records = self.records, []
        for rec in out:
            landing = rec.pop("landing", None)
            if landing is not None:
                landing.synchronize()
                rec["s"] = landing.device_seconds() or float("nan")
                rec["layered"] = True
        return out


def attached_store(eng) -> ContextStore | None:
    conn = eng.scheduler.connector
    return conn.store if conn is not None else None


def quiesce(store: ContextStore | None = None, timeout_s: float = 5.0) -> dict:
    """Start a timed measurement from a quiet host: the store's background copies, writes
    and prefetches done, the GPU idle, garbage collected, dirty pages of earlier disk phases
    written back, and no thread of this process still busy (earlier phases' stores and
    loaders, say): the process must use under 5% of a core over 0.1 s. Returns what it
    took and the threads alive, so a measurement that began noisy can be told."""
    t0 = time.perf_counter()
    if store is not None:
        store.flush(600)
    sync()
    gc.collect()
    os.sync()
    while True:
        c0, w0 = time.process_time(), time.perf_counter()
        time.sleep(0.1)
        busy = (time.process_time() - c0) / (time.perf_counter() - w0)
        if busy < 0.05 or time.perf_counter() - t0 > timeout_s:
            break
    names: dict[str, int] = {}
    for t in threading.enumerate():
        stem = t.name.rstrip("0123456789_-")
        names[stem] = names.get(stem, 0) + 1
    return {"s": round(time.perf_counter() - t0, 3), "busy_cores": round(busy, 3), "threads": names}


class HostProbe:
    """While a timed run goes on, a thread asks to wake every millisecond and notes how
    late it woke: waking needs the GIL, so lateness is a cheap proxy of the GIL pressure the
    engine's thread sees (time other threads held it; the CPUs are not short on this host).
    Every 10 ms it also samples the store's background queues and pending G2 copies."""

    def __init__(self, store: ContextStore | None = None, period_s: float = 0.001) -> None:
        self.store, self.period_s = store, period_s
        self.late: list[float] = []
        self.writes: list[int] = []
        self.reads: list[int] = []
        self.pinned: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-probe", daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            t = time.perf_counter()
            time.sleep(self.period_s)
            self.late.append(time.perf_counter() - t - self.period_s)
            n += 1
            if self.store is not None and n % 10 == 0:
                self.writes.append(self.store.writes.in_flight)
                self.reads.append(self.store.reads.in_flight)
                if n % 100 == 0 and self.store.g2 is not None:
                    self.pinned.append(self.store.g2.pinned_count())

    def __enter__(self) -> HostProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        late = self.late
        out = {
            "wakeups": len(late),
            "late_ms_mean": 1e3 * statistics.fmean(late) if late else None,
            "late_ms_p50": 1e3 * pct(late, 50),
            "late_ms_p99": 1e3 * pct(late, 99),
            "late_ms_max": 1e3 * max(late) if late else None,
            # share of the run's wall time the probe waited past its wake-up
            "late_share": sum(late) / (len(late) * self.period_s + sum(late)) if late else None,
        }
        for name, xs in (("write_queue", self.writes), ("read_queue", self.reads),
                         ("g2_pinned", self.pinned)):  # fmt: skip
            if xs:
                out[name] = {"mean": statistics.fmean(xs), "max": max(xs)}
        return out
