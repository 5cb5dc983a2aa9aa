"""The store benchmark's enc phase: encryption's cost on G3 loads, as A/B pairs of encrypted
and plain loads of the same prompt, cold and warm.

    python -m kvgrid.bench.gpu.store_enc --enc-reps 4
"""

# ruff: noqa: E501  (summary rows and result records are long)
from __future__ import annotations

import json
import sys
from pathlib import Path

from kvgrid.bench.gpu import store_common as common
from kvgrid.bench.gpu.harness import log, med
from kvgrid.bench.gpu.store_probes import LoadLog
from kvgrid.bench.gpu.store_ttft import tier_runs

NAME = "enc"


def main(argv: list[str] | None = None) -> int:
    return common.main(argv, [sys.modules[__name__]])


def run(args, eng, root: Path) -> dict:
    """Encryption's cost on G3 as an interleaved A/B: the same prompt stored encrypted and
    plain (codec none) in two directories, loaded alternately (cold, then warm) ``--enc-reps``
    times each. A cold disk's speed swings by 10-20% between back-to-back rows of the ttft
    phase; alternating the two spreads that swing over both."""
    out: dict = {}
    vocab = eng.model_config.vocab_size
    for n in args.sizes:
        prompt = common.rand_prompt(n, vocab, seed=100 + n)
        ks = common.prompt_keys(eng, prompt)
        common.attach(eng, None)
        common.fresh_g1(eng)
        common.run_one(eng, prompt)
        ref = common.run_one(eng, prompt)  # over G1: the tokens every load must reproduce
        stores = {}
        for name, enc in (("enc", True), ("plain", False)):
            store = common.make_store(
                eng, root, f"ab_{name}", args, g3=True, codec="none", encrypt=enc
            )
            common.save_from_g1(eng, common.attach(eng, store), ks)
            stores[name] = store
        runs: dict = {name: {"cold": [], "warm": []} for name in stores}
        for rep in range(args.enc_reps):
            for name in ("enc", "plain") if rep % 2 == 0 else ("plain", "enc"):
                store = stores[name]
                conn, llog = common.attach(eng, store), LoadLog(store)
                for cache in ("cold", "warm"):
                    r = tier_runs(eng, conn, store, llog, prompt, ks, "G3", args, ref, cache, 1)
                    assert r["exact_and_complete"], f"{name} {cache}: load not exact"
                    runs[name][cache].append(
                        {k: r[k] for k in ("kv_GBps", "of_raw")} | {"raw_GBps": r["raw"]["GBps"]}
                    )
        common.attach(eng, None)
        for store in stores.values():
            store.close()
        res: dict = {"runs": runs}
        for cache in ("cold", "warm"):
            e = [x["kv_GBps"] for x in runs["enc"][cache]]
            p = [x["kv_GBps"] for x in runs["plain"][cache]]
            res[cache] = {
                "enc_GBps": med(e),
                "plain_GBps": med(p),
                "cost": 1 - med(e) / med(p),  # of throughput, medians of each
                "pair_costs": [1 - a / b for a, b in zip(e, p)],
            }
        out[str(n)] = res
        log(f"enc {n}", json.dumps({c: res[c] for c in ("cold", "warm")}, default=str))
    return out


def add_args(ap) -> None:
    ap.add_argument("--enc-reps", type=int, default=4, help="loads per variant")


def summary(res: dict) -> list[str]:
    lines: list[str] = []
    for n, by_cache in res.items():
        for cache in ("cold", "warm"):
            c = by_cache[cache]
            pairs = ", ".join(f"{x:+.1%}" for x in c["pair_costs"])
            lines.append(
                f"encryption A/B, G3 {n} {cache}: {c['enc_GBps']:.2f} vs {c['plain_GBps']:.2f} GB/s "
                f"(medians), cost {c['cost']:+.1%}; pairs {pairs}"
            )
    return lines


if __name__ == "__main__":
    sys.exit(main())
