# ruff: noqa: E501  (summary rows are long)
"""The engine benchmark's B phase: batch-1 decode of a 1K prompt, 256 new tokens, against its
roofline (weights and KV read once per token at the measured copy bandwidth); the graph
replay's own GPU time, kernel profiles of one decode step; with ``sync`` in --phases, the same
without asynchronous scheduling.

    python -m kvgrid.bench.gpu.engine_decode --phases B,sync
"""

from __future__ import annotations

import sys

import torch

from kvgrid.bench.gpu import engine_common as common
from kvgrid.bench.gpu import engine_env
from kvgrid.bench.gpu.engine_steps import StepRecorder, profile_steps, run_engine
from kvgrid.bench.gpu.harness import DEV, GPU, bench_ms, sync
from kvgrid.engine.sampler import argmax_rows


@torch.inference_mode()
def profile_eager_decode(eng) -> None:
    """Kernel times of one batch-1 decode step run eagerly (the graph replays the same
    kernels): where the GPU time of a decode step goes."""
    from torch.profiler import ProfilerActivity, profile

    run = eng.runner
    bs = run.block_size
    ctx = 1100
    table = [list(range(1, 1 + -(-(ctx + 1) // bs)))]
    m = common.meta([ctx], [1], table, bs)
    ids = torch.tensor([5], device=DEV)
    pos = torch.tensor([ctx], device=DEV)
    for _ in range(3):
        run.model(ids, pos, run.kv_cache, m, run.backend)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        h = run.model(ids, pos, run.kv_cache, m, run.backend)
        argmax_rows(run.model.compute_logits(h))
        sync()
    common.PROFILES.append(
        "==== B: one eager batch-1 decode step (by CUDA time)\n"
        + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    )


def profile_graph_decode(bucket, reps: int) -> None:
    """Kernel times inside the batch-1 decode graph (as the last B step left it: about
    1.3K tokens of context), averaged over ``reps`` replays: the eager profile above pays
    launch gaps and picks split counts for the actual length, the graph does neither."""
    from torch.profiler import ProfilerActivity, profile

    bucket.graph.replay()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            bucket.graph.replay()
        sync()
    common.PROFILES.append(
        f"==== B: batch-1 decode graph, {reps} replays (by CUDA time)\n"
        + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    )


@torch.inference_mode()
def phase_B(args, eng, energy) -> dict:
    cfg = eng.model_config
    env = common.RESULTS.phases["env"]
    wl = common.make_workload(1, 1024, 1024, cfg.vocab_size, seed=2)
    wl = [(wl[0][0], 256)]
    run_engine(eng, [(wl[0][0], 8)])  # warm-up, this prompt length too (cuDNN plans)
    eng.block_manager.reset_prefix_cache()
    rec = StepRecorder(eng)
    r = run_engine(eng, wl, energy)
    rec.close()
    r["host_per_decode_step"] = rec.host_breakdown()
    eng.block_manager.reset_prefix_cache()
    run = eng.runner
    if run.graphs is not None and GPU:
        # GPU time of one decode step alone: graph replay, then logits and argmax
        bucket = run.graphs.buckets[1]
        r["graph_replay_ms"] = bench_ms(bucket.graph.replay, reps=50)
        r["graph_logits_argmax_ms"] = bench_ms(
            lambda: (bucket.graph.replay(), argmax_rows(run.model.compute_logits(bucket.output))),
            reps=50,
        )
        profile_eager_decode(eng)
        profile_graph_decode(bucket, reps=10)
    profile_steps(eng, wl[0][0][:1024], 24, "B: 24 engine steps, batch 1 (by self CPU time)")
    kv_tok = cfg.kv_bytes_per_token(2)
    weight_bytes = (cfg.param_count() - cfg.vocab_size * cfg.hidden_size) * 2
    avg_ctx = 1024 + 128
    step_bytes = weight_bytes + avg_ctx * kv_tok
    roof_tok_s = env["copy_bw_GBps"] * 1e9 / step_bytes
    decode_tok_s = 1e3 / r["itl_p50_ms"]
    r.update(
        roofline_tok_s=roof_tok_s,
        decode_tok_s=decode_tok_s,
        of_roofline=decode_tok_s / roof_tok_s,
        weight_GB=weight_bytes / 1e9,
    )
    return r


def run(b: common.Bench) -> None:
    if not b.wants("B") or b.engine is None:
        return
    eng = b.engine
    b.results.run_phase("B", phase_B, b.args, eng, b.energy)
    if b.wants("sync"):  # the same without asynchronous scheduling
        eng._async = False
        b.results.run_phase("B_sync", phase_B, b.args, eng, b.energy)
        eng._async = eng.config.async_scheduling is not False


def rows(P: dict) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if "B" in P:
        b = P["B"]
        rows.append(
            (
                "B batch-1",
                f"{b['decode_tok_s']:.0f} tok/s decode, TTFT {b['ttft_p50_s'] * 1e3:.0f} ms, ITL p50/p99 {b['itl_p50_ms']:.2f}/{b['itl_p99_ms']:.2f} ms, {b.get('J_per_token') or float('nan'):.2f} J/tok",
                f"{b['of_roofline']:.0%} of {b['roofline_tok_s']:.0f} tok/s roofline",
            )
        )
        h = b.get("host_per_decode_step", {})
        if "graph_replay_ms" in b:
            rows.append(
                (
                    "B step parts",
                    f"graph replay {b['graph_replay_ms']:.2f} ms, +logits/argmax {b['graph_logits_argmax_ms']:.2f} ms; host: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in h.items() if k != "steps"),
                    "",
                )
            )
    rows += common.sync_row(P, "B_sync", "B", "B, sync sched.")
    return rows


def main(argv: list[str] | None = None) -> int:
    return common.main(argv, [engine_env, sys.modules[__name__]], "B,sync")


if __name__ == "__main__":
    sys.exit(main())
