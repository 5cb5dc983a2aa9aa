"""The store benchmark's ttft phase: for 8K and 32K prompts, time to first token of recomputing
(no store) and of a fully cached prompt from G2, G3 and G4 (G4 = a second directory on the same
local disk, standing in for a shared filesystem). Disk tiers are measured with a cold page
cache (posix_fadvise DONTNEED on the object files; --drop-all-caches adds drop_caches, which
also evicts the engine's own code and libraries, unlike a serving machine whose KV objects
alone are cold) and warm; G3 with encryption on/off and codec none/zstd. Each tier's load
bandwidth is set against raw reads of the same object files with the same number of threads
and the same cache state (G2: against a pinned host->GPU copy of the same bytes).

    python -m kvgrid.bench.gpu.store_ttft --sizes 8192,32768
"""

# ruff: noqa: E501  (summary rows and result records are long)
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from kvgrid.bench.gpu import store_common as common
from kvgrid.bench.gpu.harness import T_START, log, med
from kvgrid.bench.gpu.store_probes import LoadLog
from kvgrid.bench.gpu.store_steps import StepLog
from kvgrid.store import ContextStore
from kvgrid.store.object import tenant_id

NAME = "ttft"


def main(argv: list[str] | None = None) -> int:
    return common.main(argv, [sys.modules[__name__]])


def tier_runs(eng, conn, store, llog, prompt, ks, tier, args, ref, cache: str, reps: int) -> dict:
    """Forced full loads of ``prompt`` from ``tier`` (G2 emptied first for lower tiers)."""
    files = common.object_files(store, tier, ks) if tier != "G2" else []
    ttfts, loads, starts, gcs, quiet, ok = [], [], [], [], [], True
    for _ in range(reps):
        common.fresh_g1(eng)
        if tier != "G2":
            store.g2.clear()
            if cache == "cold":
                common.drop_cache(files, args)
        conn.prefill_tokens_per_s = None  # speed unknown to the store: load it all
        llog.take()
        r = common.run_one(eng, prompt)
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
            common.drop_cache(files, args)
        res["raw"] = common.raw_read(files, args.load_workers)
        res["of_raw"] = res["object_GBps"] / res["raw"]["GBps"] if best else None
    return res


def run(args, eng, root: Path) -> dict:
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
        prompt = common.rand_prompt(n, vocab, seed=100 + n)
        ks = common.prompt_keys(eng, prompt)
        res: dict = {"prompt_tokens": n, "blocks": len(ks)}
        common.attach(eng, None)
        common.fresh_g1(eng)
        common.run_one(eng, prompt)  # warm-up (kernels for this length)
        rec = []
        steplog = None
        for i in range(3):
            common.fresh_g1(eng)
            steplog = StepLog(eng, 0.0) if i == 2 else None
            common.PROFILE_NEXT = args.profile_auto and i == 2
            r = common.run_one(eng, prompt, steplog=steplog)
            common.PROFILE_NEXT = False
            rec.append(r["ttft_s"])
            if r["first_step_profile"]:
                log("recompute's first step, profiled\n" + r["first_step_profile"])
        ref = common.run_one(eng, prompt)  # over G1: the tokens every load must reproduce
        res["recompute"] = {"ttft_s": med(rec), "all": rec, "per_step": steplog.close()}
        res["g1_hit_ttft_s"] = ref["ttft_s"]
        log(f"ttft {n}: recompute {res['recompute']}, G1 hit {ref['ttft_s']:.4f}s")
        # G2
        store = common.make_store(eng, root, "g2", args)
        conn = common.attach(eng, store)
        llog = LoadLog(store)
        common.save_from_g1(eng, conn, ks)
        # the engine's default (layer by layer where the loader can), then block by block
        default = eng.scheduler.loader.layered
        for name, layered in (("G2", default), ("G2 block", False)):
            eng.scheduler.loader.layered = layered
            res[name] = tier_runs(eng, conn, store, llog, prompt, ks, "G2", args, ref, "warm", 3)
            res[name]["raw_pinned_GBps"] = common.RESULTS.phases.get("env", {}).get("h2d_GBps", {})
            if name == "G2" and n == max(args.sizes):
                common.PROFILE_NEXT = True
                common.fresh_g1(eng)
                r = common.run_one(eng, prompt)
                common.PROFILE_NEXT = False
                res[name]["profiled_rep"] = {
                    k: r[k] for k in ("ttft_s", "gc_pauses", "load_submits_s", "first_step_profile")
                }
                log("admission profile\n" + (r["first_step_profile"] or ""))
            log(f"ttft {n} {name}", {k: v for k, v in res[name].items() if k != "raw_pinned_GBps"})
        common.attach(eng, None)
        store.close()
        for name, kw, tier in variants if args.disk_tiers else ():
            if (
                time.perf_counter() - T_START > args.budget_s * 0.55
                and n == max(args.sizes)
                and name != "G3 enc zstd"
            ):
                common.RESULTS.notes.append(f"ttft {n} {name}: skipped (time budget)")
                continue
            store = common.make_store(eng, root, "v", args, **kw)
            conn = common.attach(eng, store)
            llog = LoadLog(store)
            t0 = time.perf_counter()
            common.save_from_g1(eng, conn, ks)
            write_s = time.perf_counter() - t0
            v = {"write_s": write_s}
            for cache in ("cold", "warm"):
                v[cache] = tier_runs(eng, conn, store, llog, prompt, ks, tier, args, ref, cache, 2)
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
                    common.PROFILE_NEXT = args.profile_auto and rep == args.auto_reps - 1
                    common.fresh_g1(eng)
                    store.g2.clear()
                    common.drop_cache(common.object_files(store, tier, ks), args)
                    start_s = conn.load_start_s
                    misses = store.metrics.total("misses", tier=tier, reason="deadline")
                    steplog = StepLog(eng, 0.0)
                    r = common.run_one(eng, prompt, steplog=steplog)
                    common.PROFILE_NEXT = False
                    plan = conn.load_plan(common.PUBLIC, len(ks))
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
                    common.attach(eng, None)
                    store.close()
                    shutil.move(str(root / "v" / "g3"), str(keep))  # the split phase reuses it
                    shutil.rmtree(root / "v", ignore_errors=True)
                    continue
            common.attach(eng, None)
            store.close()
            shutil.rmtree(root / "v", ignore_errors=True)
        out[str(n)] = res
        common.RESULTS.save()
    return out


def _codecs(store: ContextStore, tier: str, ks: list[bytes]) -> dict:
    from kvgrid.store.codec import NAMES
    from kvgrid.store.object import read_header

    counts: dict[str, int] = {}
    t = store.tier(tier)
    for k in ks:
        head = t.read_prefix(tenant_id(common.PUBLIC), k, 4096)
        if head:
            c = NAMES.get(read_header(head).codec, "?")
            counts[c] = counts.get(c, 0) + 1
    return counts


def add_args(ap) -> None:
    ap.add_argument("--no-disk-tiers", dest="disk_tiers", action="store_false",
                    help="G2 only (skip the G3/G4 variants)")  # fmt: skip
    ap.add_argument("--auto-reps", type=int, default=3, help="engine's-choice runs per size")
    ap.add_argument("--profile-auto", action="store_true",
                    help="cProfile the first step of the last recompute and engine's-choice runs")  # fmt: skip


def summary(res: dict) -> list[str]:
    lines: list[str] = []
    t = res
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
    return lines


if __name__ == "__main__":
    sys.exit(main())
