"""Engine benchmark: throughput and latency on a fixed, seeded offline workload.

All requests arrive at once (offline batch); prompt and output lengths are uniform in the
given ranges, token ids random, EOS ignored, so every run does the same work.

    python -m kvgrid.bench.gpu.engine_offline --num-requests 16 --input-len 64 256 \
        --output-len 16 64
    python -m kvgrid.bench.gpu.engine_offline --model llama3-8b --load-format dummy \
        --num-requests 256 \
        --input-len 100 1024 --output-len 100 1024          # on a GPU

Prints a short table last and writes JSON (default out/engine_bench.json, or $OUT).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from kvgrid.bench.gpu import harness
from kvgrid.engine.args import add_engine_args, engine_config_from_args
from kvgrid.engine.llm_engine import LLMEngine
from kvgrid.engine.sampling_params import SamplingParams


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return float(torch.tensor(xs, dtype=torch.float64).quantile(q / 100))


def make_workload(args, vocab: int) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(args.workload_seed)
    reqs = []
    for _ in range(args.num_requests):
        n_in = int(torch.randint(args.input_len[0], args.input_len[1] + 1, (1,), generator=g))
        n_out = int(torch.randint(args.output_len[0], args.output_len[1] + 1, (1,), generator=g))
        reqs.append((torch.randint(0, vocab, (n_in,), generator=g).tolist(), n_out))
    return reqs


def run(engine: LLMEngine, workload, progress: bool = True) -> dict:
    token_times: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for i, (prompt, n_out) in enumerate(workload):
        rid = f"b{i}"
        engine.add_request(
            rid, prompt, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True)
        )
        token_times[rid] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(workload), desc="requests", unit="req", file=sys.stderr)
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        steps += 1
        for o in outs:
            token_times[o.request_id] += [now] * len(o.new_token_ids)
            if o.finished and bar is not None:
                bar.update(1)
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    ttft = [ts[0] - t0 for ts in token_times.values()]
    itl = [b - a for ts in token_times.values() for a, b in itertools.pairwise(ts)]
    e2e = [ts[-1] - t0 for ts in token_times.values()]
    n_in = sum(len(p) for p, _ in workload)
    n_out = sum(len(ts) for ts in token_times.values())
    return {
        "requests": len(workload),
        "input_tokens": n_in,
        "output_tokens": n_out,
        "elapsed_s": elapsed,
        "steps": steps,
        "output_tokens_per_s": n_out / elapsed,
        "total_tokens_per_s": (n_in + n_out) / elapsed,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
        "e2e_p50_s": percentile(e2e, 50),
        "num_preemptions": engine.stats()["num_preemptions"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser("kvgrid.bench.gpu.engine_offline", __doc__)
    add_engine_args(ap)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, nargs=2, default=[64, 256])
    ap.add_argument("--output-len", type=int, nargs=2, default=[16, 64])
    ap.add_argument("--workload-seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests before timing")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT or out/)")
    args = ap.parse_args(argv)

    engine = LLMEngine(engine_config_from_args(args))
    workload = make_workload(args, engine.model_config.vocab_size)
    if args.warmup:
        run(engine, workload[: args.warmup], progress=False)
        engine.block_manager.reset_prefix_cache()
    result = run(engine, workload)
    env = {
        **harness.versions(),
        "device": torch.cuda.get_device_name()
        if engine.device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}",
        "model": engine.spec.name,
        "dtype": str(engine.runner.dtype),
        "attention_backend": engine.runner.backend.name,
        "block_size": engine.config.block_size,
        "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "max_num_seqs": engine.config.max_num_seqs,
        "input_len": args.input_len,
        "output_len": args.output_len,
    }
    record = {"env": env, "result": result}
    out = Path(args.out or Path(os.environ.get("OUT", "out")) / "engine_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"engine bench: {env['model']} on {env['device']} ({env['dtype']})")
    for col in (
        "requests",
        "in/out tokens",
        "out tok/s",
        "total tok/s",
        "TTFT p50/p99 s",
        "ITL p50/p99 ms",
    ):
        t.add_column(col)
    r = result
    t.add_row(
        str(r["requests"]),
        f"{r['input_tokens']}/{r['output_tokens']}",
        f"{r['output_tokens_per_s']:.1f}",
        f"{r['total_tokens_per_s']:.1f}",
        f"{r['ttft_p50_s']:.2f}/{r['ttft_p99_s']:.2f}",
        f"{r['itl_p50_s'] * 1e3:.1f}/{r['itl_p99_s'] * 1e3:.1f}",
    )
    Console().print(t)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
