"""GPU benchmark of the engine's CUDA path: correctness first, then speed, in one run.

    PYTHONPATH=. python3 bench/gpu_engine.py                 # everything (one H100, ~8 min)
    PYTHONPATH=. python3 bench/gpu_engine.py --phases env,tests,kernels

Phases (in order): env (versions; copy bandwidth and bf16 matmul rate measured here, the
two roofline ceilings), tests (pytest tests/test_triton_*.py on the GPU), kernels (Triton
attention vs torch SDPA), correct (logits vs transformers on the same weights: prefill,
decode through the CUDA graph, prefill over a cached prefix), B (batch-1 decode, 1K prompt,
256 new tokens), C (prefill of 8K and 32K prompts vs transformers' SDPA forward), A (256
requests, prompt and output lengths uniform in [100, 1024], seed 0, ignore EOS; then the
same token lists through transformers' continuous batching); sync (B and A again without
asynchronous scheduling, for comparison).

Model: Llama-3.1-8B shape (the Llama-3-8B weights with a context long enough for C),
random bf16 weights. Energy per token from NVML's energy counter where the card has one.
Prints a short table last; writes $OUT/gpu_engine.json (or ./out/).
"""

# ruff: noqa: B023, E501  (timing lambdas run inside their loop iteration; summary rows are long)
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
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

from kvgrid.engine.sampler import argmax_rows
from kvgrid.gc_tuning import tune_gc

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
    # host to GPU, pinned and pageable (the G2 tier's copy rate)
    host = torch.empty(2**28, dtype=torch.float32).pin_memory()  # 1 GiB
    gpu = torch.empty(2**28, dtype=torch.float32, device=DEV)
    env["h2d_pinned_GBps"] = 2**30 / bench_ms(lambda: gpu.copy_(host, non_blocking=True), 10) / 1e6
    pageable = torch.ones(2**28, dtype=torch.float32)
    env["h2d_pageable_GBps"] = 2**30 / bench_ms(lambda: gpu.copy_(pageable), 5) / 1e6
    try:  # idle board power, before any work of ours (NVML, milliwatts)
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        time.sleep(1.0)
        env["idle_power_w"] = pynvml.nvmlDeviceGetPowerUsage(h) / 1e3
    except Exception as e:
        env["idle_power_w"] = None
        log("NVML power unavailable:", e)
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
            "tests/test_fused_ops.py",
            "tests/test_gemv.py",
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

    from kvgrid.layers.attention import triton_kernels as tk

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
    out["sdpa_new_length"] = sdpa_new_length_cost(H, KVH, D)
    out["gemv"] = gemv_bandwidth(bw)
    out["fused_ops"] = fused_ops_bandwidth()
    return out


