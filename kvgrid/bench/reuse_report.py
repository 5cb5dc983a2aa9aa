"""`kvgrid bench reuse` command: flags, the run over every configuration, the summary table,
JSON and plot (the workload and one configuration's run are in ``reuse.py``)."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from kvgrid.bench.reuse import (
    CONFIGS,
    AgentWorkload,
    config_options,
    fresh_dirs,
    guarantee_check,
    run_config,
    store_configs,
)
from kvgrid.engine.config import EngineConfig
from kvgrid.gc_tuning import tune_gc
from kvgrid.store.config import StoreConfig

# workload and engine sizes: "small" runs in minutes on a CPU with the default model;
# "large" saturates one H200 with an 8B model (histories ~3x larger than the capped G1)
PRESETS = {
    "small": dict(
        conversations=6,
        rounds=3,
        context_tokens=384,
        user_tokens=64,
        answer_tokens=16,
        max_num_seqs=2,
        max_num_batched_tokens=512,
    ),
    "large": dict(
        conversations=32,
        rounds=6,
        context_tokens=4096,
        user_tokens=256,
        answer_tokens=64,
        max_num_seqs=8,
        max_num_batched_tokens=8192,
    ),
}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or dummy shape (default model)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--size",
        choices=list(PRESETS),
        default=None,
        help="preset sizes (default: large on a GPU, small on a CPU)",
    )
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"of {','.join(CONFIGS)}; a store's may add +wt or +nowt (write-through on or "
        "off; default: on where G2 holds what G1 can cache) and +noprocs (no fetch or write "
        "processes), e.g. g2+nowt, g4+noprocs",
    )
    for name in (
        "conversations",
        "rounds",
        "context_tokens",
        "user_tokens",
        "answer_tokens",
        "max_num_seqs",
        "max_num_batched_tokens",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument(
        "--system-tokens", type=int, default=0, help="a prefix every conversation shares"
    )
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument(
        "--g1-blocks",
        type=int,
        default=None,
        help="capped G1 (default: 1.25x what the running requests need)",
    )
    p.add_argument(
        "--small-g2-blocks",
        type=int,
        default=None,
        help="G2 of the g3/g4 configurations (default: half the capped G1)",
    )
    p.add_argument("--disk-dir", default=None, help="G3 root (default: a new temporary dir)")
    p.add_argument(
        "--shared-dir",
        default=None,
        help="G4 root: a shared filesystem path (default: a new temporary dir)",
    )
    p.add_argument("--load-workers", type=int, default=None)
    p.add_argument(
        "--fetch-procs",
        type=int,
        default=None,
        help="processes that open the disk tiers' objects (StoreConfig.fetch_procs)",
    )
    p.add_argument(
        "--write-procs",
        type=int,
        default=None,
        help="processes that encode and write blocks going down to the disk tiers "
        "(StoreConfig.write_procs)",
    )
    p.add_argument(
        "--io-workers",
        type=int,
        default=None,
        help="threads that write blocks down to the disk tiers (StoreConfig.io_workers)",
    )
    p.add_argument(
        "--prompt-drain-s",
        type=float,
        default=EngineConfig.prompt_drain_s,
        help="the engine's drain window for waiting prompts (0: mixed steps sized by the "
        "slowdown share alone)",
    )
    p.add_argument(
        "--guarantee-tokens",
        default="",
        help="prompt lengths for the per-request check (default: the context length)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (the PNG plot next to it)")
    p.add_argument("--no-progress", action="store_true")


def _sizes(args: argparse.Namespace, gpu: bool) -> dict:
    preset = dict(PRESETS[args.size or ("large" if gpu else "small")])
    for k in preset:
        v = getattr(args, k)
        if v is not None:
            preset[k] = v
    return preset


def run(args: argparse.Namespace) -> int:
    """``kvgrid bench reuse``: every configuration, the table, JSON and plot."""
    from kvgrid.engine.llm_engine import LLMEngine

    gpu = torch.cuda.is_available() and args.device in ("auto", "cuda")
    sz = _sizes(args, gpu)
    wl = AgentWorkload(
        sz["conversations"],
        sz["rounds"],
        sz["context_tokens"],
        sz["user_tokens"],
        sz["answer_tokens"],
        args.system_tokens,
        args.seed,
    )
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = []
    for n in names:
        try:
            if config_options(n)[0] not in CONFIGS:
                bad.append(n)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if bad or not names:
        print(
            f"error: unknown configuration {bad}: choose from {', '.join(CONFIGS)}", file=sys.stderr
        )
        return 2
    bs = args.block_size
    per_conv = -(-wl.max_tokens // bs)
    g1 = args.g1_blocks or int(1.25 * sz["max_num_seqs"] * per_conv) + 2
    pool = max(g1, wl.conversations * per_conv + 2 * sz["max_num_seqs"]) + 8
    eng = LLMEngine(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        block_size=bs,
        num_kv_blocks=pool,
        max_num_seqs=sz["max_num_seqs"],
        seed=args.seed,
        max_num_batched_tokens=sz["max_num_batched_tokens"],
        max_model_len=wl.max_tokens + bs,
        prompt_drain_s=args.prompt_drain_s,
    )
    eng.warm_thread()
    tune_gc()  # the engine is long-lived: out of the collector's reach, as in serving
    disk, shared, made = fresh_dirs(
        Path(args.disk_dir) if args.disk_dir else None,
        Path(args.shared_dir) if args.shared_dir else None,
    )
    small_g2 = args.small_g2_blocks or max(1, g1 // 2)
    opts = {
        "load_workers": args.load_workers,
        "fetch_procs": args.fetch_procs,
        "write_procs": args.write_procs,
        "io_workers": args.io_workers,
    }
    opts = {k: v for k, v in opts.items() if v is not None}
    configs = store_configs(eng, wl, names, g1, small_g2, disk, shared, opts)
    results: dict[str, dict] = {}
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(configs) * wl.conversations * wl.rounds,
            unit="req",
            desc="bench reuse",
            file=sys.stderr,
        )
    try:
        for cfg in configs:
            if bar is not None:
                bar.set_postfix_str(cfg.name)
            results[cfg.name] = run_config(eng, wl, cfg, bar)
            if args.out:  # what is done so far survives a run cut short
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=1, default=str))
        lens = [int(x) for x in args.guarantee_tokens.split(",") if x] or [wl.context_tokens]
        for cfg in configs:
            if cfg.store is not None:
                vocab = eng.model_config.vocab_size
                checks = [guarantee_check(eng, cfg, wl._tokens(n, vocab, 1 << 31, n)) for n in lens]
                results[cfg.name]["guarantee"] = checks
    finally:
        if bar is not None:
            bar.close()
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
    out = {
        "bench": "reuse",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hardware": _hardware(eng),
        "model": {
            "name": args.model or "default",
            "load_format": args.load_format,
            "dtype": str(eng.runner.dtype),
        },
        "workload": {
            **wl.__dict__,
            "block_size": bs,
            "theoretical_hit_rate": wl.theoretical_hit_rate(bs),
        },
        "engine": {
            "pool_blocks": pool,
            "g1_blocks": g1,
            "small_g2_blocks": small_g2,
            "max_num_seqs": sz["max_num_seqs"],
            "max_num_batched_tokens": sz["max_num_batched_tokens"],
            "prompt_drain_s": eng.config.prompt_drain_s,
            "block_bytes": eng.runner.kv_cache[0].nbytes,
        },
        "dirs": {"g3": str(disk), "g4": str(shared)},
        # the stores' options, and the fetch processes they ran with (auto: by CPUs)
        "store": {
            **opts,
            "fetch_procs_run": StoreConfig(**opts).fetch_procs_here(),
            "write_procs_run": StoreConfig(**opts).write_procs_here(),
        },
        "results": results,
        "summary": summarize(results, wl.theoretical_hit_rate(bs)),
    }
    print(format_table(out))
    if args.out:
        p = Path(args.out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {p}")
        png = plot(out, p.with_suffix(".png"))
        if png:
            print(f"wrote {png}")
    return 0


def _hardware(eng) -> dict:
    hw = {
        "device": str(eng.device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    if eng.device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(eng.device)
    return hw


def summarize(results: dict[str, dict], theoretical: float) -> dict:
    """Per configuration: speed-up over no store, the fraction of the ceiling's gain it
    recovers ((t - t_none) / (t_ceiling - t_none)), hit rate against the theoretical one and
    against the ceiling's, energy per token against no store."""
    none, ceil = results.get("none"), results.get("ceiling")
    out = {}
    for name, r in results.items():
        row = {
            "output_tok_s": r["output_tok_s"],
            "hit_rate": r["hit_rate"],
            "theoretical_hit_rate": theoretical,
        }
        if none:
            row["speedup_vs_none"] = r["output_tok_s"] / none["output_tok_s"]
            if r.get("j_per_output_token") and none.get("j_per_output_token"):
                row["energy_vs_none"] = r["j_per_output_token"] / none["j_per_output_token"]
        if none and ceil and ceil["output_tok_s"] != none["output_tok_s"]:
            gain = ceil["output_tok_s"] - none["output_tok_s"]
            row["ceiling_gain_fraction"] = (r["output_tok_s"] - none["output_tok_s"]) / gain
        if ceil:
            row["hit_rate_vs_ceiling_points"] = 100 * (r["hit_rate"] - ceil["hit_rate"])
        if "kv_check" in r:
            row["kv_bit_exact"] = r["kv_check"]
        if r.get("guarantee"):
            row["worst_stored_vs_recompute"] = max(g["ratio"] for g in r["guarantee"])
        out[name] = row
    return out


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(out: dict) -> str:
    s = out["summary"]
    w = out["workload"]
    lines = [
        f"workload: {w['conversations']} conversations x {w['rounds']} rounds, context "
        f"{w['context_tokens']}, +{w['user_tokens']} user / {w['answer_tokens']} answer tokens; "
        f"theoretical hit rate {w['theoretical_hit_rate']:.3f}",
        f"{'config':8} {'out tok/s':>10} {'x none':>7} {'ceil gain':>9} {'hit':>6} "
        f"{'TTFT p50':>9} {'p90':>7} {'p99':>7} {'J/tok':>7} {'kv exact':>9} {'vs recomp':>9}",
    ]
    for name, row in s.items():
        r = out["results"][name]
        kv = row.get("kv_bit_exact")
        kvs = f"{kv['bit_exact']}/{kv['loaded']}" if kv else "-"
        lines.append(
            f"{name:8} {r['output_tok_s']:10.1f} {_f(row.get('speedup_vs_none'), '7.2f')} "
            f"{_f(row.get('ceiling_gain_fraction'), '9.2f')} {r['hit_rate']:6.3f} "
            f"{_f(r['ttft_p50_s'], '9.3f')} {_f(r['ttft_p90_s'], '7.3f')} "
            f"{_f(r['ttft_p99_s'], '7.3f')} {_f(r.get('j_per_output_token'), '7.3f')} "
            f"{kvs:>9} {_f(row.get('worst_stored_vs_recompute'), '9.2f')}"
        )
    for name, r in out["results"].items():
        sp = r.get("steps")
        if sp:
            lines.append(
                f"  {name} steps: {sp['steps']} ({sp['prompt_steps']} with prompt tokens "
                f"{sp['prompt_s']:.2f} s, {sp['decode_only_steps']} decode-only "
                f"{sp['decode_only_s']:.2f} s, {sp['idle_steps']} idle {sp['idle_s']:.2f} s); "
                f"decode batch {_f(sp['decode_batch_mean'], '.1f')}, running "
                f"{_f(sp['running_mean'], '.1f')}, held by loads {sp['load_held_seq_steps']} "
                f"request-steps"
            )
            if sp.get("launch_s"):
                ls = sp["launch_s"]
                lines.append(
                    f"  {name} engine thread: planning {sp['schedule_s']:.2f} s, launching "
                    f"{ls['decode_only']:.2f} s (decode-only steps) + {ls['with_prompt']:.2f} s "
                    f"(steps with prompt tokens)"
                )
            if sp.get("stream_waits_s"):
                waits = ", ".join(f"{k} {v:.3f} s" for k, v in sp["stream_waits_s"].items())
                lines.append(f"  {name} stream stalls at the store's waits: {waits}")
        st = r.get("store")
        if not st:
            continue
        bw = ", ".join(
            f"{t}: {v['bytes_loaded'] / 1e9:.2f} GB loaded at "
            f"{_f(v['bandwidth_used'] and 100 * v['bandwidth_used'], '.1f')}% of "
            f"{v['measured_bytes_per_s'] / 1e9:.2f} GB/s"
            for t, v in st["tiers"].items()
        )
        lines.append(f"  {name}: {bw}")
        for t, w in st.get("written", {}).items():
            run, one = w["bytes_per_s_over_run"], w["writer_bytes_per_s"]
            lines.append(
                f"  {name}: {t}: {w['bytes_written'] / 1e9:.2f} GB written down, "
                f"{_f(run and run / 1e9, '.2f')} GB/s over the run, "
                f"{_f(one and one / 1e9, '.2f')} GB/s per writer"
            )
        if st["lost_hits"]:
            lines.append(f"  {name} lost hits: {st['lost_hits']}")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(out["results"])
    res = out["results"]
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.8))
    ax[0].bar(names, [res[n]["output_tok_s"] for n in names], color="tab:blue")
    ax[0].set_title("output tokens/s")
    ax[1].bar(names, [res[n]["hit_rate"] for n in names], color="tab:green")
    ax[1].axhline(out["workload"]["theoretical_hit_rate"], color="k", ls="--", label="theory")
    ax[1].set_title("prompt tokens from cache")
    ax[1].legend()
    for q, c in (("p50", "tab:orange"), ("p90", "tab:red")):
        ax[2].plot(names, [res[n][f"ttft_{q}_s"] for n in names], "o-", color=c, label=q)
    ax[2].set_title("time to first token (s)")
    ax[2].legend()
    jt = [res[n].get("j_per_output_token") or 0 for n in names]
    ax[3].bar(names, jt, color="tab:purple")
    ax[3].set_title("J per output token" + ("" if any(jt) else " (no NVML)"))
    fig.suptitle(f"kvgrid bench reuse: {out['hardware'].get('gpu', out['hardware']['device'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
