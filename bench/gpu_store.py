"""GPU benchmark of the context store: correctness first, then speed, in one run.

    PYTHONPATH=. python3 bench/gpu_store.py                      # everything (one H100)
    PYTHONPATH=. python3 bench/gpu_store.py --phases env,correct,ttft
    KVGRID_BENCH_SHAPE=smollm2-135m python3 bench/gpu_store.py --sizes 512,1024   # CPU smoke

Model: the Llama-3.1-8B shape (Llama-3-8B's weights layout, context long enough for 32K),
random bf16 weights (``load_format=dummy``): 128 KiB of KV per token, 8 MiB per 64-token
block. One engine; stores are attached and detached between measurements.

Phases (in order):
- env: versions, the disk under --root, and raw ceilings: pinned and pageable host->GPU
  copies of one 32K prompt's KV bytes.
- correct: an 8K prompt computed cold (full prefill), then again over G1's prefix cache (the
  reference: same computation after the prefix), then loaded from G2, G3 and G4 and with a
  forced load/recompute split. Loaded KV must equal the computed KV bit for bit, and the
  first tokens and their top-5 logprobs must equal the G1 run's exactly. The cold run's
  tokens are compared too (a full prefill takes another kernel path: reported, not required).
- ttft: for 8K and 32K prompts, time to first token of recomputing (no store) and of a fully
  cached prompt from G2, G3 and G4 (G4 = a second directory on the same local disk,
  standing in for a shared filesystem: no NFS/Lustre here, and no Redis server on that
  machine). Disk tiers are measured with a cold page cache (posix_fadvise DONTNEED on the
  object files; --drop-all-caches adds drop_caches, which also evicts the engine's own code
  and libraries, unlike a serving machine whose KV objects alone are cold) and warm; G3 with encryption on/off and
  codec none/zstd. Each tier's achieved load bandwidth is set against raw reads of the same
  object files with the same number of threads and the same cache state (G2: against a
  pinned host->GPU copy of the same bytes).
- split: a disk throttled in software (a token bucket in the tier's reads, page cache warm)
  to half and to exactly the bandwidth at which loading a 32K prompt takes as long as
  recomputing it: forced load vs the engine's own choice (load, recompute or split).
- replay: a slice of the Mooncake conversation trace (bench/data/, see replay_workload),
  in-process with arrival times, G1 limited to --replay-g1-blocks blocks so that it evicts;
  the same offered load without and with the store (G2 in pinned memory + G3 on disk).
  Per engine step (StepLog): wall and device time, prefill tokens, decode sequences, store
  tokens, the store's engine-thread time, and on a GPU the device's stalls at the store's
  cross-stream waits; the summary sets prefill and decode-only steps side by side. Each step
  also records its host launch time. With --replay-profile each run records a window of CUDA
  activity (per-stream busy time, idle gaps, top kernels), which tells a GPU left waiting
  for the host from kernels that ran slower. A diagnostic only, off by default: stopping
  the profiler processes its trace on the engine's thread (a 5.7-9.1 s stall at the
  window's end on an H200), so every TTFT after the window is inflated. --replay-runs adds store variants
  (store_si: a 0.2 ms GIL switch interval; store_w4: four write threads).

Prints a table last; writes $OUT/gpu_store.json (or ./out/) after every phase.
"""

# ruff: noqa: E501  (summary rows are long)
from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import gc
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvgrid import keys
from kvgrid.engine.sampling_params import SamplingParams
from kvgrid.gc_tuning import tune_gc
from kvgrid.store import ContextStore, StoreConfig, StoreConnector, transfer
from kvgrid.store.crypto import KeyRing
from kvgrid.store.disk_tier import DiskTier
from kvgrid.store.object import tenant_id

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEV.type == "cuda"
SHAPE = os.environ.get("KVGRID_BENCH_SHAPE", "llama3.1-8b" if GPU else "smollm2-135m")
GiB = 1 << 30
PUBLIC = keys.PUBLIC_TENANT
KEYRING = KeyRing({1: os.urandom(32)})
RESULTS: dict = {"phases": {}, "errors": {}, "notes": []}
T_START = time.perf_counter()
DATA = Path(__file__).resolve().parent / "data" / "mooncake_conversation_slice.jsonl"


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T_START:6.1f}s]", *a, flush=True)


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return float(torch.tensor(xs, dtype=torch.float64).quantile(q / 100))


# ---- engine, stores, requests ------------------------------------------------------------