def sdpa_new_length_cost(H: int, KVH: int, D: int) -> dict:
    """Host time of one causal SDPA call (synchronised) at lengths never seen before vs a
    repeated one: a per-shape plan build shows up as the difference."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    res = {}
    for name, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
    ):
        times = {}
        try:
            for n in (3000, 3001, 3002, 3000, 3001):
                q = torch.randn(1, n, H, D, device=DEV, dtype=torch.bfloat16).transpose(1, 2)
                k = torch.randn(1, n, KVH, D, device=DEV, dtype=torch.bfloat16).transpose(1, 2)
                sync()
                t0 = time.perf_counter()
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
                sync()
                key = f"{n}" if str(n) not in times else f"{n}_again"
                times[key] = (time.perf_counter() - t0) * 1e3
        except Exception as e:
            times["error"] = repr(e)[:200]
        res[name] = times
        log("sdpa new-length host ms", name, times)
    return res


def gemv_bandwidth(bw: float) -> list[dict]:
    """Batch-1 projections of Llama-3-8B (x[1, K] @ W[N, K]^T) through cuBLAS: achieved GB/s.
    Three copies of each weight, cycled, so no run reads a weight still in L2."""
    import torch.nn.functional as F

    rows = []
    for name, n, k in (
        ("qkv", 6144, 4096),
        ("o", 4096, 4096),
        ("gate_up", 28672, 4096),
        ("down", 4096, 14336),
        ("lm_head", 128256, 4096),
    ):
        ws = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) for _ in range(3)]
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        it = itertools.cycle(ws)
        ms = bench_ms(lambda: F.linear(x, next(it)), reps=60)
        gbps = n * k * 2 / ms / 1e6
        rows.append({"name": name, "N": n, "K": k, "ms": ms, "GBps": gbps, "of_copy_bw": gbps / bw})
        del ws
    log("gemv", rows)
    torch.cuda.empty_cache()
    return rows


def fused_ops_bandwidth() -> list[dict]:
    """The fused elementwise ops at batch 1 (launch-bound) and at 8K tokens (bandwidth)."""
    from kvgrid.layers import fused_ops as fo
    from kvgrid.models.config import ModelConfig
    from kvgrid.models.llama import RotaryEmbedding
    from kvgrid.models.shapes import shape_dict

    cfg = ModelConfig.from_hf_dict(shape_dict(SHAPE))
    rope = RotaryEmbedding(cfg, 32768).to(DEV)
    hd, inter = cfg.hidden_size, cfg.intermediate_size
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    bf = dict(device=DEV, dtype=torch.bfloat16)
    rows = []
    for t in (1, 8192):
        x, r, w = torch.randn(t, hd, **bf), torch.randn(t, hd, **bf), torch.randn(hd, **bf)
        gu = torch.randn(t, 2 * inter, **bf)
        qkv = torch.randn(t, (h + 2 * kvh) * d, **bf)
        q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
        q, k, v = q.view(t, h, d), k.view(t, kvh, d), v.view(t, kvh, d)
        cache = torch.empty(t // 64 + 2, 2, 64, kvh, d, **bf)
        slots = torch.arange(t, device=DEV)
        pos = torch.arange(t, device=DEV)
        for name, fn, byts in (
            ("add_rms_norm", lambda: fo.add_rms_norm(x, r, w, 1e-5), 4 * t * hd * 2),
            ("silu_mul", lambda: fo.silu_mul(gu), 3 * t * inter * 2),
            (
                "rope_kv_write",
                lambda: fo.rope_kv_write(pos, q, k, v, rope.cos, rope.sin, cache, slots),
                2 * t * (h + 3 * kvh) * d * 2,
            ),
            ("silu_mul_unfused", lambda: fo.silu_mul_ref(gu), 3 * t * inter * 2),
        ):
            ms = bench_ms(fn, reps=30)
            rows.append({"op": name, "tokens": t, "us": ms * 1e3, "GBps": byts / ms / 1e6})
    log("fused ops", rows)
    return rows


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
        async_scheduling=args.async_scheduling == "on",
    )
    t0 = time.perf_counter()
    eng = LLMEngine(cfg)
    log(
        f"engine ready in {time.perf_counter() - t0:.1f}s: {eng.runner.num_blocks} KV blocks, "
        f"backend {eng.runner.backend.name}, graphs {eng.runner.graphs is not None}"
    )
    tune_gc()  # as a worker process does once its engine is built
    return eng


def build_hf(eng):
    """transformers' LlamaForCausalLM holding the engine's very tensors (no copy)."""
    return hf_from_state(eng.runner.model.hf_state_dict())


def hf_from_state(state: dict):
    """transformers' LlamaForCausalLM (SDPA attention) on the given HF-named tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvgrid.models.shapes import shape_dict

    hcfg = LlamaConfig.from_dict(shape_dict(SHAPE))
    hcfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(hcfg)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
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


def correctness_prompt(vocab: int, n: int = 700) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (n,), generator=g)


REF: dict[str, torch.Tensor] = {}  # reference logits of the correctness prompt (on the CPU)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(DEV).double(), b.to(DEV).double()
    return float((a - b).norm() / b.norm())


