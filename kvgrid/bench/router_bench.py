"""Router benchmark: routing decision latency and KV index update rate, on one core.

Two measurements, both on the pure router code the server and the simulator use:

1. Index updates: a stream of numbered event batches from many workers (stores of 1-4
   blocks, removals of single blocks, as an engine's prefix cache produces), applied from
   decoded objects, and separately decoded from the msgpack wire format first.
2. Routing: N workers, requests arriving at R per second (simulated clock) from a mix of
   multi-turn sessions and shared system prompts; each decision hashes the prompt into
   block keys, queries the index, scores every worker and records the choice. Workers
   report the blocks of each routed request back as events, and load reports, so the index
   grows as it would live. Reports p50/p99/max decision time and the share of one core the
   router needs at that rate.

Run: kvgrid bench router [--workers 64] [--rate 1000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from kvgrid import keys
from kvgrid.events import BlockRemoved, BlockStored, EventBatch
from kvgrid.gc_tuning import tune_gc
from kvgrid.router import wire
from kvgrid.router.index import KVIndex
from kvgrid.router.policies import DEFAULT_POLICY
from kvgrid.router.router import Router, RouteRequest
from kvgrid.router.workers import WorkerInfo, WorkerLoad
from kvgrid.stats import percentile

SCOPE = keys.KVScope("bench-model", "bfloat16")


def bench_index(num_workers: int, num_batches: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    workers = [f"w{i}" for i in range(num_workers)]
    held: dict[str, list[bytes]] = {w: [] for w in workers}
    seqs = dict.fromkeys(workers, 0)
    batches: list[EventBatch] = []
    n_events = n_blocks = 0
    counter = 0
    for _ in range(num_batches):
        w = rng.choice(workers)
        seqs[w] += 1
        events = []
        for _ in range(rng.randint(1, 4)):
            if held[w] and rng.random() < 0.4:
                k = held[w].pop(rng.randrange(len(held[w])))
                events.append(BlockRemoved((k,), "G1"))
                n_blocks += 1
            else:
                ks = []
                for _ in range(rng.randint(1, 4)):
                    counter += 1
                    ks.append(counter.to_bytes(32, "little"))
                held[w].extend(ks)
                events.append(BlockStored(tuple(ks), None, "G1", 64 * len(ks)))
                n_blocks += len(ks)
            n_events += 1
        batches.append(EventBatch(w, seqs[w], 0.0, events))
    payloads = [wire.encode_batch(b, "e") for b in batches]

    def fresh() -> KVIndex:
        idx = KVIndex()
        for w in workers:
            idx.add_worker(w)
            idx.apply_snapshot(w, 0, {})
        return idx

    idx = fresh()
    t0 = time.perf_counter()
    for b in batches:
        idx.apply_batch(b)
    t_apply = time.perf_counter() - t0
    idx = fresh()
    t0 = time.perf_counter()
    for p in payloads:
        idx.apply_batch(wire.decode_batch(p)[0])
    t_wire = time.perf_counter() - t0
    return {
        "workers": num_workers,
        "batches": num_batches,
        "events": n_events,
        "blocks": n_blocks,
        "events_per_s": n_events / t_apply,
        "blocks_per_s": n_blocks / t_apply,
        "events_per_s_with_decode": n_events / t_wire,
    }


def bench_routing(
    num_workers: int, rate: float, duration_s: float, policy: str = DEFAULT_POLICY, seed: int = 0
) -> dict:
    rng = random.Random(seed)
    router = Router(policy)
    for i in range(num_workers):
        wid = f"w{i}"
        router.add_worker(WorkerInfo(wid, epoch="e", scope=SCOPE, bytes_per_block=8 << 20), 0.0)
        router.on_snapshot(wid, 0, {}, 0.0)
    seqs = dict.fromkeys(router.workers, 0)
    tune_gc()  # as the router process does
    systems = [[rng.randrange(50_000) for _ in range(1024)] for _ in range(8)]
    sessions: list[list[int]] = []
    n_requests = int(rate * duration_s)
    times, event_time = [], 0.0
    pending_finish: list[tuple[float, str, int]] = []
    for i in range(n_requests):
        now = i / rate
        # a multi-turn session grows its history; new sessions start from a system prompt
        if sessions and rng.random() < 0.5:
            j = rng.randrange(len(sessions))
            sessions[j] = sessions[j] + [rng.randrange(50_000) for _ in range(rng.randint(64, 256))]
            prompt = sessions[j]
            if len(prompt) > 8192:
                prompt = sessions[j] = list(rng.choice(systems))
        else:
            prompt = rng.choice(systems) + [
                rng.randrange(50_000) for _ in range(rng.randint(100, 800))
            ]
            sessions.append(prompt)
            if len(sessions) > 2000:
                sessions.pop(0)
        rid = f"r{i}"
        t0 = time.perf_counter()
        d = router.route(RouteRequest(rid, prompt), now)
        times.append(time.perf_counter() - t0)
        pending_finish.append((now + 0.5, rid, len(prompt)))
        # the worker reports the blocks it computed, and a load report every 10 requests
        t0 = time.perf_counter()
        wid = d.worker_id
        ks = keys.block_keys(prompt, SCOPE)[d.predicted_cached_tokens // 64 :]
        seqs[wid] += 1
        router.on_events(
            EventBatch(wid, seqs[wid], now, [BlockStored(tuple(ks), None, "G1", 0)]), now
        )
        while pending_finish and pending_finish[0][0] <= now:
            _, done, _ = pending_finish.pop(0)
            router.on_first_token(done, now)
            router.on_finish(done, now)
        if i % 10 == 0:
            w = rng.choice(list(router.workers))
            router.on_load(
                WorkerLoad(
                    w,
                    "e",
                    kv_seq=seqs[w],
                    num_running=rng.randint(0, 64),
                    prefill_tokens_per_s=20_000.0,
                    decode_step_s=0.02,
                    timestamp=now,
                ),
                now,
            )
        event_time += time.perf_counter() - t0
    busy = sum(times) + event_time
    return {
        "workers": num_workers,
        "policy": policy,
        "rate_per_s": rate,
        "requests": n_requests,
        "decision_p50_ms": percentile(times, 50, "nearest") * 1e3,
        "decision_p99_ms": percentile(times, 99, "nearest") * 1e3,
        "decision_max_ms": max(times) * 1e3,
        "core_share_at_rate": busy / duration_s,
    }


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``kvgrid bench router``."""
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    p.add_argument("--duration", type=float, default=5.0, help="simulated seconds of arrivals")
    p.add_argument("--policy", default=DEFAULT_POLICY)
    p.add_argument("--index-batches", type=int, default=50_000)
    p.add_argument("--out", default="router_bench.json")