def build_engine(args):
    from kvgrid.engine.config import EngineConfig
    from kvgrid.engine.llm_engine import LLMEngine

    top = max(args.sizes)
    cfg = EngineConfig(
        model=SHAPE,
        load_format="dummy",
        dtype="bfloat16" if GPU else "float32",
        max_model_len=top + 256,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=top + 64,  # one-shot prefill: the fastest recompute
        num_kv_blocks=args.num_kv_blocks or 2 * (top // 64 + 4),
        cuda_graphs=GPU,
    )
    t0 = time.perf_counter()
    eng = LLMEngine(cfg)
    log(f"engine ready in {time.perf_counter() - t0:.1f}s: {eng.runner.num_blocks} KV blocks")
    t0 = time.perf_counter()
    eng.warm_thread()  # cuDNN's attention plans, kept per thread: the one that steps
    RESULTS["warm_thread_s"] = round(time.perf_counter() - t0, 2)
    log(f"attention plans for every length up to {top + 64} tokens: {RESULTS['warm_thread_s']}s")
    return eng


def with_budget(eng, tokens: int) -> None:
    """Swap the step token budget (the config is frozen; the scheduler reads it per step)."""
    cfg = dataclasses.replace(eng.config, max_num_batched_tokens=tokens)
    eng.config = cfg
    eng.scheduler.config = cfg


class ThrottledDisk(DiskTier):
    """A G3 directory whose reads are paced to ``bytes_per_s`` in all (a token bucket shared
    by the reader threads): a slower disk, emulated over a warm page cache."""

    def __init__(self, *a, bytes_per_s: float, **kw):
        super().__init__(*a, **kw)
        self.bytes_per_s = bytes_per_s
        self._next = 0.0
        self._pace = threading.Lock()

    def get(self, tid, key, into=None):
        blob = super().get(tid, key, into)
        if blob is None:
            return None
        with self._pace:
            now = time.monotonic()
            self._next = max(now, self._next) + len(blob) / self.bytes_per_s
            wait = self._next - now
        time.sleep(wait)
        return blob


def make_store(eng, root: Path, name: str, args, **kw) -> ContextStore:
    """A store under root/name. kw: g2_gib, g3, g4, encrypt, codec, write_through,
    throttle (bytes/s of a ThrottledDisk G3 over an existing directory), admit."""
    d = root / name
    encrypt = kw.get("encrypt", True)
    cfg = StoreConfig(
        g2_bytes=int(kw.get("g2_gib", args.g2_gib) * GiB),
        g3_dir=d / "g3" if kw.get("g3") else None,
        g3_bytes=40 * GiB,
        g4_dir=d / "g4" if kw.get("g4") else None,
        g4_bytes=40 * GiB,
        admit_after=kw.get("admit", {"G2": 1, "G3": 1, "G4": 1}),
        codec=kw.get("codec", "zstd"),
        encrypt=encrypt,
        io_workers=kw.get("io_workers", args.load_workers),
        io_queue=kw.get("io_queue", 8192),
        sweep_interval_s=0,
        write_through=kw.get("write_through", False),
        load_workers=args.load_workers,
        model_fingerprint=eng.spec.fingerprint,
    )
    tiers = None
    if kw.get("throttle"):
        tiers = [ThrottledDisk(kw["throttle_dir"], 40 * GiB, "G3", bytes_per_s=kw["throttle"])]
    return ContextStore(cfg, keyring=KEYRING if encrypt else None, tiers=tiers)


def attach(eng, store: ContextStore | None) -> StoreConnector | None:
    old = eng.scheduler.loader
    if old is not None:
        old.close()
    if store is None:
        eng.scheduler.connector = None
        eng.scheduler.loader = None
        eng.block_manager.record_commits = False
        return None
    conn = StoreConnector(store, eng.runner.kv_cache, eng.config.block_size)
    eng.attach_store(conn)
    loader = eng.scheduler.loader
    inner = loader.submit

    def submit(*a, **kw):  # when admission handed the load over (TTFT breakdown)
        SUBMITS.append(time.perf_counter())
        return inner(*a, **kw)

    loader.submit = submit
    return conn


SUBMITS: list[float] = []


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


def _attached_store(eng) -> ContextStore | None:
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


def run_one(
    eng, prompt: list[int], max_tokens: int = 2, logprobs: int | None = 5, steplog=None
) -> dict:
    """One request alone, from a quiet host; time to first token from add_request. With a
    ``StepLog``, each step() is recorded in it."""
    quiet = quiesce(_attached_store(eng))
    rid = f"r{time.monotonic_ns()}"
    t0 = time.perf_counter()
    eng.add_request(
        rid,
        prompt,
        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=logprobs),
    )
    ttft, final, steps = None, None, 0
    EXEC_STARTS.clear()
    SUBMITS.clear()
    GC_PAUSES.clear()
    prof = cProfile.Profile() if PROFILE_NEXT else None
    if steplog is not None:
        steplog.t0 = t0
    while eng.has_unfinished_requests():
        if prof is not None and steps == 0:
            prof.enable()
        if steplog is not None:
            steplog.begin()
        outs = eng.step()
        if steplog is not None:
            steplog.end(time.perf_counter())
        if prof is not None and steps == 0:
            prof.disable()
        steps += 1
        for o in outs:
            if ttft is None and o.new_token_ids:
                ttft = time.perf_counter() - t0
            if o.finished:
                final = o
    forwards = [round(t - t0, 4) for t in EXEC_STARTS]
    c = final.outputs[0]
    return {
        "ttft_s": ttft,
        "tokens": list(c.token_ids),
        "logprobs": [dict(d) for d in (c.logprobs or [])],
        "cached": final.num_cached_tokens,
        "steps": steps,
        "t0": t0,  # its arrival, perf_counter
        "forward_starts_s": forwards[:3],  # host time of the first forwards, from arrival
        "load_submits_s": [round(t - t0, 4) for t in SUBMITS],
        # collections while the request ran: (generation, start from arrival, seconds)
        "gc_pauses": [
            (g, round(a - t0, 4), round(b - a, 4)) for g, a, b in GC_PAUSES if a - t0 < 0.5
        ],
        "first_step_profile": _top(prof) if prof is not None else None,
        "quiesce": quiet,
    }


EXEC_STARTS: list[float] = []
GC_PAUSES: list[tuple[int, float, float]] = []
PROFILE_NEXT = False  # profile the admitting step of the next run_one
_gc_t0 = [0.0]


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_t0[0] = time.perf_counter()
    else:
        GC_PAUSES.append((info["generation"], _gc_t0[0], time.perf_counter()))


gc.callbacks.append(_on_gc)


def _top(prof: cProfile.Profile, n: int = 25) -> str:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(n)
    return out.getvalue()[-6000:]


def trace_forwards(eng) -> None:
    """Note the host time each forward pass starts (the TTFT breakdown of run_one)."""
    inner = eng.runner.execute

    def execute(batch, *a, **k):
        EXEC_STARTS.append(time.perf_counter())
        return inner(batch, *a, **k)

    eng.runner.execute = execute


def prompt_keys(eng, prompt: list[int]) -> list[bytes]:
    """Keys of the blocks an engine can take from a cache (the last token is computed)."""
    bs = eng.config.block_size
    n = (len(prompt) - 1) // bs
    return keys.block_keys(prompt[: n * bs], eng.scope.with_tenant(PUBLIC).digest, bs)


def save_from_g1(eng, conn: StoreConnector, ks: list[bytes]) -> None:
    """Write the prompt's blocks (named in G1 by the run before) to the store, and wait."""
    bm = eng.block_manager
    ids = [bm.cached[k] for k in ks]
    conn.save(ks, [None, *ks[:-1]], PUBLIC, ids)
    assert conn.store.flush(600), "store writes did not finish"


def object_files(store: ContextStore, tier: str, ks: list[bytes]) -> list[Path]:
    t = store.tier(tier)
    tid = tenant_id(PUBLIC)
    return [t.path(tid, k) for k in ks]


def drop_cache(files: list[Path], args) -> None:
    """Cold page cache for these files: fadvise DONTNEED (they are fsynced, so clean), and
    drop_caches on top if asked (and allowed)."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if args.drop_caches:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            if "drop_caches" not in RESULTS["notes"]:
                RESULTS["notes"].append(f"drop_caches refused ({e}); fadvise only")
            args.drop_caches = False


def raw_read(files: list[Path], threads: int) -> dict:
    """Plain reads of whole files, ``threads`` at a time, in order: the disk's raw rate."""
    buf_size = max(p.stat().st_size for p in files)
    bufs = threading.local()

    def read(p: Path) -> int:
        b = getattr(bufs, "b", None)
        if b is None:
            b = bufs.b = bytearray(buf_size)
        with open(p, "rb", buffering=0) as f:
            return f.readinto(b)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        total = sum(ex.map(read, files))
    dt = time.perf_counter() - t0
    return {"bytes": total, "s": dt, "GBps": total / dt / 1e9}


def fresh_g1(eng) -> None:
    assert eng.block_manager.reset_prefix_cache(), "a request still holds G1 blocks"


def rand_prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(256, vocab, (n,), generator=g).tolist()


def save_results(args) -> None:
    out = Path(os.environ.get("OUT") or "out")
    out.mkdir(parents=True, exist_ok=True)
    RESULTS["elapsed_s"] = time.perf_counter() - T_START
    (out / "gpu_store.json").write_text(json.dumps(RESULTS, indent=1, default=str))


# ---- phases ------------------------------------------------------------------------------


