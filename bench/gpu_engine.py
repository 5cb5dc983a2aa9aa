"""GPU benchmark of the engine's CUDA path: correctness first, then speed, in one run.

    PYTHONPATH=. python3 bench/gpu_engine.py                 # everything (one H100, ~8 min)
    PYTHONPATH=. python3 bench/gpu_engine.py --phases env,tests,kernels

Phases (in order): env (versions; copy bandwidth and bf16 matmul rate measured here, the
two roofline ceilings), tests (pytest tests/test_triton_*.py on the GPU), kernels (Triton
attention vs torch SDPA), correct (logits vs transformers on the same weights: prefill,
decode through the CUDA graph, prefill over a cached prefix), B (batch-1 decode, 1K prompt,
256 new tokens), C (prefill of 8K and 32K prompts vs transformers' SDPA forward), A (256
requests, prompt and output lengths uniform in [100, 1024], seed 0, ignore EOS; then the
same token lists through transformers' continuous batching).

Model: Llama-3.1-8B shape (the Llama-3-8B weights with a context long enough for C),
random bf16 weights. Energy per token from NVML's energy counter where the card has one.
Prints a short table last; writes $OUT/gpu_engine.json (or ./out/).
"""

# ruff: noqa: B023, E501  (timing lambdas run inside their loop iteration; summary rows are long)
from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = os.environ.get("KVGRID_BENCH_SHAPE", "llama3.1-8b")  # a small shape for a CPU smoke run
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RESULTS: dict = {"phases": {}, "errors": {}}


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return float(torch.tensor(xs, dtype=torch.float64).quantile(q / 100))