@torch.inference_mode()
def phase_reference(args) -> dict:
    """Transformers' logits of the correctness prompt on the engine's dummy weights, in bf16
    (SDPA and eager attention) and in float32 (the weights upcast exactly), computed before
    the engine takes the GPU's memory: float32 weights of an 8B model need 32 GB."""
    from kvgrid.models.llama import LlamaForCausalLM as KvModel
    from kvgrid.models.loader import resolve_model

    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    cfg = resolve_model(SHAPE, "dummy", 0).config
    # the engine's own construction and init (ModelRunner._load_model): same tensors
    with torch.device("meta"):
        m = KvModel(cfg, 1024)
    m = m.to_empty(device=DEV).to(dtype)
    m.init_dummy(0)
    state = m.hf_state_dict()
    REF["weights_checksum"] = weights_checksum(m)
    prompt = correctness_prompt(cfg.vocab_size)[None].to(DEV)
    hf = hf_from_state(state)
    REF["bf16"] = hf(prompt).logits[0].float().cpu()
    hf.config._attn_implementation = "eager"
    REF["bf16_eager"] = hf(prompt).logits[0].float().cpu()
    del hf
    hf32 = hf_from_state({k: v.float() for k, v in state.items()})
    del m, state
    gc.collect()
    REF["fp32"] = hf32(prompt).logits[0].float().cpu()
    del hf32
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "floor_hf_eager_vs_hf_sdpa": rel(REF["bf16_eager"], REF["bf16"]),
        "floor_hf_bf16_vs_fp32": rel(REF["bf16"], REF["fp32"]),
        "floor_hf_eager_bf16_vs_fp32": rel(REF["bf16_eager"], REF["fp32"]),
        "fp32_logits_std": float(REF["fp32"].std()),
    }


def weights_checksum(model) -> float:
    return float(sum(p.double().abs().sum() for p in model.parameters()))