def phase_env(args, eng) -> dict:
    env = {
        "shape": SHAPE,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "block_bytes": eng.runner.kv_cache[0].nbytes,
        "kv_blocks_g1": eng.runner.num_blocks,
        "root": str(args.root),
    }
    import cryptography

    env["cryptography"] = cryptography.__version__
    try:
        import zstandard

        env["zstandard"] = zstandard.__version__
    except ImportError:
        env["zstandard"] = None
    for cmd, k in (
        (["df", "-hT", str(args.root)], "df"),
        (["findmnt", "-T", str(args.root)], "mount"),
    ):
        with contextlib.suppress(Exception):
            env[k] = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    with contextlib.suppress(Exception):
        env["meminfo"] = Path("/proc/meminfo").read_text().splitlines()[:2]
    if GPU:
        import triton

        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["triton"] = triton.__version__
        with contextlib.suppress(Exception):
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
            ).stdout.strip()  # fmt: skip
    # raw host->device: one 32K prompt's KV bytes, as one copy and as per-block copies
    bb = eng.runner.kv_cache[0].nbytes
    nblk = max(args.sizes) // eng.config.block_size
    if GPU:
        host = torch.empty((nblk, bb), dtype=torch.uint8, pin_memory=True)
        host.random_(0, 255)
        dev = torch.empty((nblk, bb), dtype=torch.uint8, device=DEV)
        pageable = torch.empty((nblk, bb), dtype=torch.uint8)
        pageable.copy_(host)
        res = {}
        for name, fn in (
            ("pinned_one_copy", lambda: dev.copy_(host, non_blocking=True)),
            ("pinned_per_block", lambda: [dev[i].copy_(host[i], non_blocking=True) for i in range(nblk)]),
            ("pageable_one_copy", lambda: dev.copy_(pageable)),
        ):  # fmt: skip
            ts = []
            for _ in range(4):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                ts.append(time.perf_counter() - t0)
            res[name] = nblk * bb / min(ts[1:]) / 1e9
        env["h2d_GBps"] = res
        env["layered_landing"] = _landing_speed(eng, host, dev)
        del host, dev, pageable
        torch.cuda.empty_cache()
    log("env", json.dumps(env, default=str)[:1500])
    return env


def _landing_speed(eng, host: torch.Tensor, dev: torch.Tensor) -> dict:
    """The layer-by-layer landing kernel (kvgrid.store.landing) over the same bytes as the
    raw copies, into blocks in reverse order: bit-exact check, then device-timed GB/s."""
    from kvgrid.store.landing import land_layers

    shape, dt = eng.runner.kv_cache.shape[1:], eng.runner.kv_cache.dtype
    n = host.shape[0]
    hb, db = host.view(dt).view(n, *shape), dev.view(dt).view(n, *shape)
    si, di = list(range(n)), list(range(n - 1, -1, -1))
    stream = torch.cuda.Stream()

    def land():  # one landing, to completion; and the host time its issue took
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            landing = land_layers(hb, si, db, di)
        issue_s = time.perf_counter() - t0
        landing.synchronize()
        return landing, issue_s

    dev.zero_()
    land()
    exact = bool(torch.equal(dev.flip(0).cpu(), host))  # as bytes: random bits hold NaNs
    runs = [land() for _ in range(4)][1:]
    secs = [lnd.device_seconds() for lnd, _ in runs]
    host_s = [h for _, h in runs]
    last = runs[-1][0]
    first_layer = last.start.elapsed_time(last.events[0]) / 1e3
    from kvgrid.store import landing_kernel

    default, by_programs = landing_kernel.MAX_PROGRAMS, {}
    for cap in (8, 16, 32, 48, 96, 1 << 20):
        landing_kernel.MAX_PROGRAMS = cap
        best = min(land()[0].device_seconds() for _ in range(3))
        by_programs[cap] = round(n * host.shape[1] / best / 1e9, 2)
    landing_kernel.MAX_PROGRAMS = default
    return {
        "exact": exact,
        "GBps": n * host.shape[1] / min(secs) / 1e9,
        "first_layer_s": first_layer,
        "all_s": min(secs),
        "host_issue_s": min(host_s),
        "programs": default,
        "GBps_by_programs": by_programs,
    }


def _compare(ref: dict, got: dict) -> dict:
    lp_equal = ref["logprobs"] == got["logprobs"]
    return {"tokens_equal": ref["tokens"] == got["tokens"], "logprobs_equal": lp_equal}


def _kv_exact(eng, ks: list[bytes], snap: dict[bytes, torch.Tensor]) -> int:
    bm, kv = eng.block_manager, eng.runner.kv_cache
    return sum(1 for k in ks if k in bm.cached and torch.equal(kv[bm.cached[k]], snap[k]))


def phase_correct(args, eng, root: Path) -> dict:
    n = min(8192, max(args.sizes))
    prompt = rand_prompt(n, eng.model_config.vocab_size, seed=11)
    ks = prompt_keys(eng, prompt)
    attach(eng, None)
    fresh_g1(eng)
    cold = run_one(eng, prompt, max_tokens=8)
    bm = eng.block_manager
    snap = {k: eng.runner.kv_cache[bm.cached[k]].clone() for k in ks}
    g1 = run_one(eng, prompt, max_tokens=8)  # over G1's prefix cache: the reference path
    assert g1["cached"] == len(ks) * eng.config.block_size
    out: dict = {"prompt_tokens": n, "blocks": len(ks), "cold_vs_g1": _compare(cold, g1)}
    if cold["logprobs"] and g1["logprobs"]:
        a, b = cold["logprobs"][0], g1["logprobs"][0]
        common = set(a) & set(b)
        out["cold_vs_g1"]["first_logprob_max_abs_diff"] = max(
            (abs(a[t] - b[t]) for t in common), default=None
        )
    # populate through write-through: recompute with the store attached, then one idle step
    store = make_store(eng, root, "correct", args, g3=True, write_through=True)
    conn = attach(eng, store)
    fresh_g1(eng)
    again = run_one(eng, prompt, max_tokens=8)
    eng.step()
    assert store.flush(600)
    out["recompute_deterministic"] = {
        **_compare(cold, again),
        "kv_exact_blocks": _kv_exact(eng, ks, snap),
    }
    out["write_through_blocks_in_G3"] = sum(
        1 for t in store.tier("G3").created_many(tenant_id(PUBLIC), ks) if t
    )
    g4 = make_store(eng, root, "correct4", args, g4=True)
    checks = {}
    for tier, st in (("G2", store), ("G3", store), ("G4", g4), ("G3-split", store)):
        if st is g4 and tier == "G4":
            conn = attach(eng, g4)
            save_from_g1(eng, conn, ks)
        elif st is store and conn.store is not store:
            conn = attach(eng, store)
        fresh_g1(eng)
        if tier != "G2":
            st.g2.clear()
        conn.prefill_tokens_per_s = None  # load everything
        if tier == "G3-split":
            # force a half/half split: recompute speed equal to the tier's measured speed,
            # and the load believed to take at least 0.5 s, so that a split pays for its
            # fixed overhead (SPLIT_OVERHEAD_S) even where the load is a few milliseconds
            kv_bytes = len(ks) * conn.block_bytes
            st.bandwidth["G3"] = min(st.bandwidth.get("G3") or float("inf"), kv_bytes / 0.5)
            conn.prefill_tokens_per_s = eng.config.block_size / conn.block_load_seconds("G3")
        r = run_one(eng, prompt, max_tokens=8)
        plan = conn.load_plan(PUBLIC, len(ks))
        checks[tier] = {
            **_compare(g1, r),
            "cached_tokens": r["cached"],
            "kv_exact_blocks": _kv_exact(eng, ks, snap),
            "plan": [plan.compute_blocks, plan.load_blocks],
            "tokens_equal_cold": r["tokens"] == cold["tokens"],
        }
        log("correct", tier, checks[tier])
    out["loads"] = checks
    ok = all(
        c["tokens_equal"]
        and c["logprobs_equal"]
        and c["cached_tokens"] == c["plan"][1] * eng.config.block_size  # loaded, not recomputed
        for c in checks.values()
    ) and all(checks[t]["kv_exact_blocks"] == len(ks) for t in ("G2", "G3", "G4"))
    out["pass"] = ok
    attach(eng, None)
    store.close()
    g4.close()
    shutil.rmtree(root / "correct", ignore_errors=True)
    shutil.rmtree(root / "correct4", ignore_errors=True)
    return out


