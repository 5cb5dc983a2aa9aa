"""The context-store benchmark's shared parts: one engine, stores attached and detached
between measurements, single timed requests, and the runner of its phases.

Model: the Llama-3.1-8B shape (context long enough for 32K), random bf16 weights
(``--load-format dummy``): 128 KiB of KV per token, 8 MiB per 64-token block. A phase module
(``store_env``, ``store_correct``, ``store_ttft``, ``store_split``, ``store_enc``,
``store_replay``) has ``NAME``, ``run(args, eng, root) -> dict`` and ``summary(result) ->
list[str]``, and may add flags with ``add_args``; ``main`` runs the phases given, in order, on
one engine, writes ``gpu_store.json`` after every phase and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import gc
import io
import os
import pstats
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import torch

from kvgrid import envs, keys
from kvgrid.bench.gpu.harness import GPU, T_START, GiB, Results, add_common_args, default_shape, log
from kvgrid.bench.gpu.store_probes import attached_store, quiesce
from kvgrid.engine.sampling_params import SamplingParams
from kvgrid.store import ContextStore, StoreConfig, StoreConnector
from kvgrid.store.crypto import KeyRing
from kvgrid.store.disk_tier import DiskTier
from kvgrid.store.object import tenant_id

PUBLIC = keys.PUBLIC_TENANT
KEYRING = KeyRing({1: os.urandom(32)})
RESULTS = Results("gpu_store.json")


def build_engine(args):
    from kvgrid.engine.config import EngineConfig
    from kvgrid.engine.llm_engine import LLMEngine

    top = max(args.sizes)
    cfg = EngineConfig(
        model=args.shape,
        load_format=args.load_format,
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
    warm_s = RESULTS.data["warm_thread_s"] = round(time.perf_counter() - t0, 2)
    log(f"attention plans for every length up to {top + 64} tokens: {warm_s}s")
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


def run_one(
    eng, prompt: list[int], max_tokens: int = 2, logprobs: int | None = 5, steplog=None
) -> dict:
    """One request alone, from a quiet host; time to first token from add_request. With a
    ``StepLog``, each step() is recorded in it."""
    quiet = quiesce(attached_store(eng))
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
            if "drop_caches" not in RESULTS.notes:
                RESULTS.notes.append(f"drop_caches refused ({e}); fadvise only")
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


def main(argv: list[str] | None, phases: Sequence[ModuleType], module: str = "") -> int:
    """Run ``phases`` (the ones --phases names, default all) on one engine; ``module``: the
    command's name (default: the last phase module's)."""
    module = module or phases[-1].__spec__.name
    ap = argparse.ArgumentParser(
        prog=f"python -m {module}", description=phases[0].__doc__ if len(phases) == 1 else None
    )
    add_common_args(ap, shape=default_shape())
    ap.add_argument(
        "--phases",
        default=",".join(m.NAME for m in phases),
        help="comma-separated, of " + ",".join(m.NAME for m in phases),
    )
    ap.add_argument("--sizes", default="8192,32768", help="prompt lengths (tokens)")
    ap.add_argument(
        "--root",
        default=str(envs.KVGRID_BENCH_DIR.get() or "/tmp/kvgrid-store-bench"),
        help="store directories (removed first)",
    )
    ap.add_argument("--num-kv-blocks", type=int, default=1100 if GPU else None)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--g2-gib", type=float, default=6.0 if GPU else 0.5)
    ap.add_argument("--load-workers", type=int, default=min(12, os.cpu_count() or 2))
    ap.add_argument("--drop-all-caches", dest="drop_caches", action="store_true",
                    help="drop_caches too: the engine's code pages then fault in from disk "
                    "while the loads read it")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip what would not fit")
    for m in phases:
        if hasattr(m, "add_args"):
            m.add_args(ap)
    args = ap.parse_args(argv)
    by_name = {m.NAME: m for m in phases}
    chosen = args.phases.split(",")
    if unknown := set(chosen) - set(by_name):
        ap.error(f"unknown --phases {sorted(unknown)}: choose from {sorted(by_name)}")
    args.sizes = [int(x) for x in args.sizes.split(",")]
    for m in phases:
        if hasattr(m, "check_args"):
            m.check_args(ap, args)
    args.root = Path(args.root)
    shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True)
    if not GPU:
        args.drop_caches = False  # a shared machine: never drop everyone's page cache
    RESULTS.start(args.out, module, argv)
    RESULTS.data["args"] = {k: str(v) for k, v in vars(args).items()}
    eng = build_engine(args)
    trace_forwards(eng)
    for name in chosen:
        if time.perf_counter() - T_START > args.budget_s:
            RESULTS.notes.append(f"phase {name}: skipped (time budget)")
            continue
        RESULTS.run_phase(name, by_name[name].run, args, eng, args.root)
        if name in RESULTS.errors:
            with contextlib.suppress(Exception):
                attach(eng, None)
    text = summary(args, [by_name[n] for n in chosen])
    RESULTS.data["summary"] = text
    RESULTS.save()
    shutil.rmtree(args.root, ignore_errors=True)
    print("\n==== summary\n" + text, flush=True)
    return 0 if not RESULTS.errors else 1


def summary(args, phases: Sequence[ModuleType]) -> str:
    env = RESULTS.phases.get("env", {})
    device = env.get("device") or (torch.cuda.get_device_name() if GPU else "cpu")
    lines = [f"device {device}  shape {args.shape}"]
    for m in phases:
        if m.NAME in RESULTS.phases:
            lines += m.summary(RESULTS.phases[m.NAME])
    for k, v in RESULTS.errors.items():
        lines.append(f"ERROR {k}: {v.strip().splitlines()[-1]}")
    for note in RESULTS.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
