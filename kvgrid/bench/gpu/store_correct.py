"""The store benchmark's correctness phase: an 8K prompt computed cold (full prefill), then again
over G1's prefix cache (the reference: same computation after the prefix), then loaded from G2,
G3 and G4 and with a forced load/recompute split. Loaded KV must equal the computed KV bit for
bit, and the first tokens and their top-5 logprobs must equal the G1 run's exactly. The cold
run's tokens are compared too (a full prefill takes another kernel path: reported, not
required).

    python -m kvgrid.bench.gpu.store_correct --sizes 8192
"""

# ruff: noqa: E501  (summary rows and result records are long)
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from kvgrid.bench.gpu import store_common as common
from kvgrid.bench.gpu.harness import log
from kvgrid.store.object import tenant_id

NAME = "correct"


def main(argv: list[str] | None = None) -> int:
    return common.main(argv, [sys.modules[__name__]])


def _compare(ref: dict, got: dict) -> dict:
    lp_equal = ref["logprobs"] == got["logprobs"]
    return {"tokens_equal": ref["tokens"] == got["tokens"], "logprobs_equal": lp_equal}


def _kv_exact(eng, ks: list[bytes], snap: dict[bytes, torch.Tensor]) -> int:
    bm, kv = eng.block_manager, eng.runner.kv_cache
    return sum(1 for k in ks if k in bm.cached and torch.equal(kv[bm.cached[k]], snap[k]))


def run(args, eng, root: Path) -> dict:
    n = min(8192, max(args.sizes))
    prompt = common.rand_prompt(n, eng.model_config.vocab_size, seed=11)
    ks = common.prompt_keys(eng, prompt)
    common.attach(eng, None)
    common.fresh_g1(eng)
    cold = common.run_one(eng, prompt, max_tokens=8)
    bm = eng.block_manager
    snap = {k: eng.runner.kv_cache[bm.cached[k]].clone() for k in ks}
    g1 = common.run_one(eng, prompt, max_tokens=8)  # over G1's prefix cache: the reference path
    assert g1["cached"] == len(ks) * eng.config.block_size
    out: dict = {"prompt_tokens": n, "blocks": len(ks), "cold_vs_g1": _compare(cold, g1)}
    if cold["logprobs"] and g1["logprobs"]:
        a, b = cold["logprobs"][0], g1["logprobs"][0]
        shared = set(a) & set(b)
        out["cold_vs_g1"]["first_logprob_max_abs_diff"] = max(
            (abs(a[t] - b[t]) for t in shared), default=None
        )
    # populate through write-through: recompute with the store attached, then one idle step
    store = common.make_store(eng, root, "correct", args, g3=True, write_through=True)
    conn = common.attach(eng, store)
    common.fresh_g1(eng)
    again = common.run_one(eng, prompt, max_tokens=8)
    eng.step()
    assert store.flush(600)
    out["recompute_deterministic"] = {
        **_compare(cold, again),
        "kv_exact_blocks": _kv_exact(eng, ks, snap),
    }
    out["write_through_blocks_in_G3"] = sum(
        1 for t in store.tier("G3").created_many(tenant_id(common.PUBLIC), ks) if t
    )
    g4 = common.make_store(eng, root, "correct4", args, g4=True)
    checks = {}
    for tier, st in (("G2", store), ("G3", store), ("G4", g4), ("G3-split", store)):
        if st is g4 and tier == "G4":
            conn = common.attach(eng, g4)
            common.save_from_g1(eng, conn, ks)
        elif st is store and conn.store is not store:
            conn = common.attach(eng, store)
        common.fresh_g1(eng)
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
        r = common.run_one(eng, prompt, max_tokens=8)
        plan = conn.load_plan(common.PUBLIC, len(ks))
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
    common.attach(eng, None)
    store.close()
    g4.close()
    shutil.rmtree(root / "correct", ignore_errors=True)
    shutil.rmtree(root / "correct4", ignore_errors=True)
    return out


def summary(res: dict) -> list[str]:
    lines: list[str] = []
    c = res
    lines.append(f"correctness ({c['prompt_tokens']} tokens): {'PASS' if c['pass'] else 'FAIL'}; "
                     + "; ".join(f"{t}: tokens {v['tokens_equal']}, logprobs {v['logprobs_equal']}, KV exact {v['kv_exact_blocks']}/{c['blocks']}, plan {v['plan']}"
                                 for t, v in c["loads"].items()))  # fmt: skip
    return lines


if __name__ == "__main__":
    sys.exit(main())