def _tier_runs(eng, conn, store, llog, prompt, ks, tier, args, ref, cache: str, reps: int) -> dict:
    """Forced full loads of ``prompt`` from ``tier`` (G2 emptied first for lower tiers)."""
    files = object_files(store, tier, ks) if tier != "G2" else []
    ttfts, loads, starts, gcs, quiet, ok = [], [], [], [], [], True
    for _ in range(reps):
        fresh_g1(eng)
        if tier != "G2":
            store.g2.clear()
            if cache == "cold":
                drop_cache(files, args)
        conn.prefill_tokens_per_s = None  # speed unknown to the store: load it all
        llog.take()
        r = run_one(eng, prompt)
        recs = llog.take()
        ok &= r["cached"] == len(ks) * eng.config.block_size and r["tokens"] == ref["tokens"]
        ttfts.append(r["ttft_s"])
        starts.append(r["forward_starts_s"] + r["load_submits_s"][:1])
        gcs.append(r["gc_pauses"])
        quiet.append({k: r["quiesce"][k] for k in ("s", "busy_cores")})
        if recs:
            for k in ("t_call", "t_issued"):  # when the layered load was called, and issued
                if k in recs[0]:
                    recs[0][k] = round(recs[0][k] - r["t0"], 4)
            loads.append(recs[0])
    best = min(loads, key=lambda x: x["s"]) if loads else None
    obj = sum(p.stat().st_size for p in files) if files else (best or {}).get("bytes", 0)
    res = {
        "ttft_s": med(ttfts),
        "ttft_all": ttfts,
        "load_s": best["s"] if best else None,
        "kv_GBps": best["bytes"] / best["s"] / 1e9 if best else None,
        "object_GBps": obj / best["s"] / 1e9 if best else None,
        "object_bytes": obj,
        "exact_and_complete": ok,
        "forward_starts_s": starts,  # the first two forwards, then the load's submission
        "gc_pauses": gcs,
        "quiesce": quiet,  # per rep: seconds spent getting quiet, process CPU (cores) then
        "layered_issue_s": [[r.get("t_call"), r.get("t_issued")] for r in loads if "t_call" in r],
        "layered": bool(best and best.get("layered")),
    }
    if files:
        if cache == "cold":
            drop_cache(files, args)
        res["raw"] = raw_read(files, args.load_workers)
        res["of_raw"] = res["object_GBps"] / res["raw"]["GBps"] if best else None
    return res


def phase_ttft(args, eng, root: Path) -> dict:
    global PROFILE_NEXT
    out: dict = {}
    vocab = eng.model_config.vocab_size
    variants = [
        # name, store kwargs, tier
        ("G3 enc zstd", {"g3": True}, "G3"),
        ("G3 enc none", {"g3": True, "codec": "none"}, "G3"),
        ("G3 plain none", {"g3": True, "codec": "none", "encrypt": False}, "G3"),
        ("G3 plain zstd", {"g3": True, "encrypt": False}, "G3"),
        ("G4 enc zstd", {"g4": True}, "G4"),
    ]
    for n in args.sizes:
        prompt = rand_prompt(n, vocab, seed=100 + n)
        ks = prompt_keys(eng, prompt)
        res: dict = {"prompt_tokens": n, "blocks": len(ks)}
        attach(eng, None)
        fresh_g1(eng)
        run_one(eng, prompt)  # warm-up (kernels for this length)
        rec = []
        steplog = None
        for i in range(3):
            fresh_g1(eng)
            steplog = StepLog(eng, 0.0) if i == 2 else None
            PROFILE_NEXT = args.profile_auto and i == 2
            r = run_one(eng, prompt, steplog=steplog)
            PROFILE_NEXT = False
            rec.append(r["ttft_s"])
            if r["first_step_profile"]:
                log("recompute's first step, profiled\n" + r["first_step_profile"])
        ref = run_one(eng, prompt)  # over G1: the tokens every load must reproduce
        res["recompute"] = {"ttft_s": med(rec), "all": rec, "per_step": steplog.close()}
        res["g1_hit_ttft_s"] = ref["ttft_s"]
        log(f"ttft {n}: recompute {res['recompute']}, G1 hit {ref['ttft_s']:.4f}s")
        # G2
        store = make_store(eng, root, "g2", args)
        conn = attach(eng, store)
        llog = LoadLog(store)
        save_from_g1(eng, conn, ks)
        # the engine's default (layer by layer where the loader can), then block by block
        default = eng.scheduler.loader.layered
        for name, layered in (("G2", default), ("G2 block", False)):
            eng.scheduler.loader.layered = layered
            res[name] = _tier_runs(eng, conn, store, llog, prompt, ks, "G2", args, ref, "warm", 3)
            res[name]["raw_pinned_GBps"] = RESULTS["phases"].get("env", {}).get("h2d_GBps", {})
            if name == "G2" and n == max(args.sizes):
                PROFILE_NEXT = True
                fresh_g1(eng)
                r = run_one(eng, prompt)
                PROFILE_NEXT = False
                res[name]["profiled_rep"] = {
                    k: r[k] for k in ("ttft_s", "gc_pauses", "load_submits_s", "first_step_profile")
                }
                log("admission profile\n" + (r["first_step_profile"] or ""))
            log(f"ttft {n} {name}", {k: v for k, v in res[name].items() if k != "raw_pinned_GBps"})
        attach(eng, None)
        store.close()
        for name, kw, tier in variants if args.disk_tiers else ():
            if (
                time.perf_counter() - T_START > args.budget_s * 0.55
                and n == max(args.sizes)
                and name != "G3 enc zstd"
            ):
                RESULTS["notes"].append(f"ttft {n} {name}: skipped (time budget)")
                continue
            store = make_store(eng, root, "v", args, **kw)
            conn = attach(eng, store)
            llog = LoadLog(store)
            t0 = time.perf_counter()
            save_from_g1(eng, conn, ks)
            write_s = time.perf_counter() - t0
            v = {"write_s": write_s}
            for cache in ("cold", "warm"):
                v[cache] = _tier_runs(eng, conn, store, llog, prompt, ks, tier, args, ref, cache, 2)
            v["codec_counts"] = _codecs(store, tier, ks)
            res[name] = v
            log(f"ttft {n} {name}", json.dumps(v, default=str)[:600])
            if name == "G3 enc zstd":
                # the engine's own choice on this disk, cold, with measured numbers; the
                # first run plans without a measured load start (nothing split before it)
                store.bandwidth[tier] = v["cold"]["kv_GBps"] * 1e9
                conn.prefill_tokens_per_s = n / res["recompute"]["ttft_s"]
                autos = []
                for rep in range(args.auto_reps):
                    PROFILE_NEXT = args.profile_auto and rep == args.auto_reps - 1
                    fresh_g1(eng)
                    store.g2.clear()
                    drop_cache(object_files(store, tier, ks), args)
                    start_s = conn.load_start_s
                    misses = store.metrics.total("misses", tier=tier, reason="deadline")
                    steplog = StepLog(eng, 0.0)
                    r = run_one(eng, prompt, steplog=steplog)
                    PROFILE_NEXT = False
                    plan = conn.load_plan(PUBLIC, len(ks))
                    autos.append({
                        "ttft_s": r["ttft_s"], "plan": [plan.compute_blocks, plan.load_blocks],
                        "expected_s": plan.expected_s, "planned_load_start_s": start_s,
                        "exact": r["tokens"] == ref["tokens"],
                        "cut_by_deadline": store.metrics.total("misses", tier=tier, reason="deadline") - misses,
                        # where the time went: forwards and load submits from arrival, the
                        # load's own wall time, collections
                        "forward_starts_s": r["forward_starts_s"], "load_submits_s": r["load_submits_s"],
                        "loads": [{k: x[k] for k in ("blocks", "asked", "s") if k in x} for x in llog.take()],
                        "gc_pauses": r["gc_pauses"], "steps": r["steps"],
                        "per_step": steplog.close(),
                        "first_step_profile": r["first_step_profile"],
                    })  # fmt: skip
                    if r["first_step_profile"]:
                        log("split's first step, profiled\n" + r["first_step_profile"])
                    log(
                        f"ttft {n} G3 auto cold",
                        {k: x for k, x in autos[-1].items() if k != "per_step"},
                    )
                res["G3 auto cold"] = {"ttft_s": med([a["ttft_s"] for a in autos]), "runs": autos,
                                       "plan": autos[-1]["plan"]}  # fmt: skip
                if n == max(args.sizes):
                    keep = root / "keep_g3"
                    shutil.rmtree(keep, ignore_errors=True)
                    attach(eng, None)
                    store.close()
                    shutil.move(str(root / "v" / "g3"), str(keep))  # the split phase reuses it
                    shutil.rmtree(root / "v", ignore_errors=True)
                    continue
            attach(eng, None)
            store.close()
            shutil.rmtree(root / "v", ignore_errors=True)
        out[str(n)] = res
        save_results(args)
    return out


