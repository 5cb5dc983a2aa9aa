# ruff: noqa: E501  (summary rows and result records are long)
"""The store benchmark's replay phase: a slice of the Mooncake conversation trace
(bench/data/), in-process with arrival times, G1 limited to --replay-g1-blocks blocks so that
it evicts; the same offered load without and with the store (G2 in pinned memory + G3 on
disk). Per engine step (``StepLog``): wall and device time, prefill tokens, decode sequences,
store tokens, the store's engine-thread time, and on a GPU the device's stalls at the store's
cross-stream waits; the summary sets prefill and decode-only steps side by side. With
--replay-profile each run records a window of CUDA activity (per-stream busy time, idle gaps,
top kernels), which tells a GPU left waiting for the host from kernels that ran slower. A
diagnostic only, off by default: stopping the profiler processes its trace on the engine's
thread (seconds of stall at the window's end on an H200), so every TTFT after the window is
inflated. --replay-runs adds store variants (store_si: a 0.2 ms GIL switch interval;
store_w4: four write threads).

    python -m kvgrid.bench.gpu.store_replay
    python -m kvgrid.bench.gpu.store_replay --replay-limit 24 --sizes 256   # CPU, tiny
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from kvgrid.bench.gpu import store_common as common
from kvgrid.bench.gpu.harness import GPU, log, pct
from kvgrid.bench.gpu.store_probes import HostProbe, quiesce
from kvgrid.bench.gpu.store_steps import KernelWindow, StepLog, step_summary, step_table
from kvgrid.engine.sampling_params import SamplingParams
from kvgrid.gc_tuning import tune_gc

NAME = "replay"


def main(argv: list[str] | None = None) -> int:
    return common.main(argv, [sys.modules[__name__]])


DATA = Path(__file__).resolve().parents[3] / "bench" / "data" / "mooncake_conversation_slice.jsonl"


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


def _replay_run(eng, wl, cap_s: float, window: tuple[float, float] | None = None) -> dict:
    reqs = sorted(wl.requests, key=lambda r: r.arrival_s)
    c0 = dict(eng.counters)
    loaded0 = eng.scheduler.store_loaded_tokens
    pre0 = eng.scheduler.num_preemptions
    common.GC_PAUSES.clear()
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
        "gc_pause_s": sum(b - a for _, a, b in common.GC_PAUSES),
        "gc_collections": [sum(1 for g, _, _ in common.GC_PAUSES if g == gen) for gen in range(3)],
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


def run(args, eng, root: Path) -> dict:
    wl = replay_workload(eng.model_config.vocab_size, args.replay_max_input)
    if args.replay_limit:
        wl = dataclasses.replace(wl, requests=wl.requests[: args.replay_limit])
    wl.materialize()
    out = {"workload": wl.stats(), "theoretical_hit_rate": wl.theoretical_hit_rate(eng.config.block_size),
           "g1_blocks": args.replay_g1_blocks}  # fmt: skip
    common.with_budget(eng, args.replay_budget)
    bm = eng.block_manager
    common.attach(eng, None)
    common.fresh_g1(eng)
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
            common.fresh_g1(eng)
            store = None
            if run.get("store"):
                store = common.make_store(eng, root, "replay", args, g2_gib=args.replay_g2_gib, g3=True,
                                   admit={"G2": 1, "G3": 2, "G4": 2}, io_queue=64,
                                   io_workers=run.get("io_workers", args.load_workers))  # fmt: skip
            conn = common.attach(eng, store)
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
            common.attach(eng, None)
            if store is not None:
                store.close()
            gc.unfreeze()  # the next run's quiesce collects this run's store
            common.RESULTS.save()
    finally:
        for b in held:
            bm.free[b] = None
        common.with_budget(eng, max(args.sizes) + 64)
    shutil.rmtree(root / "replay", ignore_errors=True)
    return out


def add_args(ap) -> None:
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


def check_args(ap, args) -> None:
    args.replay_runs = args.replay_runs.split(",")
    if unknown := set(args.replay_runs) - set(REPLAY_RUNS):
        ap.error(f"unknown --replay-runs {sorted(unknown)}: choose from {sorted(REPLAY_RUNS)}")
    args.replay_profile = (
        tuple(float(x) for x in args.replay_profile.split(",")) if args.replay_profile else None
    )


def summary(res: dict) -> list[str]:
    lines: list[str] = []
    r = res
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
        lines += step_table({name: r[name].get("step_summary") for name in runs})
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
    return lines


if __name__ == "__main__":
    sys.exit(main())
