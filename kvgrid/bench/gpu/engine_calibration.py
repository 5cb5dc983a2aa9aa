# ruff: noqa: E501  (summary rows are long)
"""The fleet simulator's calibration from this run's engine steps: a step-time fit over workload
A's decode-only and prefill-only steps and C's prompts, the KV size and capacity, the G2 copy
rate and power. The result file (``gpu_engine.json``) is itself a simulator calibration
(``kvgrid.planner.calibration.load_calibration`` reads its top-level keys).

    python -m kvgrid.bench.gpu.engine_calibration      # runs C and A first
"""

from __future__ import annotations

import statistics
import sys

import torch

from kvgrid.bench.gpu import engine_common as common
from kvgrid.bench.gpu import engine_env, engine_prefill, engine_vs_transformers
from kvgrid.bench.gpu.harness import DEV, GPU


def _nnls(rows: list[list[float]], y: list[float]) -> list[float]:
    import numpy as np

    a, b = np.asarray(rows, dtype=np.float64), np.asarray(y, dtype=np.float64)
    try:
        from scipy.optimize import nnls

        return nnls(a, b)[0].tolist()
    except ImportError:
        return np.clip(np.linalg.lstsq(a, b, rcond=None)[0], 0, None).tolist()


def phase_calibration(args, eng) -> dict:
    """Fit kvgrid.planner.calibration's step-time model to the steps measured in this run.

    decode_step_s(B, K) = fixed + per_seq * B + per_kv_token * K, from A's decode-only steps;
    prefill_s(n, ctx) = steps * step_fixed + per_token * n + attn * n * (ctx + n / 2), from
    A's prefill-only steps and C's prompts (one-shot and in 2048-token chunks).
    Step times are the engine's own (forward + sampling, synchronised)."""
    cfg = eng.model_config
    env = common.RESULTS.phases.get("env", {})
    a_steps, c_steps = common.STEPS.get("A", []), common.STEPS.get("C", [])
    dec = [st for st in a_steps if max(st[2]) == 1]
    pre = [st for st in a_steps + c_steps if min(st[2]) > 1]
    if len(dec) < 10 or len(pre) < 3:
        return {"error": f"too few steps to fit ({len(dec)} decode, {len(pre)} prefill)"}
    d_fixed, d_seq, d_kv = _nnls(
        [[1.0, len(st[1]), sum(st[1])] for st in dec], [st[3] for st in dec]
    )
    p_rows = [[1.0, st[0], sum(q * (s - q + q / 2) for s, q in zip(st[1], st[2]))] for st in pre]
    p_fixed, p_tok, p_attn = _nnls(p_rows, [st[3] for st in pre])

    def err(rows, coef, y):
        pred = [sum(c * x for c, x in zip(coef, r)) for r in rows]
        return statistics.median(abs(p - t) / t for p, t in zip(pred, y))

    kv_tok = cfg.kv_bytes_per_token(2)
    weight_bytes = cfg.param_count() * 2
    total = torch.cuda.get_device_properties(DEV).total_memory if GPU else 80e9
    # the engine's own sizing at gpu_memory_utilization 0.9 (this run used a fixed pool)
    capacity = int((0.9 * total - weight_bytes - 2 * 2**30) // kv_tok)
    a = common.RESULTS.phases.get("A_ours", {})
    busy_w = None
    if a.get("J_per_token") and a.get("elapsed_s"):
        busy_w = a["J_per_token"] * a["output_tokens"] / a["elapsed_s"]
    env_name = env.get("device", str(DEV))
    return {
        "meta": {
            "model": args.shape,
            "gpu": env_name,
            "dtype": "bfloat16",
            "measured": GPU,
            "source": (
                f"kvgrid.bench.gpu.engine on {env_name}: step-time fit over {len(dec)} decode-only "
                f"and {len(pre)} prefill-only engine steps of workloads A and C; G2 = pinned "
                "host-to-GPU copy and busy power (mean over workload A) measured in the same "
                "run; G3 disk rate and startup_s are NOT measured here (DESIGN.md figures)"
            ),
            "fit": (
                "prefill_s(n, ctx) = steps * step_fixed_s + per_token_s * n + attn_s * n * "
                "(ctx + n / 2); decode_step_s(B, K) = fixed_s + per_seq_s * B + "
                "per_kv_token_s * K"
            ),
            "fit_median_rel_err": {
                "decode": err(
                    [[1.0, len(st[1]), sum(st[1])] for st in dec],
                    [d_fixed, d_seq, d_kv],
                    [st[3] for st in dec],
                ),
                "prefill": err(p_rows, [p_fixed, p_tok, p_attn], [st[3] for st in pre]),
            },
            "kv_capacity_note": "engine sizing at gpu_memory_utilization 0.9 on this card",
        },
        "prefill": {"step_fixed_s": p_fixed, "per_token_s": p_tok, "attn_s": p_attn},
        "decode": {"fixed_s": d_fixed, "per_seq_s": d_seq, "per_kv_token_s": d_kv},
        "kv_bytes_per_token": kv_tok,
        "kv_capacity_tokens": capacity,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        "tiers": {
            "G2": {"bytes_per_s": env.get("h2d_pinned_GBps", 55.0) * 1e9},
            "G3": {"bytes_per_s": 1.4e9},
        },
        "power": {"idle_w": env.get("idle_power_w") or 120.0, "busy_w": busy_w or 650.0},
        "startup_s": 60.0,
    }


def run(b: common.Bench) -> None:
    if b.engine_built:
        b.results.run_phase("calibration", phase_calibration, b.args, b.engine)


def rows(P: dict) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    cal = P.get("calibration", {})
    if "decode" in cal:
        rows.append(
            (
                "calibration",
                f"decode {cal['decode']['fixed_s'] * 1e3:.2f} ms + {cal['decode']['per_seq_s'] * 1e6:.1f} us/seq + {cal['decode']['per_kv_token_s'] * 1e9:.1f} ns/KV tok; prefill {cal['prefill']['step_fixed_s'] * 1e3:.1f} ms/step + {cal['prefill']['per_token_s'] * 1e6:.1f} us/tok",
                f"median fit err {cal['meta']['fit_median_rel_err']}",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    return common.main(
        argv,
        [engine_env, engine_prefill, engine_vs_transformers, sys.modules[__name__]],
        "C,A",
    )


if __name__ == "__main__":
    sys.exit(main())
