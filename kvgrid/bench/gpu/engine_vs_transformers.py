# ruff: noqa: E501  (summary rows are long)
"""The engine benchmark's A phase: 256 requests, prompt and output lengths uniform in [100, 1024],
seed 0, EOS ignored, against its roofline; with ``sync`` the same without asynchronous
scheduling, with --small-budget again with smaller prefill chunks; with ``hf`` the same token
lists through transformers' continuous batching (after the engine has given its memory back).

    python -m kvgrid.bench.gpu.engine_vs_transformers --phases A,sync,hf
"""

from __future__ import annotations

import itertools
import sys
import time

from kvgrid.bench.gpu import engine_common as common
from kvgrid.bench.gpu import engine_env
from kvgrid.bench.gpu.engine_steps import StepRecorder, roofline_seconds, run_engine
from kvgrid.bench.gpu.harness import pct, sync


def phase_A_ours(args, eng, energy) -> dict:
    cfg = eng.model_config
    env = common.RESULTS.phases["env"]
    wl = common.make_workload(args.num_requests, 100, 1024, cfg.vocab_size, seed=0)
    # warm-up: compiles, and plans SDPA for these prompt lengths (cuDNN builds a plan per
    # new length, ~45 ms each, which would land in whichever run comes first)
    run_engine(eng, [(p, 1) for p, _ in wl])
    eng.block_manager.reset_prefix_cache()
    rec = StepRecorder(eng)
    r = run_engine(eng, wl, energy)
    rec.close()
    common.STEPS.setdefault("A", []).extend(rec.steps)
    r["host_per_decode_step"] = rec.host_breakdown()
    # every step call's host parts (ms), to place the slow ones (index = step call)
    keys_ = ("step", "schedule", "prepare", "execute", "launch", "complete")
    r["host_per_step_ms"] = [[round(h.get(k, 0.0) * 1e3, 2) for k in keys_] for h in rec.host]
    r["prefill_first_steps"] = sum(1 for st in rec.steps if min(st[2]) > 1)
    r["mixed_steps"] = sum(1 for st in rec.steps if min(st[2]) == 1 < max(st[2]))
    decode_ms = [st[3] * 1e3 for st in rec.steps if max(st[2]) == 1]
    r["decode_step_ms_p50_p99"] = [pct(decode_ms, 50), pct(decode_ms, 99)]
    roof, mem_only = roofline_seconds(rec.steps, cfg, env["copy_bw_GBps"], env["matmul_TFLOPs"])
    r["roofline_s"] = roof
    r["of_roofline"] = roof / r["elapsed_s"]
    r["memory_roofline_s"] = mem_only
    r["of_memory_roofline"] = mem_only / r["elapsed_s"]
    r["decode_only_steps"] = sum(1 for s in rec.steps if max(s[2]) == 1)
    r["max_batch"] = max(len(s[1]) for s in rec.steps)
    eng.block_manager.reset_prefix_cache()
    return r


def phase_A_hf(args, hf, vocab, energy) -> dict:
    from transformers import GenerationConfig

    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        from transformers.generation import ContinuousBatchingConfig

    wl = common.make_workload(args.num_requests, 100, 1024, vocab, seed=0)
    gen = GenerationConfig(do_sample=False, max_new_tokens=1024, eos_token_id=None, pad_token_id=0)
    cb_kwargs = {"max_memory_percent": 0.85}
    cb = ContinuousBatchingConfig(**cb_kwargs)
    hf.generation_config = gen
    manager = hf.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    manager.start()
    # warm-up (graph capture, compilation) outside the timed region
    wid = manager.add_request(wl[0][0][:64], max_new_tokens=4)
    while True:
        r = manager.get_result(timeout=60)
        if r is not None and r.is_finished():
            break
    sync()
    j0 = energy.read()
    t0 = time.perf_counter()
    ids = {}
    for i, (prompt, n_out) in enumerate(wl):
        rid = manager.add_request(
            prompt,
            request_id=f"hf{i}",
            max_new_tokens=n_out,
            record_timestamps=True,
            streaming=True,  # partial outputs: unfinished requests' tokens count at the deadline
        )
        ids[rid] = n_out
    done: dict = {}
    deadline = t0 + args.hf_deadline_s
    seen: dict[str, int] = {}
    while len(done) < len(ids) and time.perf_counter() < deadline:
        r = manager.get_result(timeout=1)
        if r is None:
            continue
        seen[r.request_id] = max(seen.get(r.request_id, 0), len(r.generated_tokens))
        if r.is_finished():
            done[r.request_id] = r
    elapsed = time.perf_counter() - t0
    manager.stop(block=True, timeout=10)
    n_out = sum(seen.values())
    ttft, itl = [], []
    for r in done.values():
        ts = r.timestamps or []
        if ts:
            ttft.append(ts[0] - t0)
            itl += [b - a for a, b in itertools.pairwise(ts)]
    res = {
        "completed": len(done),
        "requests": len(ids),
        "output_tokens": n_out,
        "expected_tokens_ok": all(len(r.generated_tokens) == ids[k] for k, r in done.items()),
        "elapsed_s": elapsed,
        "output_tok_s": n_out / elapsed,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50) * 1e3,
        "itl_p99_ms": pct(itl, 99) * 1e3,
        "J_per_token": energy.per_token(j0, n_out),
        "attn_implementation": getattr(hf.config, "_attn_implementation", None),
        "warmup_request": wid,
    }
    return res