def _meta(ctx_lens, q_lens, tables, block_size):
    from kvgrid.layers.attention.base import AttentionMetadata

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
    prompt = correctness_prompt(model.config.vocab_size)
    n = prompt.shape[0]
    ref = hf(prompt[None].to(DEV)).logits[0].float()  # [n, vocab], bf16 SDPA
    ref32 = REF["fp32"].to(DEV) if "fp32" in REF else None
    nblk = -(-n // bs)
    table = [list(range(run.num_blocks - nblk, run.num_blocks))]

    def fwd(ids, ctx, meta, graph=False):
        pos = torch.arange(ctx, ctx + ids.shape[0], device=DEV)
        if graph:
            h = run.graphs.run(ids.to(DEV), pos, meta)
        else:
            h = model(ids.to(DEV), pos, run.kv_cache, meta, run.backend)
        return model.compute_logits(h)

    res = {}

    def check(name: str, logits: torch.Tensor, rows: slice | list):
        res[name] = rel(logits, ref[rows])
        if ref32 is not None:
            res[name + "_vs_fp32"] = rel(logits, ref32[rows])

    # 1. fresh prefill of n-1 tokens (SDPA path: no cached prefix, long chunk)
    m = _meta([0], [n - 1], table, bs)
    check("prefill_sdpa", fwd(prompt[: n - 1], 0, m), slice(0, n - 1))
    # 2. decode of the last token over the cache, through the CUDA graph when there is one
    m = _meta([n - 1], [1], table, bs)
    graph = run.graphs is not None
    check(
        "decode_graph" if graph else "decode",
        fwd(prompt[n - 1 :], n - 1, m, graph),
        slice(n - 1, n),
    )
    check("decode_eager", fwd(prompt[n - 1 :], n - 1, m), slice(n - 1, n))
    # 3. prefill over a cached prefix: tokens 256.. on top of the first 256 in the cache
    c = 4 * bs
    m = _meta([c], [n - c], table, bs)
    check("prefill_cached_prefix", fwd(prompt[c:], c, m), slice(c, n))
    # 4. fresh prefill through the Triton kernel instead of SDPA
    saved = run.backend.sdpa_min_query_len
    run.backend.sdpa_min_query_len = 10**9
    m = _meta([0], [n], table, bs)
    check("prefill_triton", fwd(prompt, 0, m), slice(0, n))
    run.backend.sdpa_min_query_len = saved
    # 5. a mixed batch: one decode and one cached-prefix chunk in the same step
    m = _meta([n - 1, c], [1, n - c], table * 2, bs)
    ids = torch.cat([prompt[n - 1 :], prompt[c:]])
    pos = torch.cat([torch.tensor([n - 1]), torch.arange(c, n)]).to(DEV)
    lg = model.compute_logits(model(ids.to(DEV), pos, run.kv_cache, m, run.backend))
    check("mixed_batch", lg, [n - 1, *range(c, n)])
    res["greedy_agree_prefill"] = float(
        (fwd(prompt, 0, _meta([0], [n], table, bs)).argmax(-1) == ref.argmax(-1)).float().mean()
    )
    res["pass"] = all(
        v <= 1e-2
        for k, v in res.items()
        if not k.startswith(("greedy", "floor")) and not k.endswith("_vs_fp32")
    )
    # the bf16 floor on these weights: transformers against itself, eager vs SDPA, and
    # against float32
    hf.config._attn_implementation = "eager"
    try:
        eager = hf(prompt[None].to(DEV)).logits[0].float()
        res["floor_hf_eager_vs_hf_sdpa"] = rel(eager, ref)
    finally:
        hf.config._attn_implementation = "sdpa"
    if ref32 is not None:
        res["floor_hf_bf16_vs_fp32"] = rel(ref, ref32)
        # the reference phase ran transformers on weights it built the engine's way: the
        # same logits here prove they were the same weights
        res["reference_reproduced"] = rel(ref, REF["bf16"])
        res["weights_checksum_equal"] = weights_checksum(model) == REF["weights_checksum"]
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
    """Logs each engine step's shape (for the roofline and the calibration fit) and its
    measured time (the engine's own: GPU time between events with asynchronous scheduling,
    launch to synchronisation without), from the engine's speed hook; and, per step, where
    the host time goes."""

    def __init__(self, eng):
        self.eng = eng
        # (tokens, seq_lens, q_lens, seconds)
        self.steps: list[tuple[int, list[int], list[int], float]] = []
        self.host: list[dict[str, float]] = []
        self._shapes: dict[int, tuple[int, list[int], list[int]]] = {}
        self._orig = {
            "record": eng._record_speed,
            "step": eng.step,
            "launch": eng._launch,
            "complete": eng._complete,
            "schedule": eng.scheduler.schedule,
            "prepare": eng.runner.prepare,
            "execute": eng.runner.execute,
        }
        cur: dict[str, float] = {}

        def timed(key, fn):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    cur[key] = cur.get(key, 0.0) + time.perf_counter() - t0

            return wrapper

        def launch(sched, prev):
            batch = sched.scheduled
            # shapes before the launch advances the sequences
            self._shapes[id(sched)] = (
                sum(s.num_tokens for s in batch),
                [s.seq.num_computed_tokens + s.num_tokens for s in batch],
                [s.num_tokens for s in batch],
            )
            return self._orig["launch"](sched, prev)

        def record(sched, seconds):
            self.steps.append((*self._shapes.pop(id(sched)), seconds))
            return self._orig["record"](sched, seconds)

        step_fn = timed("step", self._orig["step"])

        def step():
            cur.clear()
            out = step_fn()
            if "execute" in cur:
                self.host.append(dict(cur))
            return out

        eng._record_speed = record
        eng.step = step
        eng._launch = timed("launch", launch)
        eng._complete = timed("complete", self._orig["complete"])
        eng.scheduler.schedule = timed("schedule", self._orig["schedule"])
        eng.runner.prepare = timed("prepare", self._orig["prepare"])
        eng.runner.execute = timed("execute", self._orig["execute"])

    def close(self):
        for name in ("step", "_record_speed", "_launch", "_complete"):
            self.eng.__dict__.pop(name, None)
        self.eng.scheduler.__dict__.pop("schedule", None)
        self.eng.runner.__dict__.pop("prepare", None)
        self.eng.runner.__dict__.pop("execute", None)

    def host_breakdown(self, decode_only: bool = True) -> dict:
        """Median milliseconds per step call: the whole call; scheduling; input preparation;
        the forward's launch (execute, prepare included); the launch with sampling; the
        completion of a step (waiting for its GPU work, then output bookkeeping)."""
        rows = [h for h, st in zip(self.host, self.steps) if not decode_only or max(st[2]) == 1]
        if not rows:
            return {}
        keys = ("step", "schedule", "prepare", "execute", "launch", "complete")
        med = {k: statistics.median(r.get(k, 0.0) for r in rows) * 1e3 for k in keys}
        med["steps"] = len(rows)
        return {f"{k}_ms" if k != "steps" else k: v for k, v in med.items()}


def roofline_seconds(steps, cfg, bw_GBps: float, tflops: float) -> tuple[float, float]:
    """Sum over steps of max(bytes / bandwidth, flops / matmul rate); also the pure-bytes sum."""
    kv_tok = cfg.kv_bytes_per_token(2)
    weight_bytes = (cfg.param_count() - cfg.vocab_size * cfg.hidden_size) * 2  # embedding: a gather
    dense_flops_per_tok = 2 * (cfg.param_count() - cfg.vocab_size * cfg.hidden_size)
    hq, d, layers = cfg.num_attention_heads, cfg.head_dim, cfg.num_hidden_layers
    total = mem_only = 0.0
    for tokens, seq_lens, q_lens, *_ in steps:
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
    tokens: dict[str, list[int]] = {}
    sync()
    j0 = energy.read() if energy else None
    t0 = time.perf_counter()
    for i, (prompt, n_out) in enumerate(workload):
        rid = f"r{i}-{time.monotonic_ns()}"
        eng.add_request(
            rid, prompt, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True)
        )
        times[rid] = []
        tokens[rid] = []
    steps = 0
    step_s = []
    n_outs = []
    gc_log: list[tuple[int, float, float]] = []  # (generation, start from t0, seconds)
    gc_t: list[float] = []

    def on_gc(phase, info):
        if phase == "start":
            gc_t[:] = [time.perf_counter()]
        elif gc_t:
            gc_log.append((info["generation"], gc_t[0] - t0, time.perf_counter() - gc_t[0]))

    gc.callbacks.append(on_gc)
    while eng.has_unfinished_requests():
        a = time.perf_counter()
        outs = eng.step()
        now = time.perf_counter()
        step_s.append(now - a)
        n_outs.append(len(outs))
        steps += 1
        for o in outs:
            times[o.request_id] += [now] * len(o.new_token_ids)
            tokens[o.request_id] += o.new_token_ids
    elapsed = time.perf_counter() - t0
    gc.callbacks.remove(on_gc)
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
        "itl_p90_ms": pct(itl, 90) * 1e3,
        "itl_p99_ms": pct(itl, 99) * 1e3,
        "itl_max_ms": max(itl, default=0.0) * 1e3,
        "step_p50_ms": pct(step_s, 50) * 1e3,
        "step_p99_ms": pct(step_s, 99) * 1e3,
        # the slowest step() calls: (index, ms), for hiccups behind the ITL tail
        "slowest_steps": sorted(enumerate(step_s), key=lambda x: -x[1])[:12],
        "step_ms_and_outputs": [(round(x * 1e3, 2), n) for x, n in zip(step_s, n_outs)],
        "gc": {
            f"gen{g}": [sum(1 for x in gc_log if x[0] == g), sum(x[2] for x in gc_log if x[0] == g)]
            for g in range(3)
        },
        "gc_gen12_at_s": [(g, round(at, 3), round(sec * 1e3, 2)) for g, at, sec in gc_log if g],
        "preemptions": eng.stats()["num_preemptions"],
        # per request, in workload order: compares runs of the same workload
        "token_digests": [
            hashlib.blake2b(json.dumps(t).encode(), digest_size=8).hexdigest()
            for t in tokens.values()
        ],
    }
    # where the long gaps fall (seconds from the start), to tell a burst from a steady tail
    p50 = pct(itl, 50) if itl else 0.0
    long_at = sorted(
        a - t0 for t in times.values() for a, b in itertools.pairwise(t) if b - a > 1.5 * p50
    )
    res["itl_over_1.5x_p50"] = len(long_at)
    res["itl_over_1.5x_p50_at_s"] = [round(x, 3) for x in long_at[:: max(1, len(long_at) // 40)]]
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
STEPS: dict[str, list] = {}  # recorded engine steps per phase, for the calibration fit


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
def profile_eager_decode(eng) -> None:
    """Kernel times of one batch-1 decode step run eagerly (the graph replays the same
    kernels): where the GPU time of a decode step goes."""
    from torch.profiler import ProfilerActivity, profile

    run = eng.runner
    bs = run.block_size
    ctx = 1100
    table = [list(range(1, 1 + -(-(ctx + 1) // bs)))]
    m = _meta([ctx], [1], table, bs)
    ids = torch.tensor([5], device=DEV)
    pos = torch.tensor([ctx], device=DEV)
    for _ in range(3):
        run.model(ids, pos, run.kv_cache, m, run.backend)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        h = run.model(ids, pos, run.kv_cache, m, run.backend)
        argmax_rows(run.model.compute_logits(h))
        sync()
    PROFILES.append(
        "==== B: one eager batch-1 decode step (by CUDA time)\n"
        + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    )


def profile_graph_decode(bucket, reps: int) -> None:
    """Kernel times inside the batch-1 decode graph (as the last B step left it: about
    1.3K tokens of context), averaged over ``reps`` replays: the eager profile above pays
    launch gaps and picks split counts for the actual length, the graph does neither."""
    from torch.profiler import ProfilerActivity, profile

    bucket.graph.replay()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            bucket.graph.replay()
        sync()
    PROFILES.append(
        f"==== B: batch-1 decode graph, {reps} replays (by CUDA time)\n"
        + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    )


@torch.inference_mode()
def phase_B(args, eng, energy) -> dict:
    cfg = eng.model_config
    env = RESULTS["phases"]["env"]
    wl = make_workload(1, 1024, 1024, cfg.vocab_size, seed=2)
    wl = [(wl[0][0], 256)]
    run_engine(eng, [(wl[0][0], 8)])  # warm-up, this prompt length too (cuDNN plans)
    eng.block_manager.reset_prefix_cache()
    rec = StepRecorder(eng)
    r = run_engine(eng, wl, energy)
    rec.close()
    r["host_per_decode_step"] = rec.host_breakdown()
    eng.block_manager.reset_prefix_cache()
    run = eng.runner
    if run.graphs is not None and DEV.type == "cuda":
        # GPU time of one decode step alone: graph replay, then logits and argmax
        bucket = run.graphs.buckets[1]
        r["graph_replay_ms"] = bench_ms(bucket.graph.replay, reps=50)
        r["graph_logits_argmax_ms"] = bench_ms(
            lambda: (bucket.graph.replay(), argmax_rows(run.model.compute_logits(bucket.output))),
            reps=50,
        )
        profile_eager_decode(eng)
        profile_graph_decode(bucket, reps=10)
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
            ts, fwd = [], []
            for rep in range(3):
                eng.block_manager.reset_prefix_cache()
                sync()
                j0 = energy.read()
                rec = StepRecorder(eng) if rep else None
                r = run_engine(eng, [(prompt[: n - rep], 1)])  # distinct prompts: no cache hit
                if rec is not None:
                    rec.close()
                    STEPS.setdefault("C", []).extend(rec.steps)
                    fwd.append(sum(st[3] for st in rec.steps))
                ts.append(r["ttft_p50_s"])
                jpt = energy.per_token(j0, n)
            best = 1 + min(range(len(fwd)), key=lambda i: ts[1 + i])
            out[f"{budget_name}_{n}"] = {
                "ttft_s": ts[best],
                "all": ts,
                # the engine steps' own time (forward + sampling, synchronised) of that run;
                # the rest of the TTFT is host work around the steps
                "steps_s": fwd[best - 1],
                "prefill_tok_s": n / ts[best],
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
    # warm-up: compiles, and plans SDPA for these prompt lengths (cuDNN builds a plan per
    # new length, ~45 ms each, which would land in whichever run comes first)
    run_engine(eng, [(p, 1) for p, _ in wl])
    eng.block_manager.reset_prefix_cache()
    rec = StepRecorder(eng)
    r = run_engine(eng, wl, energy)
    rec.close()
    STEPS.setdefault("A", []).extend(rec.steps)
    r["host_per_decode_step"] = rec.host_breakdown()
    # every step call's host parts (ms), to place the slow ones (index = step call)
    keys_ = ("step", "schedule", "prepare", "execute", "launch", "complete")
    r["host_per_step_ms"] = [[round(h.get(k, 0.0) * 1e3, 2) for k in keys_] for h in rec.host]
    r["prefill_first_steps"] = sum(1 for st in rec.steps if min(st[2]) > 1)
    r["mixed_steps"] = sum(1 for st in rec.steps if min(st[2]) == 1 < max(st[2]))
    decode_ms = [st[3] * 1e3 for st in rec.steps if max(st[2]) == 1]
    r["decode_step_ms_p50_p99"] = [pct(decode_ms, 50), pct(decode_ms, 99)]
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


# ---- calibration of the fleet simulator ----------------------------------------------------


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
    env = RESULTS["phases"].get("env", {})
    a_steps, c_steps = STEPS.get("A", []), STEPS.get("C", [])
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
    total = torch.cuda.get_device_properties(DEV).total_memory if DEV.type == "cuda" else 80e9
    # the engine's own sizing at gpu_memory_utilization 0.9 (this run used a fixed pool)
    capacity = int((0.9 * total - weight_bytes - 2 * 2**30) // kv_tok)
    a = RESULTS["phases"].get("A_ours", {})
    busy_w = None
    if a.get("J_per_token") and a.get("elapsed_s"):
        busy_w = a["J_per_token"] * a["output_tokens"] / a["elapsed_s"]
    env_name = env.get("device", str(DEV))
    return {
        "meta": {
            "model": SHAPE,
            "gpu": env_name,
            "dtype": "bfloat16",
            "measured": DEV.type == "cuda",
            "source": (
                f"bench/gpu_engine.py on {env_name}: step-time fit over {len(dec)} decode-only "
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
        for label, keep in (
            ("rel err vs HF", lambda k: not k.endswith("_vs_fp32") and not k.startswith("floor")),
            ("rel err vs fp32", lambda k: k.endswith("_vs_fp32")),
            ("bf16 floors", lambda k: k.startswith("floor")),
        ):
            rows.append(
                (
                    label,
                    ", ".join(
                        f"{k.removesuffix('_vs_fp32')} {v:.1e}"
                        for k, v in c.items()
                        if isinstance(v, float)
                        and not k.startswith(("greedy", "reference"))
                        and keep(k)
                    ),
                    ("pass" if c["pass"] else "FAIL") if label == "rel err vs HF" else "",
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
        h = b.get("host_per_decode_step", {})
        if "graph_replay_ms" in b:
            rows.append(
                (
                    "B step parts",
                    f"graph replay {b['graph_replay_ms']:.2f} ms, +logits/argmax {b['graph_logits_argmax_ms']:.2f} ms; host: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in h.items() if k != "steps"),
                    "",
                )
            )
    for key, base, label in (
        ("B_sync", "B", "B, sync sched."),
        ("A_ours_sync", "A_ours", "A, sync sched."),
    ):
        if key in P:
            x = P[key]
            a = P.get(base, {}).get("token_digests", [])
            same = sum(i == j for i, j in zip(a, x["token_digests"]))
            rows.append(
                (
                    label,
                    f"{x.get('decode_tok_s') or x['output_tok_s']:.0f} tok/s, ITL p50/p99 {x['itl_p50_ms']:.2f}/{x['itl_p99_ms']:.2f} ms",
                    f"{x['of_roofline']:.0%} of roofline; same tokens as async in {same}/{len(a)} requests",
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
                        f"kvgrid {o['ttft_s']:.3f}s one-shot (steps {o['steps_s']:.3f}s), {ch['ttft_s']:.3f}s chunked; transformers {hs if hs is None else round(hs, 3)}s",
                        f"{hs / o['ttft_s']:.2f}x" if hs else "",
                    )
                )
    if "A_ours" in P and P["A_ours"].get("host_per_decode_step"):
        h = P["A_ours"]["host_per_decode_step"]
        rows.append(
            (
                "A decode step",
                f"p50/p99 {P['A_ours']['decode_step_ms_p50_p99'][0]:.1f}/{P['A_ours']['decode_step_ms_p50_p99'][1]:.1f} ms (forward+sample); host: "
                + ", ".join(f"{k} {v:.2f}" for k, v in h.items() if k != "steps"),
                f"{P['A_ours']['prefill_first_steps']} prefill-only, {P['A_ours']['mixed_steps']} mixed steps",
            )
        )
    cal = P.get("calibration", {})
    if "decode" in cal:
        rows.append(
            (
                "calibration",
                f"decode {cal['decode']['fixed_s'] * 1e3:.2f} ms + {cal['decode']['per_seq_s'] * 1e6:.1f} us/seq + {cal['decode']['per_kv_token_s'] * 1e9:.1f} ns/KV tok; prefill {cal['prefill']['step_fixed_s'] * 1e3:.1f} ms/step + {cal['prefill']['per_token_s'] * 1e6:.1f} us/tok",
                f"median fit err {cal['meta']['fit_median_rel_err']}",
            )
        )
    print("\n" + "=" * 100)
    for name, val, note in rows:
        print(f"{name:<16} {val}  {note}")
    if RESULTS["errors"]:
        print("errors in:", ", ".join(RESULTS["errors"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--phases", default="env,tests,kernels,correct,B,C,A,sync,hf")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    # A again with small prefill chunks, which keep mixed steps near a decode step (ITL p99)
    ap.add_argument("--small-budget", type=int, default=0, help="0: skip that run")
    ap.add_argument("--max-model-len", type=int, default=32768 + 1024)
    ap.add_argument("--num-kv-blocks", type=int, default=5000)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--async-scheduling", default="on", choices=["on", "off"])
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
    if "correct" in phases:
        run_phase("reference", phase_reference, args)
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
            if "sync" in phases:  # the same without asynchronous scheduling
                eng._async = False
                run_phase("B_sync", phase_B, args, eng, energy)
                eng._async = eng.config.async_scheduling is not False
        if "C" in phases:
            run_phase("C_ours", phase_C_ours, args, eng, energy)
        if "A" in phases:
            run_phase("A_ours", phase_A_ours, args, eng, energy)
            if "sync" in phases:
                eng._async = False
                run_phase("A_ours_sync", phase_A_ours, args, eng, energy)
                eng._async = eng.config.async_scheduling is not False
            if args.small_budget:
                # the same workload with a smaller step budget: shorter mixed steps
                with_budget(eng, args.small_budget)
                run_phase("A_ours_small_budget", phase_A_ours, args, eng, energy)
                with_budget(eng, args.max_num_batched_tokens)
        run_phase("calibration", phase_calibration, args, eng)
        vocab = eng.model_config.vocab_size
        # give the engine's KV pool and graphs back before transformers sizes its own cache
        del eng
        gc.unfreeze()
        gc.collect()
        torch.cuda.empty_cache()
        if hf is not None:
            if "C" in phases:
                run_phase("C_hf", phase_C_hf, args, hf, vocab)
            if "hf" in phases:
                run_phase("A_hf", phase_A_hf, args, hf, vocab, energy)
    cal = RESULTS["phases"].get("calibration")
    if cal and cal.get("kv_bytes_per_token"):
        # top level, so that the results file is itself a simulator calibration
        # (kvgrid.planner.calibration.load_calibration reads these keys)
        RESULTS.update(cal)
    summary()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
