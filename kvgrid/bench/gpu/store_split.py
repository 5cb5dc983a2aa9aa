"""The store benchmark's split phase: a disk throttled in software (a token bucket in the tier's
reads, page cache warm) to half and to exactly the bandwidth at which loading a 32K prompt
takes as long as recomputing it: forced load vs the engine's own choice (load, recompute or
split). Needs the ttft phase's results of the same run.

    python -m kvgrid.bench.gpu.store_split --sizes 32768     # runs ttft first
"""

# ruff: noqa: E501  (summary rows and result records are long)
from __future__ import annotations

import json
import sys
from pathlib import Path

from kvgrid.bench.gpu import store_common as common
from kvgrid.bench.gpu import store_ttft
from kvgrid.bench.gpu.harness import log, med
from kvgrid.bench.gpu.store_probes import LoadLog

NAME = "split"


def run(args, eng, root: Path) -> dict:
    n = max(args.sizes)
    ttft = common.RESULTS.phases["ttft"][str(n)]
    prompt = common.rand_prompt(n, eng.model_config.vocab_size, seed=100 + n)
    ks = common.prompt_keys(eng, prompt)
    keep = root / "keep_g3"
    if not keep.exists():
        raise RuntimeError("the ttft phase left no G3 directory to throttle")
    recompute = ttft["recompute"]["ttft_s"]
    kv_bytes = len(ks) * eng.runner.kv_cache[0].nbytes
    even = kv_bytes / recompute  # bytes/s at which loading takes as long as recomputing
    common.attach(eng, None)
    common.fresh_g1(eng)
    ref = common.run_one(eng, prompt)
    out = {"recompute_s": recompute, "even_GBps": even / 1e9}
    for label, factor in (("half", 0.5), ("even", 1.0)):
        bw = even * factor
        store = common.make_store(eng, root, "thr", args, throttle=bw, throttle_dir=keep)
        conn = common.attach(eng, store)
        llog = LoadLog(store)
        row = {"throttle_GBps": bw / 1e9}
        # forced load (warm page cache: the throttle is the disk)
        for _ in range(2):
            common.raw_read(
                common.object_files(store, "G3", ks), args.load_workers
            )  # warm the cache
        common.fresh_g1(eng)
        store.g2.clear()
        conn.prefill_tokens_per_s = None
        r = common.run_one(eng, prompt)
        rec = llog.take()
        row["load"] = {"ttft_s": r["ttft_s"], "kv_GBps": rec[0]["bytes"] / rec[0]["s"] / 1e9 if rec else None,
                       "exact": r["tokens"] == ref["tokens"]}  # fmt: skip
        # the engine's choice, from measured numbers (the forced load set the bandwidth)
        store.bandwidth["G3"] = rec[0]["bytes"] / rec[0]["s"] if rec else bw
        autos = []
        for _ in range(2):
            common.fresh_g1(eng)
            store.g2.clear()
            conn.prefill_tokens_per_s = n / recompute
            r = common.run_one(eng, prompt)
            plan = conn.load_plan(common.PUBLIC, len(ks))
            autos.append({"ttft_s": r["ttft_s"], "plan": [plan.compute_blocks, plan.load_blocks],
                          "expected_s": plan.expected_s, "exact_vs_g1": r["tokens"] == ref["tokens"],
                          "cached": r["cached"]})  # fmt: skip
        row["auto"] = autos
        row["auto_ttft_s"] = med([a["ttft_s"] for a in autos])
        row["auto_over_recompute"] = row["auto_ttft_s"] / recompute
        row["auto_over_load"] = row["auto_ttft_s"] / row["load"]["ttft_s"]
        out[label] = row
        log("split", label, json.dumps(row, default=str))
        common.attach(eng, None)
        store.close()
    return out


def summary(res: dict) -> list[str]:
    lines: list[str] = []
    s = res
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
    return lines


def main(argv: list[str] | None = None) -> int:
    # the break-even bandwidth comes from the ttft phase of the same run
    return common.main(argv, [store_ttft, sys.modules[__name__]])


if __name__ == "__main__":
    sys.exit(main())
