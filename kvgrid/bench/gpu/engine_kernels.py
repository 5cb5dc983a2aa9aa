# ruff: noqa: B023  (timing lambdas run inside their loop iteration)
"""The engine benchmark's kernels phase: Triton paged attention (decode and prefill) against
torch SDPA, the cost of a new prompt length for SDPA, the decode GEMV and the fused ops
against their bandwidth.

    python -m kvgrid.bench.gpu.engine_kernels
"""

from __future__ import annotations

import itertools
import sys
import time

import torch

from kvgrid.bench.gpu import engine_common as common
from kvgrid.bench.gpu import engine_env
from kvgrid.bench.gpu.harness import DEV, bench_ms, log, sync


def phase_kernels(args) -> dict:
    import torch.nn.functional as F

    from kvgrid.layers.attention import triton_kernels as tk

    H, KVH, D, BS = 32, 8, 128, 64
    dt = torch.bfloat16
    out: dict = {"decode": [], "prefill": []}
    bw = common.RESULTS.phases.get("env", {}).get("copy_bw_GBps", 3000.0)

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
    out["fused_ops"] = fused_ops_bandwidth(args.shape)
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


def fused_ops_bandwidth(shape: str) -> list[dict]:
    """The fused elementwise ops at batch 1 (launch-bound) and at 8K tokens (bandwidth)."""
    from kvgrid.layers import fused_ops as fo
    from kvgrid.models.config import ModelConfig
    from kvgrid.models.llama import RotaryEmbedding
    from kvgrid.models.shapes import shape_dict

    cfg = ModelConfig.from_hf_dict(shape_dict(shape))
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


def run(b: common.Bench) -> None:
    if b.wants("kernels"):
        b.results.run_phase("kernels", phase_kernels, b.args)


def rows(P: dict) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []

    return rows


def main(argv: list[str] | None = None) -> int:
    return common.main(argv, [engine_env, sys.modules[__name__]], "kernels")


if __name__ == "__main__":
    sys.exit(main())
