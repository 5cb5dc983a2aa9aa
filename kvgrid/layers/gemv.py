"""Small-batch products ``x @ w.T`` (M <= 8 rows) as a bandwidth-bound Triton GEMV.

At batch 1 a decode step is a stream over every weight once: its floor is the weight bytes
over HBM bandwidth. On an H200, cuBLAS's M=1 products reach 56-99% of the copy bandwidth
depending on the shape, this kernel 68-104% (kvgrid.bench.gpu.gemv, docs/benchmarks.md).
Here each program owns BLOCK_N rows of ``w`` and streams them along K in
wide loads, with x (a few KiB) re-read from L1; split-K gives the N=4096 shapes enough
programs to fill the SMs, its fp32 partials summed in a fixed order by a second kernel
(deterministic, unlike atomics). Two inner products: FMA into one fp32 partial per loaded
element, summed once at the end (M=1 only: more rows would multiply those registers), and
tensor cores on x padded to 16 rows (any M up to 16; the MMA work is free at this
intensity, and Triton pipelines the loads through shared memory).

The best tile depends on the shape and on M, so ``linear`` looks it up per (M bucket, N, K):
first in ``PINNED`` (winners pasted from kvgrid.bench.gpu.gemv), then in the tuner's cache;
an unseen shape is tuned on first use by timing ``candidates`` against ``F.linear``, whose
win is recorded as ``None`` (keep cuBLAS). Tuning launches and synchronises, so it never
runs inside CUDA-graph capture: the model runner tunes its shapes before capture (``tune``),
and a capture that still meets an unseen shape uses ``F.linear`` there.

``KVGRID_GEMV=0`` in the environment switches the kernel off process-wide (for A/B runs);
EngineConfig.gemv switches it per engine. ``KVGRID_GEMV_CONFIGS=path`` pins the winners a
kvgrid.bench.gpu.gemv run wrote, so an engine started after it tunes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from kvgrid import envs
from kvgrid.layers import pdl

log = logging.getLogger(__name__)

# Largest row count (tokens) that takes the GEMV (the kernel takes up to 16). Decode
# batches up to here are bandwidth-bound; the tuner still keeps cuBLAS where it wins.
MAX_M = 8
ENABLED = envs.KVGRID_GEMV.get()
# tests set this to run the kernels on CPU tensors (TRITON_INTERPRET=1), float32 included
force_triton = False

_GPU_DTYPES = (torch.bfloat16, torch.float16)
_DEFAULT_SMS = 132  # H100/H200; the interpreter has no SM count


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    block_n: int  # output rows (rows of w) per program
    block_k: int  # elements of K per load
    split_k: int = 1  # programs per row block, each over a slice of K
    num_warps: int = 4
    num_stages: int = 1
    # tl.dot on x padded to 16 rows (tensor cores); False: FMA + one sum, for M=1 only
    dot: bool = False


# (M bucket, N, K) -> winner from kvgrid.bench.gpu.gemv; None: F.linear (cuBLAS) was faster.
# Per card (torch.cuda.get_device_name): Llama-3-8B shapes on an NVIDIA H200
# (bench/results/2026-12-02-h200-async/gemv.log). Other shapes and cards are tuned at start.
_H200: dict[tuple[int, int, int], GemvConfig | None] = {
    (1, 4096, 4096): GemvConfig(
        block_n=2, block_k=1024, split_k=1, num_warps=4, num_stages=1, dot=False
    ),
    (1, 4096, 14336): GemvConfig(
        block_n=2, block_k=1024, split_k=1, num_warps=4, num_stages=1, dot=False
    ),
    (1, 6144, 4096): GemvConfig(
        block_n=8, block_k=512, split_k=1, num_warps=4, num_stages=1, dot=False
    ),
    (1, 28672, 4096): GemvConfig(
        block_n=4, block_k=1024, split_k=1, num_warps=4, num_stages=1, dot=False
    ),
    (1, 128256, 4096): GemvConfig(
        block_n=2, block_k=1024, split_k=1, num_warps=4, num_stages=1, dot=False
    ),
    (2, 4096, 4096): None,
    (2, 4096, 14336): None,
    (2, 6144, 4096): None,
    (2, 28672, 4096): None,
    (2, 128256, 4096): None,
    (4, 4096, 4096): None,
    (4, 4096, 14336): None,
    (4, 6144, 4096): None,
    (4, 28672, 4096): None,
    (4, 128256, 4096): None,
    (8, 4096, 4096): None,
    (8, 4096, 14336): None,
    (8, 6144, 4096): None,
    (8, 28672, 4096): None,
    (8, 128256, 4096): None,
}
PINNED_BY_DEVICE = {"NVIDIA H200": _H200}
# winners for this process whatever the card (KVGRID_GEMV_CONFIGS below, or pasted by hand)
PINNED: dict[tuple[int, int, int], GemvConfig | None] = {}
_tuned: dict[tuple[int, int, int], GemvConfig | None] = {}


@functools.cache
def _device_pinned(index: int) -> dict[tuple[int, int, int], GemvConfig | None]:
    return PINNED_BY_DEVICE.get(torch.cuda.get_device_name(index), {})


def _tables(device: torch.device | str) -> tuple[dict, ...]:
    """Where a choice is looked up, first match wins: tuned here, PINNED, the card's table."""
    device = torch.device(device)
    if device.type != "cuda":
        return (_tuned, PINNED)
    index = torch.cuda.current_device() if device.index is None else device.index
    return (_tuned, PINNED, _device_pinned(index))