def _codecs(store: ContextStore, tier: str, ks: list[bytes]) -> dict:
    from kvgrid.store.codec import NAMES
    from kvgrid.store.object import read_header

    counts: dict[str, int] = {}
    t = store.tier(tier)
    for k in ks:
        head = t.read_prefix(tenant_id(PUBLIC), k, 4096)
        if head:
            c = NAMES.get(read_header(head).codec, "?")
            counts[c] = counts.get(c, 0) + 1
    return counts


def phase_split(args, eng, root: Path) -> dict:
    n = max(args.sizes)
    ttft = RESULTS["phases"]["ttft"][str(n)]
    prompt = rand_prompt(n, eng.model_config.vocab_size, seed=100 + n)
    ks = prompt_keys(eng, prompt)
    keep = root / "keep_g3"
    if not keep.exists():
        raise RuntimeError("the ttft phase left no G3 directory to throttle")
    recompute = ttft["recompute"]["ttft_s"]
    kv_bytes = len(ks) * eng.runner.kv_cache[0].nbytes
    even = kv_bytes / recompute  # bytes/s at which loading takes as long as recomputing
    attach(eng, None)
    fresh_g1(eng)
    ref = run_one(eng, prompt)
    out = {"recompute_s": recompute, "even_GBps": even / 1e9}
    for label, factor in (("half", 0.5), ("even", 1.0)):
        bw = even * factor
        store = make_store(eng, root, "thr", args, throttle=bw, throttle_dir=keep)
        conn = attach(eng, store)
        llog = LoadLog(store)
        row = {"throttle_GBps": bw / 1e9}
        # forced load (warm page cache: the throttle is the disk)
        for _ in range(2):
            raw_read(object_files(store, "G3", ks), args.load_workers)  # warm the cache
        fresh_g1(eng)
        store.g2.clear()
        conn.prefill_tokens_per_s = None
        r = run_one(eng, prompt)
        rec = llog.take()
        row["load"] = {"ttft_s": r["ttft_s"], "kv_GBps": rec[0]["bytes"] / rec[0]["s"] / 1e9 if rec else None,
                       "exact": r["tokens"] == ref["tokens"]}  # fmt: skip
        # the engine's choice, from measured numbers (the forced load set the bandwidth)
        store.bandwidth["G3"] = rec[0]["bytes"] / rec[0]["s"] if rec else bw
        autos = []
        for _ in range(2):
            fresh_g1(eng)
            store.g2.clear()
            conn.prefill_tokens_per_s = n / recompute
            r = run_one(eng, prompt)
            plan = conn.load_plan(PUBLIC, len(ks))
            autos.append({"ttft_s": r["ttft_s"], "plan": [plan.compute_blocks, plan.load_blocks],
                          "expected_s": plan.expected_s, "exact_vs_g1": r["tokens"] == ref["tokens"],
                          "cached": r["cached"]})  # fmt: skip
        row["auto"] = autos
        row["auto_ttft_s"] = med([a["ttft_s"] for a in autos])
        row["auto_over_recompute"] = row["auto_ttft_s"] / recompute
        row["auto_over_load"] = row["auto_ttft_s"] / row["load"]["ttft_s"]
        out[label] = row
        log("split", label, json.dumps(row, default=str))
        attach(eng, None)
        store.close()
    return out


def phase_enc(args, eng, root: Path) -> dict:
    """Encryption's cost on G3 as an interleaved A/B: the same prompt stored encrypted and
    plain (codec none) in two directories, loaded alternately (cold, then warm) ``--enc-reps``
    times each. A cold disk's speed swings by 10-20% between back-to-back rows of the ttft
    phase; alternating the two spreads that swing over both."""
    out: dict = {}
    vocab = eng.model_config.vocab_size
    for n in args.sizes:
        prompt = rand_prompt(n, vocab, seed=100 + n)
        ks = prompt_keys(eng, prompt)
        attach(eng, None)
        fresh_g1(eng)
        run_one(eng, prompt)
        ref = run_one(eng, prompt)  # over G1: the tokens every load must reproduce
        stores = {}
        for name, enc in (("enc", True), ("plain", False)):
            store = make_store(eng, root, f"ab_{name}", args, g3=True, codec="none", encrypt=enc)
            save_from_g1(eng, attach(eng, store), ks)
            stores[name] = store
        runs: dict = {name: {"cold": [], "warm": []} for name in stores}
        for rep in range(args.enc_reps):
            for name in ("enc", "plain") if rep % 2 == 0 else ("plain", "enc"):
                store = stores[name]
                conn, llog = attach(eng, store), LoadLog(store)
                for cache in ("cold", "warm"):
                    r = _tier_runs(eng, conn, store, llog, prompt, ks, "G3", args, ref, cache, 1)
                    assert r["exact_and_complete"], f"{name} {cache}: load not exact"
                    runs[name][cache].append(
                        {k: r[k] for k in ("kv_GBps", "of_raw")} | {"raw_GBps": r["raw"]["GBps"]}
                    )
        attach(eng, None)
        for store in stores.values():
            store.close()
        res: dict = {"runs": runs}
        for cache in ("cold", "warm"):
            e = [x["kv_GBps"] for x in runs["enc"][cache]]
            p = [x["kv_GBps"] for x in runs["plain"][cache]]
            res[cache] = {
                "enc_GBps": med(e),
                "plain_GBps": med(p),
                "cost": 1 - med(e) / med(p),  # of throughput, medians of each
                "pair_costs": [1 - a / b for a, b in zip(e, p)],
            }
        out[str(n)] = res
        log(f"enc {n}", json.dumps({c: res[c] for c in ("cold", "warm")}, default=str))
    return out