def run(b: common.Bench) -> None:
    if not (b.wants("A") or b.wants("hf")) or b.engine is None:
        return
    eng, args = b.engine, b.args
    if b.wants("A"):
        b.results.run_phase("A_ours", phase_A_ours, args, eng, b.energy)
        if b.wants("sync"):
            eng._async = False
            b.results.run_phase("A_ours_sync", phase_A_ours, args, eng, b.energy)
            eng._async = eng.config.async_scheduling is not False
        if args.small_budget:
            # the same workload with a smaller step budget: shorter mixed steps
            common.with_budget(eng, args.small_budget)
            b.results.run_phase("A_ours_small_budget", phase_A_ours, args, eng, b.energy)
            common.with_budget(eng, args.max_num_batched_tokens)
    if b.wants("hf") and b.hf is not None:
        hf, energy = b.hf, b.energy
        b.later("A_hf", lambda vocab: phase_A_hf(args, hf, vocab, energy))


def rows(P: dict) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if "A_ours" in P:
        a = P["A_ours"]
        hf = P.get("A_hf", {})
        ratio = a["output_tok_s"] / hf["output_tok_s"] if hf.get("output_tok_s") else float("nan")
        rows.append(
            (
                "A kvgrid",
                f"{a['output_tok_s']:.0f} out tok/s, TTFT p50 {a['ttft_p50_s']:.2f}s, ITL p50/p99 {a['itl_p50_ms']:.1f}/{a['itl_p99_ms']:.1f} ms (x{a['itl_p99_over_p50']:.2f}), {a.get('J_per_token') or float('nan'):.2f} J/tok",
                f"{a['of_roofline']:.0%} of roofline ({a['of_memory_roofline']:.0%} of bytes-only)",
            )
        )
        if hf:
            rows.append(
                (
                    "A transformers",
                    f"{hf['output_tok_s']:.0f} out tok/s ({hf['completed']}/{hf['requests']} done), TTFT p50 {hf['ttft_p50_s']:.2f}s, ITL p50/p99 {hf['itl_p50_ms']:.1f}/{hf['itl_p99_ms']:.1f} ms, {hf.get('J_per_token') or float('nan'):.2f} J/tok",
                    f"kvgrid = {ratio:.1f}x",
                )
            )
    if "A_ours_small_budget" in P:
        a = P["A_ours_small_budget"]
        rows.append(
            (
                f"A budget {common.RESULTS.data['args']['small_budget']}",
                f"{a['output_tok_s']:.0f} out tok/s, TTFT p50 {a['ttft_p50_s']:.2f}s, ITL p50/p99 {a['itl_p50_ms']:.1f}/{a['itl_p99_ms']:.1f} ms (x{a['itl_p99_over_p50']:.2f})",
                f"{a['of_roofline']:.0%} of roofline",
            )
        )
    rows += common.sync_row(P, "A_ours_sync", "A_ours", "A, sync sched.")
    if "A_ours" in P and P["A_ours"].get("host_per_decode_step"):
        h = P["A_ours"]["host_per_decode_step"]
        rows.append(
            (
                "A decode step",
                f"p50/p99 {P['A_ours']['decode_step_ms_p50_p99'][0]:.1f}/{P['A_ours']['decode_step_ms_p50_p99'][1]:.1f} ms (forward+sample); host: "
                + ", ".join(f"{k} {v:.2f}" for k, v in h.items() if k != "steps"),
                f"{P['A_ours']['prefill_first_steps']} prefill-only, {P['A_ours']['mixed_steps']} mixed steps",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    return common.main(
        argv,
        [engine_env, sys.modules[__name__]],
        "A,sync,hf",
    )


if __name__ == "__main__":
    sys.exit(main())
