"""Plots of a ``kvgrid.bench.gpu.store`` result: the replay's TTFT with and without the store
(by arrival, and as CDFs), and each prompt size's time to first token by source.

    python -m kvgrid.bench.gpu.plot_store bench/results/2026-12-03-h200-store-replay/gpu_store.json

Writes ``store_replay.png`` and ``store_ttft.png`` beside the JSON (for the phases it has).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _pyplot():
    """matplotlib, imported when a plot is drawn (--help stays fast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_replay(rep: dict, title: str, path: Path) -> None:
    plt = _pyplot()
    fig, (by_time, cdf) = plt.subplots(1, 2, figsize=(12, 4))
    for run in ("no_store", "store"):
        if run not in rep:
            continue
        rows = rep[run]["per_request"]  # arrival s, prompt tokens, cached tokens, TTFT s
        t = np.array([r[3] for r in rows])
        label = f"{run} (hit {rep[run]['hit_rate']:.1%})"
        by_time.plot([r[0] for r in rows], t, ".", ms=3, label=label)
        cdf.plot(np.sort(t), np.arange(1, len(t) + 1) / len(t), label=label)
    by_time.set(xlabel="arrival (s)", ylabel="TTFT (s)", yscale="log", title="TTFT by arrival")
    cdf.set(xlabel="TTFT (s)", ylabel="CDF", xscale="log", title="TTFT CDF")
    for ax in (by_time, cdf):
        ax.grid(alpha=0.3)
        ax.legend()
    theory = rep.get("theoretical_hit_rate", {}).get("token_weighted")
    fig.suptitle(f"{title}: replay" + (f", trace's hit rate {theory:.1%}" if theory else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_COLORS = {"recompute": "tab:gray", "choice": "tab:green", "warm": "tab:orange"}


def plot_ttft(ttft: dict, title: str, path: Path) -> None:
    plt = _pyplot()
    sizes = sorted(ttft, key=int)
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        rows = {k: v for k, v in ttft[n].items() if isinstance(v, dict)}
        names, secs = [], []
        for name, r in rows.items():
            for cache in ("cold", "warm"):  # disk tiers: page cache dropped, then warm
                if cache in r:
                    names.append(f"{name} {cache}")
                    secs.append(r[cache]["ttft_s"])
            if "ttft_s" in r:
                names.append(name)
                secs.append(r["ttft_s"])
        names = [x.replace("auto cold", "cold: engine's choice") for x in names]
        colors = [_COLORS.get(x.split()[-1], "tab:blue") for x in names]
        ax.barh(names, secs, color=colors)
        if "recompute" in rows:
            ax.axvline(rows["recompute"]["ttft_s"], color="k", lw=0.8, ls="--")
        ax.set(xlabel="time to first token (s)", title=f"{int(n):,}-token prompt")
        ax.invert_yaxis()
    fig.suptitle(f"{title}: a fully cached prompt, by where its KV comes from")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvgrid.bench.gpu.plot_store")
    ap.add_argument("result", type=Path, help="gpu_store.json")
    args = ap.parse_args(argv)
    res = json.loads(args.result.read_text())
    env = res["phases"].get("env", {})
    title = " ".join(str(env[k]) for k in ("device", "shape") if k in env) or "gpu_store"
    phases = res["phases"]
    if "replay" in phases:
        plot_replay(phases["replay"], title, args.result.with_name("store_replay.png"))
    if "ttft" in phases:
        plot_ttft(phases["ttft"], title, args.result.with_name("store_ttft.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
