"""GPU sweep of the small-M Triton GEMV (kvgrid/layers/gemv.py) against cuBLAS.

    python -m kvgrid.bench.gpu.gemv              # Llama-3-8B shapes, M = 1, 2, 4, 8
    python -m kvgrid.bench.gpu.gemv --shape llama3-70b --ms 1

For every projection shape of the model and every M: each tuner candidate is checked
against an fp32 reference (relative error; a candidate over 1e-2 cannot win), then timed
the way a decode step runs it (gemv.time_ms: back to back in a CUDA graph, a fresh copy
of the weight per call, so no L2 hits), as is F.linear (cuBLAS). Achieved bandwidth is
weight bytes over time, set against a device copy measured in the same run (2 x bytes
over time). Prints a table last; writes $OUT/gemv.json (all rows) and
$OUT/gemv_configs.json (the winners: KVGRID_GEMV_CONFIGS=that file pins them in an engine
run), and prints the winners as a PINNED dict to paste into kvgrid/layers/gemv.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvgrid.bench.gpu.harness import add_common_args, log
from kvgrid.layers import gemv as G
from kvgrid.models.shapes import dummy_config

MAX_REL_ERR = 1e-2  # one bf16 rounding of the output is ~2e-3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a 2 GiB device-to-device copy, read + write counted."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.nbytes / ms / 1e6


def sweep_shape(name: str, n: int, k: int, m: int, w: torch.Tensor, sms: int) -> dict:
    x = torch.randn(m, k, dtype=w.dtype, device=w.device)
    ref = F.linear(x.float(), w.float())
    gb = w.nbytes / 1e6  # GB/s = bytes / ms / 1e6
    cublas_ms = G.time_ms(lambda w_: F.linear(x, w_), w)
    rows = []
    for c in G.candidates(m, n, k, sms):
        row: dict = {"config": dataclasses.asdict(c)}
        try:
            row["rel_err"] = rel_err(G.gemv(x, w, None, c), ref)
            row["us"] = G.time_ms(lambda w_, c=c: G.gemv(x, w_, None, c), w) * 1e3
            row["GBps"] = gb / row["us"] * 1e3
        except Exception as e:  # a config this device cannot compile: reported, never picked
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
    ok = [r for r in rows if "us" in r and r["rel_err"] <= MAX_REL_ERR]
    best = min(ok, key=lambda r: r["us"]) if ok else None
    return {
        "proj": name,
        "n": n,
        "k": k,
        "m": m,
        "weight_MB": w.nbytes / 1e6,
        "cublas_us": cublas_ms * 1e3,
        "cublas_GBps": gb / cublas_ms,
        "cublas_rel_err": rel_err(F.linear(x, w), ref),
        "best": best,
        "bad": [r for r in rows if "error" in r or r.get("rel_err", 0) > MAX_REL_ERR],
        "candidates": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kvgrid.bench.gpu.gemv", description=__doc__.split("\n")[0]
    )
    add_common_args(ap)
    ap.add_argument("--shape", default="llama3-8b", help="a kvgrid.models.shapes name")
    ap.add_argument("--ms", default="1,2,4,8", help="row counts (tokens) to sweep")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kvgrid.bench.gpu.gemv needs CUDA (a GPU); nothing was measured", file=sys.stderr)
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    import triton

    env = {
        "gpu": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "sms": G._sm_count(dev),
    }
    log("env", env)
    t0 = time.perf_counter()
    env["copy_GBps"] = copy_bandwidth(dev)
    log(f"device copy: {env['copy_GBps']:.0f} GB/s (read + write)")
    cfg = dummy_config(args.shape)
    report(env, args.shape, cfg, *sweep(cfg, [int(m) for m in args.ms.split(",")], env, dev), out)
    print(f"took {time.perf_counter() - t0:.0f}s")
    return 0


def sweep(cfg, ms: list[int], env: dict, dev: torch.device) -> tuple[list[dict], dict]:
    """Every projection shape at every M: rows of results, and the winners per key."""
    results, winners = [], {}
    for name, (n, k) in cfg.projection_shapes().items():
        w = (torch.randn(n, k, device=dev) * k**-0.5).to(torch.bfloat16)
        for m in ms:
            r = sweep_shape(name, n, k, m, w, env["sms"])
            results.append(r)
            best = r["best"]
            win = best is not None and best["us"] < r["cublas_us"]
            winners[(G.m_bucket(m), n, k)] = G.GemvConfig(**best["config"]) if win else None
            log(
                f"{name} [{n}x{k}] M={m}: cuBLAS {r['cublas_GBps']:.0f} GB/s, Triton "
                + (f"{best['GBps']:.0f} GB/s {best['config']}" if best else "none correct")
                + (f"; {len(r['bad'])} candidates failed" if r["bad"] else "")
            )
        del w
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results, winners


def report(env: dict, shape: str, cfg, results: list[dict], winners: dict, out: Path) -> None:
    """Writes the JSON files; prints the PINNED dict, then the table."""
    copy_bw = env["copy_GBps"]
    ms = sorted({r["m"] for r in results})
    # a decode step's projections at each M: every layer's four, plus the logits once
    layers = cfg.num_hidden_layers
    steps = {}
    for m in ms:
        rs = [r for r in results if r["m"] == m]
        times = {"floor": 0.0, "cublas": 0.0, "best": 0.0}
        for r in rs:
            reps = 1 if r["proj"] == "lm_head" else layers
            times["floor"] += reps * r["weight_MB"] / copy_bw * 1e3
            times["cublas"] += reps * r["cublas_us"]
            best_us = r["best"]["us"] if r["best"] else r["cublas_us"]
            times["best"] += reps * min(best_us, r["cublas_us"])
        steps[m] = {key: us / 1e3 for key, us in times.items()}

    G.save_configs(out / "gemv_configs.json", winners)
    summary = {"env": env, "shape": shape, "step_ms": steps, "results": results}
    (out / "gemv.json").write_text(json.dumps(summary, indent=1))

    print("\nPINNED = {  # kvgrid.bench.gpu.gemv on", env["gpu"])
    for key, c in sorted(winners.items()):
        print(f"    {key}: {c!r},")
    print("}")
    print(f"\n{shape} on {env['gpu']}, copy {copy_bw:.0f} GB/s; GB/s = weight bytes / time")
    head = ("proj", "N x K", "M", "cuBLAS", "%", "Triton", "%", "x")
    print("{:<13}{:>14}{:>3}{:>9}{:>5}{:>9}{:>5}{:>6}  best config".format(*head))
    for r in results:
        b = r["best"]
        tri = b["GBps"] if b else float("nan")
        cfg_s = (
            "{block_n}/{block_k}/s{split_k}/w{num_warps}/st{num_stages}{dot}".format(
                **{**b["config"], "dot": "/dot" if b["config"]["dot"] else ""}
            )
            if b
            else "-"
        )
        print(
            f"{r['proj']:<13}{r['n']:>7}x{r['k']:<6}{r['m']:>3}"
            f"{r['cublas_GBps']:>9.0f}{100 * r['cublas_GBps'] / copy_bw:>5.0f}"
            f"{tri:>9.0f}{100 * tri / copy_bw:>5.0f}{tri / r['cublas_GBps']:>6.2f}  {cfg_s}"
        )
    print("\nprojections of one decode step (ms): floor at copy bandwidth / cuBLAS / best of both")
    for m, s in steps.items():
        print(f"  M={m}: {s['floor']:.2f} / {s['cublas']:.2f} / {s['best']:.2f}")
    print(f"\nwrote {out / 'gemv.json'} and {out / 'gemv_configs.json'}")


if __name__ == "__main__":
    sys.exit(main())