def bench_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` timed with CUDA events."""
    if DEV.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


class Energy:
    """NVML's cumulative energy counter (mJ), read around a phase."""

    def __init__(self):
        self.h = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self.read()
        except Exception as e:  # no NVML or no counter on this card
            log("NVML energy counter unavailable:", e)
            self.h = None

    def read(self) -> float | None:
        if self.h is None:
            return None
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.h) / 1e3  # joules

    def per_token(self, j0: float | None, tokens: int) -> float | None:
        j1 = self.read()
        return None if j0 is None or j1 is None or not tokens else (j1 - j0) / tokens


# ---- env and ceilings --------------------------------------------------------------------


def phase_env(args) -> dict:
    import transformers
    import triton

    if DEV.type != "cuda":
        return {
            "device": "cpu",
            "copy_bw_GBps": 10.0,
            "matmul_TFLOPs": 0.1,
            "torch": torch.__version__,
        }
    props = torch.cuda.get_device_properties(DEV)
    env = {
        "device": torch.cuda.get_device_name(),
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        env["nvidia_smi"] = smi.stdout.strip()
    except Exception as e:
        env["nvidia_smi"] = repr(e)
    # ceiling 1: device-to-device copy, bytes read + written
    n = 2 * 2**30
    src = torch.randn(n // 4, device=DEV)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), reps=20)
    env["copy_bw_GBps"] = 2 * n / ms / 1e6
    # ceiling 2: bf16 matrix product on random data
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b, reps=20)
    env["matmul_TFLOPs"] = 2 * 8192**3 / ms / 1e9
    torch.cuda.empty_cache()
    return env


def phase_tests(args) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_triton_attention.py",
            "tests/test_triton_cuda_graphs.py",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = p.stdout.strip().splitlines()[-15:]
    print("\n".join(tail), flush=True)
    return {
        "rc": p.returncode,
        "summary": tail[-1] if tail else "",
        "seconds": time.perf_counter() - t0,
    }


# ---- kernels vs SDPA ---------------------------------------------------------------------


def phase_kernels(args) -> dict:
    import torch.nn.functional as F

    from kvgrid.engine.attention import triton_kernels as tk

    H, KVH, D, BS = 32, 8, 128, 64
    dt = torch.bfloat16
    out: dict = {"decode": [], "prefill": []}
    bw = RESULTS["phases"].get("env", {}).get("copy_bw_GBps", 3000.0)

    def paged(num_seqs: int, seq_len: int):
        nblk = -(-seq_len // BS)
        cache = torch.randn(num_seqs * nblk + 1, 1, 2, BS, KVH, D, device=DEV, dtype=dt)
        perm = torch.randperm(num_seqs * nblk, device=DEV).int() + 1
        tables = perm.view(num_seqs, nblk)
        return cache[:, 0], tables

    for num_seqs, seq_len in (
        (1, 1024),
        (1, 8192),
        (1, 32768),
        (32, 1024),
        (128, 1024),
        (256, 1024),
        (256, 2048),
    ):
        lc, tables = paged(num_seqs, seq_len)
        q = torch.randn(num_seqs, H, D, device=DEV, dtype=dt)
        lens = torch.full((num_seqs,), seq_len, device=DEV, dtype=torch.int32)
        o = torch.empty_like(q)
        splits = tk.decode_num_splits(
            num_seqs, KVH, seq_len, torch.cuda.get_device_properties(DEV).multi_processor_count
        )
        ms = bench_ms(
            lambda: tk.paged_decode(q, lc, tables, lens, D**-0.5, splits, o, tk.dot_dtype_for(dt))
        )
        kv_bytes = num_seqs * seq_len * KVH * D * 2 * 2
        # the dense reference: SDPA on contiguous K/V (what a non-paged engine would read)
        kd = torch.randn(num_seqs, KVH, seq_len, D, device=DEV, dtype=dt)
        vd = torch.randn_like(kd)
        qd = q.view(num_seqs, H, 1, D)
        try:
            ms_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True))
        except Exception as e:
            ms_sdpa = float("nan")
            log("sdpa decode failed:", e)
        row = {
            "batch": num_seqs,
            "seq_len": seq_len,
            "splits": splits,
            "triton_ms": ms,
            "sdpa_dense_ms": ms_sdpa,
            "GBps": kv_bytes / ms / 1e6,
            "of_copy_bw": kv_bytes / ms / 1e6 / bw,
        }
        out["decode"].append(row)
        log("decode", row)
    torch.cuda.empty_cache()

    for ctx, new in ((0, 8192), (0, 32768), (6144, 2048), (30720, 2048)):
        seq_len = ctx + new
        lc, tables = paged(1, seq_len)
        q = torch.randn(new, H, D, device=DEV, dtype=dt)
        o = torch.empty_like(q)
        qsl = torch.tensor([0, new], device=DEV, dtype=torch.int32)
        cl = torch.tensor([ctx], device=DEV, dtype=torch.int32)
        ms = bench_ms(
            lambda: tk.paged_prefill(q, lc, tables, qsl, cl, new, D**-0.5, o, tk.dot_dtype_for(dt)),
            reps=5,
        )
        flops = 4 * H * D * new * (ctx + (new + 1) / 2)
        row = {"context": ctx, "new": new, "triton_ms": ms, "triton_TFLOPs": flops / ms / 1e9}
        if ctx == 0:
            qd = q.transpose(0, 1).unsqueeze(0)
            kd = torch.randn(1, KVH, new, D, device=DEV, dtype=dt)
            vd = torch.randn_like(kd)
            for name, fn in (
                (
                    "sdpa_gqa",
                    lambda: F.scaled_dot_product_attention(
                        qd, kd, vd, is_causal=True, enable_gqa=True
                    ),
                ),
                (
                    "sdpa_expanded",
                    lambda: F.scaled_dot_product_attention(
                        qd,
                        kd.repeat_interleave(H // KVH, 1),
                        vd.repeat_interleave(H // KVH, 1),
                        is_causal=True,
                    ),
                ),
            ):
                try:
                    row[name + "_ms"] = bench_ms(fn, reps=5)
                except Exception as e:
                    row[name + "_ms"] = float("nan")
                    log(name, "failed:", e)
        out["prefill"].append(row)
        log("prefill", row)
    torch.cuda.empty_cache()
    return out


# ---- the engine and transformers on the same weights -----------------------------------


def build_engine(args):
    from kvgrid.engine.config import EngineConfig
    from kvgrid.engine.llm_engine import LLMEngine

    cfg = EngineConfig(
        model=SHAPE,
        load_format="dummy",
        dtype="bfloat16" if DEV.type == "cuda" else "float32",
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
        cuda_graphs=not args.no_cuda_graphs,
    )
    t0 = time.perf_counter()
    eng = LLMEngine(cfg)
    log(
        f"engine ready in {time.perf_counter() - t0:.1f}s: {eng.runner.num_blocks} KV blocks, "
        f"backend {eng.runner.backend.name}, graphs {eng.runner.graphs is not None}"
    )
    return eng


def build_hf(eng):
    """transformers' LlamaForCausalLM holding the engine's very tensors (no copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvgrid.models.shapes import shape_dict

    hcfg = LlamaConfig.from_dict(shape_dict(SHAPE))
    hcfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(hcfg)
    missing, unexpected = hf.load_state_dict(
        eng.runner.model.hf_state_dict(), strict=False, assign=True
    )
    assert not unexpected, unexpected
    missing = [m for m in missing if "rotary" not in m]
    if hcfg.tie_word_embeddings:
        hf.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    assert not missing, missing
    rot = hf.model.rotary_emb
    hf.model.rotary_emb = type(rot)(config=hcfg, device=DEV)
    for name, buf in hf.named_buffers():
        assert not buf.is_meta, f"{name} left on the meta device"
    return hf.eval()


def _meta(ctx_lens, q_lens, tables, block_size):
    from kvgrid.engine.attention.base import AttentionMetadata

    qsl, slots = [0], []
    for i, (c, n) in enumerate(zip(ctx_lens, q_lens)):
        qsl.append(qsl[-1] + n)
        slots += [
            int(tables[i][p // block_size]) * block_size + p % block_size for p in range(c, c + n)
        ]
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
    i32 = dict(dtype=torch.int32, device=DEV)
    return AttentionMetadata(
        query_start_loc=torch.tensor(qsl, **i32),
        seq_lens=torch.tensor(seq_lens, **i32),
        context_lens=torch.tensor(ctx_lens, **i32),
        block_tables=torch.tensor(tables, **i32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEV),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
        context_lens_cpu=list(ctx_lens),
    )


@torch.inference_mode()
def phase_correct(args, eng, hf) -> dict:
    run = eng.runner
    model, bs = run.model, run.block_size
    g = torch.Generator().manual_seed(1)
    n = 700
    prompt = torch.randint(0, model.config.vocab_size, (n,), generator=g)
    ref = hf(prompt[None].to(DEV)).logits[0].float()  # [n, vocab]
    nblk = -(-n // bs)
    table = [list(range(run.num_blocks - nblk, run.num_blocks))]

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    def fwd(ids, ctx, meta, graph=False):
        pos = torch.arange(ctx, ctx + ids.shape[0], device=DEV)
        if graph:
            h = run.graphs.run(ids.to(DEV), pos, meta)
        else:
            h = model(ids.to(DEV), pos, run.kv_cache, meta, run.backend)
        return model.compute_logits(h)

    res = {}
    # 1. fresh prefill of n-1 tokens (SDPA path: no cached prefix, long chunk)
    m = _meta([0], [n - 1], table, bs)
    res["prefill_sdpa"] = rel(fwd(prompt[: n - 1], 0, m), ref[: n - 1])
    # 2. decode of the last token over the cache, through the CUDA graph when there is one
    m = _meta([n - 1], [1], table, bs)
    res["decode_graph" if run.graphs else "decode"] = rel(
        fwd(prompt[n - 1 :], n - 1, m, graph=run.graphs is not None), ref[n - 1 :]
    )
    res["decode_eager"] = rel(fwd(prompt[n - 1 :], n - 1, m), ref[n - 1 :])
    # 3. prefill over a cached prefix: tokens 256.. on top of the first 256 in the cache
    c = 4 * bs
    m = _meta([c], [n - c], table, bs)
    res["prefill_cached_prefix"] = rel(fwd(prompt[c:], c, m), ref[c:])
    # 4. fresh prefill through the Triton kernel instead of SDPA
    saved = run.backend.sdpa_min_query_len
    run.backend.sdpa_min_query_len = 10**9
    m = _meta([0], [n], table, bs)
    res["prefill_triton"] = rel(fwd(prompt, 0, m), ref)
    run.backend.sdpa_min_query_len = saved
    # 5. a mixed batch: one decode and one cached-prefix chunk in the same step
    m = _meta([n - 1, c], [1, n - c], table * 2, bs)
    ids = torch.cat([prompt[n - 1 :], prompt[c:]])
    pos = torch.cat([torch.tensor([n - 1]), torch.arange(c, n)]).to(DEV)
    lg = model.compute_logits(model(ids.to(DEV), pos, run.kv_cache, m, run.backend))
    res["mixed_batch"] = rel(lg, torch.cat([ref[n - 1 :], ref[c:]]))
    res["greedy_agree_prefill"] = float(
        (fwd(prompt, 0, _meta([0], [n], table, bs)).argmax(-1) == ref.argmax(-1)).float().mean()
    )
    res["pass"] = all(v <= 1e-2 for k, v in res.items() if not k.startswith(("greedy", "floor")))
    # the bf16 floor on these random weights: transformers against itself, eager vs SDPA
    hf.config._attn_implementation = "eager"
    try:
        eager = hf(prompt[None].to(DEV)).logits[0].float()
        res["floor_hf_eager_vs_hf_sdpa"] = rel(eager, ref)
    finally:
        hf.config._attn_implementation = "sdpa"
    eng.block_manager.reset_prefix_cache()
    return res


def make_workload(num: int, lo: int, hi: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(num):
        n_in = int(torch.randint(lo, hi + 1, (1,), generator=g))
        n_out = int(torch.randint(lo, hi + 1, (1,), generator=g))
        reqs.append((torch.randint(0, vocab, (n_in,), generator=g).tolist(), n_out))
    return reqs


class StepRecorder:
    """Wraps the runner's execute to log each step's shape (for the roofline) and GPU time."""

    def __init__(self, eng):
        self.eng = eng
        self.steps: list[tuple[int, list[int], list[int]]] = []
        self._orig = eng.runner.execute

        def execute(batch):
            self.steps.append(
                (
                    sum(s.num_tokens for s in batch),
                    [s.seq.num_computed_tokens + s.num_tokens for s in batch],
                    [s.num_tokens for s in batch],
                )
            )
            return self._orig(batch)

        eng.runner.execute = execute

    def close(self):
        self.eng.runner.execute = self._orig


def roofline_seconds(steps, cfg, bw_GBps: float, tflops: float) -> tuple[float, float]:
    """Sum over steps of max(bytes / bandwidth, flops / matmul rate); also the pure-bytes sum."""
    kv_tok = cfg.kv_bytes_per_token(2)
    weight_bytes = (cfg.param_count() - cfg.vocab_size * cfg.hidden_size) * 2  # embedding: a gather
    dense_flops_per_tok = 2 * (cfg.param_count() - cfg.vocab_size * cfg.hidden_size)
    hq, d, layers = cfg.num_attention_heads, cfg.head_dim, cfg.num_hidden_layers
    total = mem_only = 0.0
    for tokens, seq_lens, q_lens in steps:
        kv_read = sum(seq_lens) * kv_tok
        byts = weight_bytes + kv_read + tokens * kv_tok
        flops = dense_flops_per_tok * tokens + sum(
            4 * hq * d * layers * q * (s - q + (q + 1) / 2) for s, q in zip(seq_lens, q_lens)
        )
        t_mem = byts / (bw_GBps * 1e9)
        total += max(t_mem, flops / (tflops * 1e12))
        mem_only += t_mem
    return total, mem_only


def run_engine(eng, workload, energy: Energy | None = None, record=None) -> dict:
    from kvgrid.engine.sampling_params import SamplingParams

    times: dict[str, list[float]] = {}
    sync()
    j0 = energy.read() if energy else None
    t0 = time.perf_counter()
    for i, (prompt, n_out) in enumerate(workload):
        rid = f"r{i}-{time.monotonic_ns()}"
        eng.add_request(
            rid, prompt, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True)
        )
        times[rid] = []
    steps = 0
    step_s = []
    while eng.has_unfinished_requests():
        a = time.perf_counter()
        outs = eng.step()
        now = time.perf_counter()
        step_s.append(now - a)
        steps += 1
        for o in outs:
            times[o.request_id] += [now] * len(o.new_token_ids)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(t) for t in times.values())
    ttft = [t[0] - t0 for t in times.values()]
    itl = [b - a for t in times.values() for a, b in itertools.pairwise(t)]
    res = {
        "requests": len(workload),
        "input_tokens": sum(len(p) for p, _ in workload),
        "output_tokens": n_out,
        "elapsed_s": elapsed,
        "steps": steps,
        "output_tok_s": n_out / elapsed,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50) * 1e3,
        "itl_p99_ms": pct(itl, 99) * 1e3,
        "step_p50_ms": pct(step_s, 50) * 1e3,
        "preemptions": eng.stats()["num_preemptions"],
    }
    res["itl_p99_over_p50"] = res["itl_p99_ms"] / res["itl_p50_ms"] if itl else float("nan")
    if energy:
        res["J_per_token"] = energy.per_token(j0, n_out)
    return res


def with_budget(eng, tokens: int):
    """Swap the step token budget (the config is frozen; the scheduler reads it per step)."""
    cfg = dataclasses.replace(eng.config, max_num_batched_tokens=tokens)
    eng.config = cfg
    eng.scheduler.config = cfg


PROFILES: list[str] = []


def profile_steps(eng, prompt, n_steps: int, title: str, sort: str = "self_cpu_time_total"):
    """torch.profiler over one request's first steps; the table goes to $OUT/profiles.txt."""
    from torch.profiler import ProfilerActivity, profile

    from kvgrid.engine.sampling_params import SamplingParams

    eng.add_request(
        f"prof-{time.monotonic_ns()}",
        prompt,
        SamplingParams(max_tokens=n_steps, temperature=0, ignore_eos=True),
    )
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        while eng.has_unfinished_requests():
            eng.step()
        sync()
    PROFILES.append(f"==== {title}\n" + prof.key_averages().table(sort_by=sort, row_limit=18))
    eng.block_manager.reset_prefix_cache()


@torch.inference_mode()
def phase_B(args, eng, energy) -> dict:
    cfg = eng.model_config
    env = RESULTS["phases"]["env"]
    wl = make_workload(1, 1024, 1024, cfg.vocab_size, seed=2)
    wl = [(wl[0][0], 256)]
    run_engine(eng, [(wl[0][0][:64], 8)])  # warm-up
    rec = StepRecorder(eng)
    r = run_engine(eng, wl, energy)
    rec.close()
    eng.block_manager.reset_prefix_cache()
    run = eng.runner
    if run.graphs is not None and DEV.type == "cuda":
        # GPU time of one decode step alone: graph replay, then logits and argmax
        bucket = run.graphs.buckets[1]
        r["graph_replay_ms"] = bench_ms(bucket.graph.replay, reps=50)
        r["graph_logits_argmax_ms"] = bench_ms(
            lambda: (bucket.graph.replay(), run.model.compute_logits(bucket.output).argmax(-1)),
            reps=50,
        )
    profile_steps(eng, wl[0][0][:1024], 24, "B: 24 engine steps, batch 1 (by self CPU time)")
    kv_tok = cfg.kv_bytes_per_token(2)
    weight_bytes = (cfg.param_count() - cfg.vocab_size * cfg.hidden_size) * 2
    avg_ctx = 1024 + 128
    step_bytes = weight_bytes + avg_ctx * kv_tok
    roof_tok_s = env["copy_bw_GBps"] * 1e9 / step_bytes
    decode_tok_s = 1e3 / r["itl_p50_ms"]
    r.update(
        roofline_tok_s=roof_tok_s,
        decode_tok_s=decode_tok_s,
        of_roofline=decode_tok_s / roof_tok_s,
        weight_GB=weight_bytes / 1e9,
    )
    return r


def phase_C_ours(args, eng, energy) -> dict:
    cfg = eng.model_config
    out = {}
    for budget_name, budget in (("oneshot", 32768 + 64), ("chunked", 2048)):
        with_budget(eng, budget)
        for n in (8192, 32768):
            prompt = make_workload(1, n, n, cfg.vocab_size, seed=3 + n)[0][0]
            ts = []
            for rep in range(3):
                eng.block_manager.reset_prefix_cache()
                sync()
                j0 = energy.read()
                r = run_engine(eng, [(prompt[: n - rep], 1)])  # distinct prompts: no cache hit
                ts.append(r["ttft_p50_s"])
                jpt = energy.per_token(j0, n)
            out[f"{budget_name}_{n}"] = {
                "ttft_s": min(ts[1:]),
                "all": ts,
                "prefill_tok_s": n / min(ts[1:]),
                "J_per_prompt_token": jpt,
            }
            log("C ours", budget_name, n, out[f"{budget_name}_{n}"])
    with_budget(eng, 32768 + 64)
    prompt = make_workload(1, 8192, 8192, cfg.vocab_size, seed=5)[0][0]
    profile_steps(eng, prompt, 1, "C: kvgrid 8K prefill (by CUDA time)", sort="cuda_time_total")
    with_budget(eng, args.max_num_batched_tokens)
    eng.block_manager.reset_prefix_cache()
    return out


@torch.inference_mode()
def phase_C_hf(args, hf, vocab) -> dict:
    out = {}
    for n in (8192, 32768):
        prompt = torch.tensor(make_workload(1, n, n, vocab, seed=3 + n)[0][0], device=DEV)[None]
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
            PROFILES.append(
                "==== C: transformers 8K forward (by CUDA time)\n"
                + prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
            )
    return out


def phase_A_ours(args, eng, energy) -> dict:
    cfg = eng.model_config
    env = RESULTS["phases"]["env"]
    wl = make_workload(args.num_requests, 100, 1024, cfg.vocab_size, seed=0)
    run_engine(eng, make_workload(8, 100, 300, cfg.vocab_size, seed=99))  # warm-up: compiles
    eng.block_manager.reset_prefix_cache()
    rec = StepRecorder(eng)
    r = run_engine(eng, wl, energy)
    rec.close()
    roof, mem_only = roofline_seconds(rec.steps, cfg, env["copy_bw_GBps"], env["matmul_TFLOPs"])
    r["roofline_s"] = roof
    r["of_roofline"] = roof / r["elapsed_s"]
    r["memory_roofline_s"] = mem_only
    r["of_memory_roofline"] = mem_only / r["elapsed_s"]
    r["decode_only_steps"] = sum(1 for s in rec.steps if max(s[2]) == 1)
    r["max_batch"] = max(len(s[1]) for s in rec.steps)
    eng.block_manager.reset_prefix_cache()
    return r


def phase_A_hf(args, hf, vocab, energy) -> dict:
    from transformers import GenerationConfig

    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        from transformers.generation import ContinuousBatchingConfig

    wl = make_workload(args.num_requests, 100, 1024, vocab, seed=0)
    gen = GenerationConfig(do_sample=False, max_new_tokens=1024, eos_token_id=None, pad_token_id=0)
    cb_kwargs = {"max_memory_percent": 0.85}
    cb = ContinuousBatchingConfig(**cb_kwargs)
    hf.generation_config = gen
    manager = hf.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    manager.start()
    # warm-up (graph capture, compilation) outside the timed region
    wid = manager.add_request(wl[0][0][:64], max_new_tokens=4)
    while True:
        r = manager.get_result(timeout=60)
        if r is not None and r.is_finished():
            break
    sync()
    j0 = energy.read()
    t0 = time.perf_counter()
    ids = {}
    for i, (prompt, n_out) in enumerate(wl):
        rid = manager.add_request(
            prompt,
            request_id=f"hf{i}",
            max_new_tokens=n_out,
            record_timestamps=True,
            streaming=True,  # partial outputs: unfinished requests' tokens count at the deadline
        )
        ids[rid] = n_out
    done: dict = {}
    deadline = t0 + args.hf_deadline_s
    seen: dict[str, int] = {}
    while len(done) < len(ids) and time.perf_counter() < deadline:
        r = manager.get_result(timeout=1)
        if r is None:
            continue
        seen[r.request_id] = max(seen.get(r.request_id, 0), len(r.generated_tokens))
        if r.is_finished():
            done[r.request_id] = r
    elapsed = time.perf_counter() - t0
    manager.stop(block=True, timeout=10)
    n_out = sum(seen.values())
    ttft, itl = [], []
    for r in done.values():
        ts = r.timestamps or []
        if ts:
            ttft.append(ts[0] - t0)
            itl += [b - a for a, b in itertools.pairwise(ts)]
    res = {
        "completed": len(done),
        "requests": len(ids),
        "output_tokens": n_out,
        "expected_tokens_ok": all(len(r.generated_tokens) == ids[k] for k, r in done.items()),
        "elapsed_s": elapsed,
        "output_tok_s": n_out / elapsed,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50) * 1e3,
        "itl_p99_ms": pct(itl, 99) * 1e3,
        "J_per_token": energy.per_token(j0, n_out),
        "attn_implementation": getattr(hf.config, "_attn_implementation", None),
        "warmup_request": wid,
    }
    return res


# ---- main ----------------------------------------------------------------------------------


def run_phase(name, fn, *a):
    log(f"=== {name}")
    t0 = time.perf_counter()
    try:
        RESULTS["phases"][name] = fn(*a)
    except Exception as e:
        RESULTS["errors"][name] = "".join(traceback.format_exception(e))[-3000:]
        log(f"{name} FAILED: {e!r}")
        traceback.print_exc()
    log(f"{name} took {time.perf_counter() - t0:.1f}s")
    save()


def save():
    out = Path(os.environ.get("OUT", "out")) / "gpu_engine.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=2, default=str))
    if PROFILES:
        (out.parent / "profiles.txt").write_text("\n\n".join(PROFILES))


def summary() -> None:
    P = RESULTS["phases"]
    env = P.get("env", {})
    rows = []
    if env:
        rows.append(
            (
                "ceilings",
                f"copy {env['copy_bw_GBps']:.0f} GB/s, bf16 mm {env['matmul_TFLOPs']:.0f} TFLOP/s",
                "",
            )
        )
    if "tests" in P:
        rows.append(("GPU tests", P["tests"]["summary"], ""))
    if "correct" in P:
        c = P["correct"]
        rows.append(
            (
                "logits rel err",
                ", ".join(
                    f"{k} {v:.1e}"
                    for k, v in c.items()
                    if isinstance(v, float) and not k.startswith("greedy")
                ),
                "pass" if c["pass"] else "FAIL",
            )
        )
    if "A_ours" in P:
        a = P["A_ours"]
        hf = P.get("A_hf", {})
        ratio = a["output_tok_s"] / hf["output_tok_s"] if hf.get("output_tok_s") else float("nan")
        rows.append(
            (
                "A kvgrid",
                f"{a['output_tok_s']:.0f} out tok/s, TTFT p50 {a['ttft_p50_s']:.2f}s, ITL p50/p99 {a['itl_p50_ms']:.1f}/{a['itl_p99_ms']:.1f} ms (x{a['itl_p99_over_p50']:.2f}), {a.get('J_per_token') or float('nan'):.2f} J/tok",
                f"{a['of_roofline']:.0%} of roofline ({a['of_memory_roofline']:.0%} of bytes-only)",
            )
        )
        if hf:
            rows.append(
                (
                    "A transformers",
                    f"{hf['output_tok_s']:.0f} out tok/s ({hf['completed']}/{hf['requests']} done), TTFT p50 {hf['ttft_p50_s']:.2f}s, ITL p50/p99 {hf['itl_p50_ms']:.1f}/{hf['itl_p99_ms']:.1f} ms, {hf.get('J_per_token') or float('nan'):.2f} J/tok",
                    f"kvgrid = {ratio:.1f}x",
                )
            )
    if "A_ours_small_budget" in P:
        a = P["A_ours_small_budget"]
        rows.append(
            (
                f"A budget {RESULTS['args']['small_budget']}",
                f"{a['output_tok_s']:.0f} out tok/s, TTFT p50 {a['ttft_p50_s']:.2f}s, ITL p50/p99 {a['itl_p50_ms']:.1f}/{a['itl_p99_ms']:.1f} ms (x{a['itl_p99_over_p50']:.2f})",
                f"{a['of_roofline']:.0%} of roofline",
            )
        )
    if "B" in P:
        b = P["B"]
        rows.append(
            (
                "B batch-1",
                f"{b['decode_tok_s']:.0f} tok/s decode, TTFT {b['ttft_p50_s'] * 1e3:.0f} ms, ITL p50/p99 {b['itl_p50_ms']:.2f}/{b['itl_p99_ms']:.2f} ms, {b.get('J_per_token') or float('nan'):.2f} J/tok",
                f"{b['of_roofline']:.0%} of {b['roofline_tok_s']:.0f} tok/s roofline",
            )
        )
    if "C_ours" in P:
        c, h = P["C_ours"], P.get("C_hf", {})
        for n in (8192, 32768):
            o, ch = c.get(f"oneshot_{n}"), c.get(f"chunked_{n}")
            hs = h.get(str(n), {}).get("s")
            if o:
                rows.append(
                    (
                        f"C prefill {n // 1024}K",
                        f"kvgrid {o['ttft_s']:.3f}s one-shot, {ch['ttft_s']:.3f}s chunked; transformers {hs if hs is None else round(hs, 3)}s",
                        f"{hs / o['ttft_s']:.2f}x" if hs else "",
                    )
                )
    print("\n" + "=" * 100)
    for name, val, note in rows:
        print(f"{name:<16} {val}  {note}")
    if RESULTS["errors"]:
        print("errors in:", ", ".join(RESULTS["errors"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--phases", default="env,tests,kernels,correct,B,C,A,hf")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    # A again with small prefill chunks, which keep mixed steps near a decode step (ITL p99)
    ap.add_argument("--small-budget", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=32768 + 1024)
    ap.add_argument("--num-kv-blocks", type=int, default=5000)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--hf-deadline-s", type=float, default=240.0)
    args = ap.parse_args(argv)
    phases = set(args.phases.split(","))
    RESULTS["args"] = vars(args)
    RESULTS["command"] = " ".join(["python3", "bench/gpu_engine.py", *(argv or sys.argv[1:])])
    torch.manual_seed(0)
    run_phase("env", phase_env, args)
    log(RESULTS["phases"].get("env"))
    if "tests" in phases:
        run_phase("tests", phase_tests, args)
    if "kernels" in phases:
        run_phase("kernels", phase_kernels, args)
    energy = Energy()
    eng = hf = None
    if phases & {"correct", "A", "B", "C", "hf"}:
        try:
            eng = build_engine(args)
        except Exception as e:
            RESULTS["errors"]["engine"] = "".join(traceback.format_exception(e))[-3000:]
            traceback.print_exc()
    if eng is not None:
        if phases & {"correct", "hf", "C"}:
            try:
                hf = build_hf(eng)
            except Exception as e:
                RESULTS["errors"]["build_hf"] = "".join(traceback.format_exception(e))[-3000:]
                traceback.print_exc()
        if "correct" in phases and hf is not None:
            run_phase("correct", phase_correct, args, eng, hf)
        if "B" in phases:
            run_phase("B", phase_B, args, eng, energy)
        if "C" in phases:
            run_phase("C_ours", phase_C_ours, args, eng, energy)
        if "A" in phases:
            run_phase("A_ours", phase_A_ours, args, eng, energy)
            # the same workload with a smaller step budget: shorter mixed steps, lower ITL p99
            with_budget(eng, args.small_budget)
            run_phase("A_ours_small_budget", phase_A_ours, args, eng, energy)
            with_budget(eng, args.max_num_batched_tokens)
        vocab = eng.model_config.vocab_size
        # give the engine's KV pool and graphs back before transformers sizes its own cache
        del eng
        gc.collect()
        torch.cuda.empty_cache()
        if hf is not None:
            if "C" in phases:
                run_phase("C_hf", phase_C_hf, args, hf, vocab)
            if "hf" in phases:
                run_phase("A_hf", phase_A_hf, args, hf, vocab, energy)
    summary()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