def run(args: argparse.Namespace) -> int:
    idx = bench_index(args.workers, args.index_batches)
    rt = bench_routing(args.workers, args.rate, args.duration, args.policy)
    ok_route = rt["decision_p99_ms"] < 1.0
    ok_index = idx["events_per_s"] >= 100_000
    rows = [
        ("index updates (events/s)", f"{idx['events_per_s']:,.0f}", ">= 100,000", ok_index),
        ("index updates (blocks/s)", f"{idx['blocks_per_s']:,.0f}", "", None),
        (
            "index updates incl. msgpack decode (events/s)",
            f"{idx['events_per_s_with_decode']:,.0f}",
            "",
            None,
        ),
        (
            f"decision p50 ({args.workers} workers, {args.rate:g} req/s)",
            f"{rt['decision_p50_ms']:.3f} ms",
            "",
            None,
        ),
        ("decision p99", f"{rt['decision_p99_ms']:.3f} ms", "< 1 ms", ok_route),
        ("decision max", f"{rt['decision_max_ms']:.3f} ms", "", None),
        ("share of one core at that rate", f"{rt['core_share_at_rate']:.2f}", "< 1", None),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'metric':<{w}}  {'value':>14}  {'target':>10}  ok")
    for name, val, target, ok in rows:
        mark = "" if ok is None else ("yes" if ok else "NO")
        print(f"{name:<{w}}  {val:>14}  {target:>10}  {mark}")
    result = {"index": idx, "routing": rt, "pass": ok_route and ok_index}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0 if result["pass"] else 1
