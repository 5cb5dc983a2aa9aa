# ruff: noqa: E501  (summary rows are long)
"""The engine benchmark's C phase: prefill of 8K and 32K prompts, one-shot and in 2048-token
chunks, against transformers' SDPA forward on the same weights (run after the engine has
given its memory back).

    python -m kvgrid.bench.gpu.engine_prefill
"""

from __future__ import annotations

import sys
import time

import torch

from kvgrid.bench.gpu import engine_common as common
from kvgrid.bench.gpu import engine_env
from kvgrid.bench.gpu.engine_steps import StepRecorder, profile_steps, run_engine
from kvgrid.bench.gpu.harness import DEV, log, sync


def phase_C_ours(args, eng, energy) -> dict:
    cfg = eng.model_config
    out = {}
    for budget_name, budget in (("oneshot", 32768 + 64), ("chunked", 2048)):
        common.with_budget(eng, budget)
        for n in (8192, 32768):
            prompt = common.make_workload(1, n, n, cfg.vocab_size, seed=3 + n)[0][0]
            ts, fwd = [], []
            for rep in range(3):
                eng.block_manager.reset_prefix_cache()
                sync()
                j0 = energy.read()
                rec = StepRecorder(eng) if rep else None
                r = run_engine(eng, [(prompt[: n - rep], 1)])  # distinct prompts: no cache hit
                if rec is not None:
                    rec.close()
                    common.STEPS.setdefault("C", []).extend(rec.steps)
                    fwd.append(sum(st[3] for st in rec.steps))
                ts.append(r["ttft_p50_s"])
                jpt = energy.per_token(j0, n)
            best = 1 + min(range(len(fwd)), key=lambda i: ts[1 + i])
            out[f"{budget_name}_{n}"] = {
                "ttft_s": ts[best],
                "all": ts,
                # the engine steps' own time (forward + sampling, synchronised) of that run;
                # the rest of the TTFT is host work around the steps
                "steps_s": fwd[best - 1],
                "prefill_tok_s": n / ts[best],
                "J_per_prompt_token": jpt,
            }
            log("C ours", budget_name, n, out[f"{budget_name}_{n}"])
    common.with_budget(eng, 32768 + 64)
    prompt = common.make_workload(1, 8192, 8192, cfg.vocab_size, seed=5)[0][0]
    profile_steps(eng, prompt, 1, "C: kvgrid 8K prefill (by CUDA time)", sort="cuda_time_total")
    common.with_budget(eng, args.max_num_batched_tokens)
    eng.block_manager.reset_prefix_cache()
    return out


@torch.inference_mode()
def phase_C_hf(args, hf, vocab) -> dict:
    out = {}
    for n in (8192, 32768):
        prompt = torch.tensor(common.make_workload(1, n, n, vocab, seed=3 + n)[0][0], device=DEV)[
            None
        ]
        ts = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            hf(prompt, logits_to_keep=1, use_cache=False)
            sync()
            ts.append(time.perf_counter() - t0)
        out[str(n)] = {"s": min(ts[1:]), "all": ts}
        log("C transformers", n, out[str(n)])
        if n == 8192:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                hf(prompt, logits_to_keep=1, use_cache=False)
                sync()
            common.PROFILES.append(
                "==== C: transformers 8K forward (by CUDA time)\n"
                + prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
            )
    return out


def run(b: common.Bench) -> None:
    if not b.wants("C") or b.engine is None:
        return
    b.results.run_phase("C_ours", phase_C_ours, b.args, b.engine, b.energy)
    if b.hf is not None:
        hf, args = b.hf, b.args
        b.later("C_hf", lambda vocab: phase_C_hf(args, hf, vocab))


def rows(P: dict) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if "C_ours" in P:
        c, h = P["C_ours"], P.get("C_hf", {})
        for n in (8192, 32768):
            o, ch = c.get(f"oneshot_{n}"), c.get(f"chunked_{n}")
            hs = h.get(str(n), {}).get("s")
            if o:
                rows.append(
                    (
                        f"C prefill {n // 1024}K",
                        f"kvgrid {o['ttft_s']:.3f}s one-shot (steps {o['steps_s']:.3f}s), {ch['ttft_s']:.3f}s chunked; transformers {hs if hs is None else round(hs, 3)}s",
                        f"{hs / o['ttft_s']:.2f}x" if hs else "",
                    )
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    return common.main(argv, [engine_env, sys.modules[__name__]], "C")


if __name__ == "__main__":
    sys.exit(main())