def save_configs(
    path: str | os.PathLike, table: dict[tuple[int, int, int], GemvConfig | None]
) -> None:
    rows = [
        {"m": m, "n": n, "k": k, "config": None if c is None else dataclasses.asdict(c)}
        for (m, n, k), c in sorted(table.items())
    ]
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def load_configs(path: str | os.PathLike) -> dict[tuple[int, int, int], GemvConfig | None]:
    """Read winners that kvgrid.bench.gpu.gemv wrote (``$OUT/gemv_configs.json``)."""
    with open(path) as f:
        rows = json.load(f)
    return {
        (r["m"], r["n"], r["k"]): None if r["config"] is None else GemvConfig(**r["config"])
        for r in rows
    }


# a sweep's winners for this process, without editing PINNED (an A/B run on a fresh GPU)
if envs.KVGRID_GEMV_CONFIGS.is_set():
    PINNED.update(load_configs(envs.KVGRID_GEMV_CONFIGS.get()))


def m_bucket(m: int) -> int:
    """Configs are chosen per power of two of M (the CUDA-graph decode buckets)."""
    return _pow2(m)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def candidates(m: int, n: int, k: int, sms: int = _DEFAULT_SMS) -> list[GemvConfig]:
    """The configs the tuner times for one shape (up to ~24 at M=1, ~10 above): a few tile
    shapes of the tensor-core path and, at M=1, of the FMA path, each alone and, where the
    row blocks alone leave SMs idle, split along K until the grid covers them four times."""
    fma = [
        GemvConfig(2, 1024, num_warps=4),
        GemvConfig(4, 256, num_warps=2),
        GemvConfig(4, 512, num_warps=4),
        GemvConfig(4, 1024, num_warps=4),
        GemvConfig(8, 512, num_warps=4),
        GemvConfig(8, 1024, num_warps=8),
        GemvConfig(16, 512, num_warps=8),
    ]
    dot = [
        GemvConfig(16, 128, num_warps=4, num_stages=4, dot=True),
        GemvConfig(32, 128, num_warps=4, num_stages=4, dot=True),
        GemvConfig(16, 256, num_warps=4, num_stages=3, dot=True),
        GemvConfig(32, 256, num_warps=8, num_stages=3, dot=True),
        GemvConfig(64, 128, num_warps=4, num_stages=3, dot=True),
    ]
    out: list[GemvConfig] = []
    for c in (fma if m == 1 else []) + dot:
        if c.block_k > max(16, _pow2(k)):
            continue  # a tile wider than K
        out.append(c)
        row_blocks = _cdiv(n, c.block_n)
        split = 1
        while row_blocks * split < 4 * sms and k // (2 * split) >= c.block_k:
            split *= 2
        if split > 1:
            out.append(dataclasses.replace(c, split_k=split))
    return out


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig) -> None:
    if w.dim() != 2:
        raise ValueError(f"gemv: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if x.dim() != 2:
        raise ValueError(f"gemv: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv: x has K={x.shape[1]} but w has K={w.shape[1]}")
    if not w.is_contiguous() or x.stride(1) != 1:
        raise ValueError("gemv: w must be contiguous and x's rows contiguous")
    if x.dtype != w.dtype or x.dtype not in (*_GPU_DTYPES, torch.float32):
        raise ValueError(f"gemv: x and w must share a float dtype, got {x.dtype}, {w.dtype}")
    if x.shape[0] > 16:
        raise ValueError(f"gemv: M={x.shape[0]} rows; the kernel is for M <= 16")
    if x.shape[0] > 1 and not config.dot:
        raise ValueError(f"gemv: M={x.shape[0]} rows need a dot=True config (FMA: M=1)")
    if bias is not None and (bias.shape != (w.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"gemv: bias must be contiguous [N={w.shape[0]}]")


def fuses_silu_mul(config: GemvConfig | None, n: int) -> bool:
    """Whether ``gemv(..., silu_mul=True)`` can run this config on a [2I = n, K] weight:
    each program must hold whole output rows (no split-K) and both halves of its columns."""
    return config is not None and config.split_k == 1 and config.block_n % 2 == 0 and n % 2 == 0


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    config: GemvConfig,
    silu_mul: bool = False,
) -> torch.Tensor:
    """``x @ w.T + bias`` [M, N] in x's dtype, accumulated in float32, with ``config``.

    With ``silu_mul`` (``w`` = [gate; up], no bias): ``silu(gate) * up`` [M, N // 2], as
    ``fused_ops.silu_mul`` of the plain result computes it, in the same kernel.
    """
    _check(x, w, bias, config)
    from kvgrid.layers import gemv_kernels as gk

    m, k = x.shape
    n = w.shape[0]
    if silu_mul and (bias is not None or not fuses_silu_mul(config, n) or k == 0):
        raise ValueError(f"gemv: silu_mul needs no bias, even N and no split-K, got {config}")
    y = torch.empty(m, n // 2 if silu_mul else n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(m, n))
    c = config
    k_per_split = _cdiv(_cdiv(k, c.split_k), c.block_k) * c.block_k
    splits = _cdiv(k, k_per_split)  # a rounded-up slice can leave the last splits empty
    out = y if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    b = bias if has_bias else w
    gk._gemv_kernel[(_cdiv(n, c.block_n), splits)](
        x,
        w,
        b,
        out,
        m,
        n,
        k,
        k_per_split,
        x.stride(0),
        w.stride(0),
        y.shape[1],  # y and the partials are both [.., M, N] contiguous
        m * n,
        HAS_BIAS=has_bias,
        PARTIAL=splits > 1,
        SILU_MUL=silu_mul,
        EVEN_K=k % k_per_split == 0,
        USE_DOT=c.dot,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=16 if c.dot else 1,
        BLOCK_N=c.block_n,
        BLOCK_K=c.block_k,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
        **pdl.launch_kwargs(x),
    )
    if splits > 1:
        block = min(1024, _pow2(n))
        gk._gemv_reduce_kernel[(m, _cdiv(n, block))](
            out,
            b,
            y,
            m,
            n,
            n,
            HAS_BIAS=has_bias,
            SPLIT_K=splits,
            BLOCK=block,
            num_warps=4,
            **pdl.launch_kwargs(x),
        )
    return y


# ---- tuning -----------------------------------------------------------------------------


def time_ms(op: Callable[[torch.Tensor], object], w: torch.Tensor) -> float:
    """GPU milliseconds of one ``op(w)``, as a decode step runs it: back to back in a CUDA
    graph (eager timing of an 8 us kernel measures the Python launch instead), each call on
    a different copy of ``w`` (each layer streams its own weights: no L2 hits), L2 flushed
    between replays."""
    from triton.testing import do_bench

    l2 = getattr(torch.cuda.get_device_properties(w.device), "L2_cache_size", 64 << 20)
    copies = min(32, _cdiv(2 * l2, max(1, w.nbytes)))  # small weights may stay in L2
    ws = [w] + [w.clone() for _ in range(copies - 1)]
    calls = len(ws) * _cdiv(10, len(ws))
    op(w)  # compiles, and readies library handles outside the graph
    torch.cuda.synchronize(w.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            op(ws[i % len(ws)])
    ms = do_bench(graph.replay, warmup=5, rep=20, return_mode="median")
    del graph, ws
    return ms / calls


def tune_one(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> GemvConfig | None:
    """Time every candidate (and F.linear) on these tensors; cache and return the fastest,
    ``None`` when cuBLAS wins. Candidates that fail to compile are skipped."""
    m, k = x.shape
    n = w.shape[0]
    key = (m_bucket(m), n, k)
    best: GemvConfig | None = None
    best_ms = time_ms(lambda w_: F.linear(x, w_, bias), w)
    for c in candidates(m, n, k, _sm_count(x.device)):
        try:
            ms = time_ms(lambda w_, c=c: gemv(x, w_, bias, c), w)
        except Exception as e:  # out of shared memory or registers on this device
            log.debug("gemv candidate %s failed on %s: %s", c, key, e)
            continue
        if ms < best_ms:
            best, best_ms = c, ms
    _tuned[key] = best
    log.info("gemv %s: %s (%.1f us)", key, best or "F.linear", best_ms * 1e3)
    return best


def tune(
    shapes: Iterable[tuple[int, int]],
    ms: Sequence[int] = (1, 2, 4, 8),
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
) -> dict[tuple[int, int, int], GemvConfig | None]:
    """Tune every (N, K) weight shape for every M bucket not already pinned or tuned, on
    random tensors; returns the choices. Call before CUDA-graph capture."""
    done: dict[tuple[int, int, int], GemvConfig | None] = {}
    for n, k in dict.fromkeys(shapes):
        todo = [m for m in ms if not config_for(m, n, k, device)[0]]
        if not todo:
            continue
        w = torch.randn(n, k, dtype=dtype, device=device) * k**-0.5
        for m in todo:
            x = torch.randn(m, k, dtype=dtype, device=device)
            done[(m_bucket(m), n, k)] = tune_one(x, w)
        del w
    return done


def config_for(
    m: int, n: int, k: int, device: torch.device | str = "cuda"
) -> tuple[bool, GemvConfig | None]:
    """``(known, config)``: whether (M bucket, N, K) is pinned or tuned, and its choice."""
    key = (m_bucket(m), n, k)
    for table in _tables(device):  # no merged copy: this runs per projection call
        if key in table:
            return True, table[key]
    return False, None


# ---- dispatch ---------------------------------------------------------------------------


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _choose(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> GemvConfig | None:
    """The GEMV config for ``x @ w.T`` or None for F.linear: up to MAX_M rows of 16-bit
    CUDA tensors in the kernel's layouts, and a shape tuned to beat cuBLAS. A shape seen
    for the first time is tuned here, unless a CUDA graph is being captured."""
    k = x.shape[-1]
    use = ENABLED and (force_triton or (x.is_cuda and x.dtype in _GPU_DTYPES))
    if not use or w.dim() != 2 or w.shape[1] != k or w.dtype != x.dtype:
        return None
    m, n = x.numel() // max(1, k), w.shape[0]
    layout_ok = w.is_contiguous() and x.stride(-1) == 1 and (x.dim() == 2 or x.is_contiguous())
    if not 0 < m <= MAX_M or not layout_ok or (bias is not None and not bias.is_contiguous()):
        return None
    known, config = config_for(m, n, k, x.device)
    if not known:
        if _capturing(x):
            return None
        config = tune_one(x.reshape(-1, k), w, bias)
    return config


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)``, through the GEMV where ``_choose`` finds it faster;
    everything else (CPU, float32, more rows, unusual layouts) is exactly F.linear."""
    config = _choose(x, w, bias)
    if config is None:
        return F.linear(x, w, bias)
    k, n = x.shape[-1], w.shape[0]
    return gemv(x.reshape(-1, k), w, bias, config).view(*x.shape[:-1], n)


def linear_silu_mul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``fused_ops.silu_mul(linear(x, w))`` for ``w = [gate; up]``: in the GEMV's epilogue
    when the GEMV runs (a batch-1 step saves one kernel per layer), else the two ops."""
    config = _choose(x, w, None)
    if not fuses_silu_mul(config, w.shape[0]):
        from kvgrid.layers import fused_ops

        return fused_ops.silu_mul(linear(x, w))
    k, n = x.shape[-1], w.shape[0]
    return gemv(x.reshape(-1, k), w, None, config, silu_mul=True).view(*x.shape[:-1], n // 2)


__all__ = [
    "MAX_M",
    "PINNED",
    "GemvConfig",
    "candidates",
    "config_for",
    "fuses_silu_mul",
    "gemv",
    "linear",
    "linear_silu_mul",
    "load_configs",
    "m_bucket",
    "save_configs",
    "time_ms",
    "tune",
    "tune_one",
]