def replay_workload(vocab: int, max_input: int = 16384):
    """296 requests: the first 20 minutes of the Mooncake conversation trace, one
    conversation in 12 (kept whole: all its turns), 512-token hash blocks shrunk to 128
    tokens, inputs capped at 16K and outputs at 64 tokens, time sped up 20x (60 s)."""
    from kvgrid.bench.mooncake import load_mooncake

    return load_mooncake(str(DATA), tokens_per_block=128, speed=20.0, max_input_tokens=max_input,
                         max_output_tokens=64, vocab_size=vocab)  # fmt: skip


# stream stalls by kind (transfer.stream_wait) -> StepLog column. The engine's stream waits
# for write-back copies and landings; the loader's stream (fence_ms) for the write-backs of
# the blocks a load overwrites and of the G2 slots it reads: that delays a landing, and the
# engine's stream only through the landing.
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


def _replay_run(eng, wl, cap_s: float, window: tuple[float, float] | None = None) -> dict:
    reqs = sorted(wl.requests, key=lambda r: r.arrival_s)
    c0 = dict(eng.counters)
    loaded0 = eng.scheduler.store_loaded_tokens
    pre0 = eng.scheduler.num_preemptions
    GC_PAUSES.clear()
    step_s, steps = 0.0, 0
    t0 = time.perf_counter()
    arrive, first, done, cached = {}, {}, {}, {}
    out_tokens = 0
    i = 0
    steplog = StepLog(eng, t0)
    kw = KernelWindow(*window) if window and GPU else None
    try:
        while i < len(reqs) or eng.has_unfinished_requests():
            now = time.perf_counter() - t0
            if kw is not None:
                kw.tick(now)
            if now > cap_s:
                for rid in list(eng.seqs):
                    eng.abort_request(rid)
                break
            while i < len(reqs) and reqs[i].arrival_s <= now:
                r = reqs[i]
                eng.add_request(r.request_id, r.prompt_token_ids,
                                SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True))  # fmt: skip
                arrive[r.request_id] = t0 + r.arrival_s
                i += 1
            if not eng.has_unfinished_requests():
                time.sleep(max(0.0, min(0.05, reqs[i].arrival_s - now)) if i < len(reqs) else 0)
                continue
            steplog.begin()
            t_step = time.perf_counter()
            outs = eng.step()
            ts = time.perf_counter()
            steplog.end(ts)
            step_s += ts - t_step
            steps += 1
            for o in outs:
                if o.new_token_ids:
                    out_tokens += len(o.new_token_ids)
                    if o.request_id not in first:
                        first[o.request_id] = ts
                        cached[o.request_id] = o.num_cached_tokens
                if o.finished:
                    done[o.request_id] = ts
            eng.drain_kv_events()
    finally:
        if kw is not None:
            kw.stop(time.perf_counter() - t0)
        per_step = steplog.close()
    end = max(done.values()) if done else time.perf_counter()
    ttft = [first[r] - arrive[r] for r in first]
    c1 = eng.counters
    q = c1["prefix_cache_queries"] - c0["prefix_cache_queries"]
    h = c1["prefix_cache_hits"] - c0["prefix_cache_hits"]
    return {
        "requests": len(reqs),
        "completed": len(done),
        "elapsed_s": end - t0,
        "output_tok_s": out_tokens / (end - t0),
        "requests_per_s": len(done) / (end - t0),
        "prompt_tok_s": (c1["prompt_tokens"] - c0["prompt_tokens"]) / (end - t0),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p90_s": pct(ttft, 90),
        "ttft_p99_s": pct(ttft, 99),
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        "hit_rate": h / q if q else None,
        "store_loaded_tokens": eng.scheduler.store_loaded_tokens - loaded0,
        "preemptions": eng.scheduler.num_preemptions - pre0,
        # the engine thread: all its step() time (the store's share: store.engine_thread)
        "engine_steps": steps,
        "engine_step_s": step_s,
        "gc_pause_s": sum(b - a for _, a, b in GC_PAUSES),
        "gc_collections": [sum(1 for g, _, _ in GC_PAUSES if g == gen) for gen in range(3)],
        # per request, in arrival order: which requests make the TTFT tail, and whether
        # they were served from cache (arrival s, prompt tokens, cached tokens, TTFT s)
        "per_request": [
            _request_row(r, t0, arrive, first, cached) for r in reqs if r.request_id in first
        ],
        # per engine step(), column by column (StepLog): where step time goes
        "per_step": per_step,
        "step_summary": step_summary(per_step),
        "kernel_window": kw.summary if kw is not None else None,
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


def _request_row(r, t0: float, arrive: dict, first: dict, cached: dict) -> list:
    rid = r.request_id
    ttft = first[rid] - arrive[rid]
    return [round(arrive[rid] - t0, 3), len(r.prompt_token_ids), cached.get(rid), round(ttft, 4)]


# replay runs: the same offered load without and with the store, and store variants that
# test where the store's cost to the engine's steps comes from (the GIL's switch interval,
# fewer background write threads)
REPLAY_RUNS = {
    "no_store": {},
    "store": {"store": True},
    "store_si": {"store": True, "switch_s": 2e-4},
    "store_w4": {"store": True, "io_workers": 4},
}


def phase_replay(args, eng, root: Path) -> dict:
    wl = replay_workload(eng.model_config.vocab_size, args.replay_max_input)
    if args.replay_limit:
        wl = dataclasses.replace(wl, requests=wl.requests[: args.replay_limit])
    wl.materialize()
    out = {"workload": wl.stats(), "theoretical_hit_rate": wl.theoretical_hit_rate(eng.config.block_size),
           "g1_blocks": args.replay_g1_blocks}  # fmt: skip
    with_budget(eng, args.replay_budget)
    bm = eng.block_manager
    attach(eng, None)
    fresh_g1(eng)
    # G1 held down to replay_g1_blocks: the rest of the pool is taken out of the free list
    held = [
        bm.free.popitem(last=False)[0] for _ in range(max(0, bm.num_blocks - args.replay_g1_blocks))
    ]
    try:
        warm = dataclasses.replace(wl, requests=[dataclasses.replace(r, arrival_s=0.0, request_id=f"w{j}")
                                                 for j, r in enumerate(wl.requests[-16:])])  # fmt: skip
        _replay_run(eng, warm, 120)  # compiles and warms kernels for these shapes
        for name in args.replay_runs:
            run = REPLAY_RUNS[name]
            fresh_g1(eng)
            store = None
            if run.get("store"):
                store = make_store(eng, root, "replay", args, g2_gib=args.replay_g2_gib, g3=True,
                                   admit={"G2": 1, "G3": 2, "G4": 2}, io_queue=64,
                                   io_workers=run.get("io_workers", args.load_workers))  # fmt: skip
            conn = attach(eng, store)
            quiet = quiesce(store)
            tune_gc()  # as a worker process does once built; undone when the store goes
            switch = sys.getswitchinterval()
            sys.setswitchinterval(run.get("switch_s", switch))
            try:
                with HostProbe(store) as probe:
                    r = _replay_run(eng, wl, args.replay_cap_s, args.replay_profile)
            finally:
                sys.setswitchinterval(switch)
            r["variant"] = run
            r["quiesce"] = quiet
            r["host_probe"] = probe.result()
            if conn is not None:
                st = conn.stats()
                c = st["counters"]
                r["store"] = {"hits": {k: v for k, v in c.get("hits", {}).items()},
                              "saved_blocks": conn.saved_blocks, "saved_bytes": conn.saved_bytes,
                              "loaded_blocks": conn.loaded_blocks,
                              "tier_bytes_per_s": conn.tier_bytes_per_s, "io": st["io"],
                              # engine-thread seconds and calls: save (write-back), lookup
                              # (admission), load_submit, prefetch, note_admitted
                              "engine_thread": st["engine_thread"],
                              "g2_writebacks": c.get("writebacks", {}),
                              "writes_dropped": c.get("writes_dropped", {}),
                              "misses": c.get("misses", {})}  # fmt: skip
            out[name] = r
            log(
                "replay",
                name,
                json.dumps({k: v for k, v in r.items() if k != "per_step"}, default=str),
            )
            attach(eng, None)
            if store is not None:
                store.close()
            gc.unfreeze()  # the next run's quiesce collects this run's store
            save_results(args)
    finally:
        for b in held:
            bm.free[b] = None
        with_budget(eng, max(args.sizes) + 64)
    shutil.rmtree(root / "replay", ignore_errors=True)
    return out


# ---- summary -----------------------------------------------------------------------------


def summary() -> str:
    P = RESULTS["phases"]
    lines = []
    env = P.get("env", {})
    device = env.get("device") or (torch.cuda.get_device_name() if GPU else "cpu")
    lines.append(f"device {device}  shape {SHAPE}")
    if "h2d_GBps" in env:
        lines.append(
            "raw host->GPU GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in env["h2d_GBps"].items())
        )
    land = env.get("layered_landing")
    if land:
        lines.append(
            f"layer-by-layer landing kernel: {land['GBps']:.1f} GB/s, exact {land['exact']}, "
            f"first layer after {land['first_layer_s'] * 1e3:.1f} ms of {land['all_s'] * 1e3:.1f} ms, "
            f"issued in {land['host_issue_s'] * 1e3:.1f} ms of host time, {land['programs']} programs; "
            f"GB/s by programs {land['GBps_by_programs']}"
        )
    c = P.get("correct")
    if c:
        lines.append(f"correctness ({c['prompt_tokens']} tokens): {'PASS' if c['pass'] else 'FAIL'}; "
                     + "; ".join(f"{t}: tokens {v['tokens_equal']}, logprobs {v['logprobs_equal']}, KV exact {v['kv_exact_blocks']}/{c['blocks']}, plan {v['plan']}"
                                 for t, v in c["loads"].items()))  # fmt: skip
    t = P.get("ttft", {})
    if t:
        lines.append("")
        lines.append(
            "| prompt | source | cache | TTFT s | x faster than recompute | load KV GB/s | object GB/s | raw GB/s | of raw |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for n, res in t.items():
            rec = res["recompute"]["ttft_s"]
            lines.append(f"| {n} | recompute | - | {rec:.3f} | 1.0 | | | | |")
            for name in ("G2", "G2 block"):
                g2 = res.get(name)
                if not g2:
                    continue
                raw = (g2.get("raw_pinned_GBps") or {}).get("pinned_one_copy")
                ofr = f"{g2['kv_GBps'] / raw:.0%}" if raw and g2["kv_GBps"] else ""
                how = "pinned, layer by layer" if g2.get("layered") else "pinned, block by block"
                lines.append(
                    f"| {n} | {name} | {how} | {g2['ttft_s']:.3f} | {rec / g2['ttft_s']:.1f} | {g2['kv_GBps'] or 0:.1f} | | {raw or 0:.1f} | {ofr} |"
                )
            for name, v in res.items():
                if not isinstance(v, dict) or "cold" not in v:
                    continue
                for cache in ("cold", "warm"):
                    x = v[cache]
                    lines.append(
                        f"| {n} | {name} | {cache} | {x['ttft_s']:.3f} | {rec / x['ttft_s']:.2f} | {x['kv_GBps'] or 0:.2f} | {x['object_GBps'] or 0:.2f} | {x['raw']['GBps']:.2f} | {x['of_raw'] or 0:.0%} |"
                    )
            a = res.get("G3 auto cold")
            if a:
                runs = ", ".join(
                    f"{x['ttft_s']:.3f} {x['plan']}{' cut' if x['cut_by_deadline'] else ''}"
                    for x in a["runs"]
                )
                lines.append(
                    f"| {n} | G3 auto (engine's choice; runs: {runs}) | cold | {a['ttft_s']:.3f} | {rec / a['ttft_s']:.2f} | | | | |"
                )
        for n, res in t.items():
            e, p = res.get("G3 enc none"), res.get("G3 plain none")
            if e and p:
                for cache in ("cold", "warm"):
                    # a cold disk's speed swings between two back-to-back rows; each row's
                    # own raw read (same files, same threads, just before) takes that out
                    ec, pc = e[cache], p[cache]
                    lines.append(
                        f"encryption cost, G3 {n} {cache}: {1 - ec['kv_GBps'] / pc['kv_GBps']:+.1%} of throughput, "
                        f"{1 - ec['of_raw'] / pc['of_raw']:+.1%} against each row's raw read"
                    )
            z, nz = res.get("G3 enc zstd"), res.get("G3 enc none")
            if z and nz:
                lines.append(
                    f"codec zstd vs none, G3 {n}: objects {z['codec_counts']}, warm {z['warm']['kv_GBps']:.2f} vs {nz['warm']['kv_GBps']:.2f} GB/s"
                )
    s = P.get("split")
    if s:
        lines.append("")
        lines.append(
            f"| throttled G3 ({s.get('even_GBps', 0):.2f} GB/s = break-even) | recompute s | forced load s | engine's choice s (plan) | vs recompute | vs load |"
        )
        lines.append("|---|---|---|---|---|---|")
        for label in ("half", "even"):
            r = s.get(label)
            if r:
                lines.append(
                    f"| {label}: {r['throttle_GBps']:.2f} GB/s | {s['recompute_s']:.3f} | {r['load']['ttft_s']:.3f} | {r['auto_ttft_s']:.3f} ({r['auto'][0]['plan']}) | {r['auto_over_recompute']:.2f}x | {r['auto_over_load']:.2f}x |"
                )
    for n, res in (P.get("enc") or {}).items():
        for cache in ("cold", "warm"):
            c = res[cache]
            pairs = ", ".join(f"{x:+.1%}" for x in c["pair_costs"])
            lines.append(
                f"encryption A/B, G3 {n} {cache}: {c['enc_GBps']:.2f} vs {c['plain_GBps']:.2f} GB/s "
                f"(medians), cost {c['cost']:+.1%}; pairs {pairs}"
            )
    r = P.get("replay")
    runs = [n for n in REPLAY_RUNS if r and n in r]
    if r and runs:
        lines.append("")
        th = r["theoretical_hit_rate"]["token_weighted"]
        lines.append(
            f"replay: {r['workload']['requests']} requests, {r['workload']['duration_s']:.0f}s, G1 {r['g1_blocks']} blocks; theoretical hit rate {th:.1%}"
        )
        lines.append(
            "| run | out tok/s | req/s | TTFT p50 s | TTFT p90 s | TTFT p99 s | hit rate | store tokens |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for name in runs:
            x = r[name]
            lines.append(
                f"| {name} | {x['output_tok_s']:.0f} | {x['requests_per_s']:.2f} | {x['ttft_p50_s']:.3f} | {x['ttft_p90_s']:.3f} | {x['ttft_p99_s']:.3f} | {x['hit_rate']:.1%} | {x['store_loaded_tokens']} |"
            )
        for name in runs:
            x = r[name]
            hp = x.get("host_probe") or {}
            st = x.get("store") or {}
            et = ", ".join(
                f"{k} {v['s']:.2f}s/{v['calls']}" for k, v in st.get("engine_thread", {}).items()
            )
            lines.append(
                f"{name}: engine step() {x.get('engine_step_s', 0):.1f}s over {x.get('engine_steps')} steps; "
                f"store on the engine thread: {et or '-'}; write-backs {st.get('saved_blocks', 0)} blocks "
                f"({st.get('saved_bytes', 0) / 1e9:.1f} GB) {st.get('g2_writebacks', {})}; "
                f"GIL probe late p50/p99/max {hp.get('late_ms_p50', 0):.2f}/{hp.get('late_ms_p99', 0):.2f}/{hp.get('late_ms_max', 0):.1f} ms "
                f"(share {hp.get('late_share') or 0:.1%}); write queue {hp.get('write_queue')}; "
                f"dropped {st.get('writes_dropped', {})}; gc {x.get('gc_pause_s', 0):.2f}s {x.get('gc_collections')}"
            )
        lines += _step_table({name: r[name].get("step_summary") for name in runs})
        for name in runs:
            kw = r[name].get("kernel_window")
            if kw and kw.get("events"):
                g = kw["main_gaps"]
                lines.append(
                    f"{name} device window {kw['window_s']} s (its stop stalled the engine {kw.get('stop_stall_s')} s: "
                    f"TTFTs after it are inflated): span {kw['span_ms']:.0f} ms, main stream busy "
                    f"{kw['busy_ms'].get(kw['main_stream'], 0):.0f} ms, any kernel {kw['any_kernel_busy_ms']:.0f} ms, "
                    f"gaps {g['ms']:.0f} ms ({g['over_0.1ms'][0]} over 0.1 ms: {g['over_0.1ms'][1]:.0f} ms); "
                    f"busy by stream {kw['busy_ms']}"
                )
                lines.append(
                    "   top kernels (ms): "
                    + "; ".join(f"{n[:48]} {c}x {ms}" for n, c, ms in kw["top_kernels"][:8])
                )
    for k, v in RESULTS["errors"].items():
        lines.append(f"ERROR {k}: {v.strip().splitlines()[-1]}")
    for note in RESULTS["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _step_table(runs: dict[str, dict | None]) -> list[str]:
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", default="env,correct,ttft,split,replay")
    ap.add_argument("--sizes", default="8192,32768")
    ap.add_argument("--root", default=os.environ.get("KVGRID_BENCH_DIR", "/tmp/kvgrid-store-bench"))
    ap.add_argument("--num-kv-blocks", type=int, default=1100 if GPU else None)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--g2-gib", type=float, default=6.0 if GPU else 0.5)
    ap.add_argument("--load-workers", type=int, default=min(12, os.cpu_count() or 2))
    ap.add_argument("--drop-all-caches", dest="drop_caches", action="store_true",
                    help="drop_caches too: the engine's code pages then fault in from disk "
                    "while the loads read it")  # fmt: skip
    ap.add_argument("--no-disk-tiers", dest="disk_tiers", action="store_false",
                    help="ttft phase: G2 only (skip the G3/G4 variants)")  # fmt: skip
    ap.add_argument("--replay-g1-blocks", type=int, default=1100 if GPU else 60)
    ap.add_argument("--replay-g2-gib", type=float, default=24.0 if GPU else 0.5)
    ap.add_argument("--replay-budget", type=int, default=8192)
    ap.add_argument("--replay-cap-s", type=float, default=150.0)
    ap.add_argument("--replay-limit", type=int, default=0, help="first N requests only (smoke)")
    ap.add_argument("--replay-max-input", type=int, default=16384 if GPU else 256)
    ap.add_argument("--replay-runs", default="no_store,store", help=f"of {','.join(REPLAY_RUNS)}")
    ap.add_argument("--replay-profile", default="",
                    help="start,end s of each run's device profile (CUDA activity), e.g. 20,28; "
                    "a diagnostic: its stop stalls the engine for seconds")  # fmt: skip
    ap.add_argument("--enc-reps", type=int, default=4, help="enc phase: loads per variant")
    ap.add_argument("--auto-reps", type=int, default=3, help="engine's-choice runs per size")
    ap.add_argument("--profile-auto", action="store_true",
                    help="cProfile the first step of the last recompute and engine's-choice runs")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip what would not fit")
    args = ap.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.replay_runs = args.replay_runs.split(",")
    if unknown := set(args.replay_runs) - set(REPLAY_RUNS):
        ap.error(f"unknown --replay-runs {sorted(unknown)}: choose from {sorted(REPLAY_RUNS)}")
    args.replay_profile = (
        tuple(float(x) for x in args.replay_profile.split(",")) if args.replay_profile else None
    )
    args.root = Path(args.root)
    shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True)
    if not GPU:
        args.drop_caches = False  # a shared machine: never drop everyone's page cache
    RESULTS["args"] = {k: str(v) for k, v in vars(args).items()}
    RESULTS["command"] = " ".join(sys.argv)
    phases = args.phases.split(",")
    eng = build_engine(args)
    trace_forwards(eng)
    fns = {
        "env": lambda: phase_env(args, eng),
        "correct": lambda: phase_correct(args, eng, args.root),
        "ttft": lambda: phase_ttft(args, eng, args.root),
        "split": lambda: phase_split(args, eng, args.root),
        "enc": lambda: phase_enc(args, eng, args.root),
        "replay": lambda: phase_replay(args, eng, args.root),
    }
    for ph in phases:
        if time.perf_counter() - T_START > args.budget_s:
            RESULTS["notes"].append(f"phase {ph}: skipped (time budget)")
            continue
        log(f"==== phase {ph}")
        try:
            RESULTS["phases"][ph] = fns[ph]()
        except Exception:
            RESULTS["errors"][ph] = traceback.format_exc()
            log(f"phase {ph} failed:\n{RESULTS['errors'][ph]}")
            with contextlib.suppress(Exception):
                attach(eng, None)
        save_results(args)
    text = summary()
    RESULTS["summary"] = text
    save_results(args)
    shutil.rmtree(args.root, ignore_errors=True)
    print("\n==== summary\n" + text, flush=True)
    return 0 if not RESULTS["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
