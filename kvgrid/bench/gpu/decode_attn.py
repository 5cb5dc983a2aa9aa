"""Split-KV paged decode attention inside CUDA graphs: which configuration a decode step wants.

A decode step replays one graph of 32 layers, so what counts is a kernel's time back to back
with others in a graph, not its launch from Python. Each row captures 32 calls (one per
layer of an engine-layout cache, so K/V come from HBM as in a real step, not from L2),
replays the graph, and divides. Llama-3-8B attention shape (32 query heads, 8 KV heads,
head dim 128, 64-token blocks), bf16. Correctness first: every configuration against the
unsplit kernel and the torch reference.

    python -m kvgrid.bench.gpu.decode_attn   # ~1 min on an H200; $OUT/decode_attn.json
"""

from __future__ import annotations

import itertools
import json
import statistics
import time

import torch
import triton
import triton.language as tl

from kvgrid.bench.gpu import harness
from kvgrid.bench.gpu.harness import add_common_args
from kvgrid.layers.attention import triton_kernels as tk
from kvgrid.layers.attention.torch_ref import TorchAttentionBackend

H, KVH, D, BS, LAYERS = 32, 8, 128, 64, 32
DT = torch.bfloat16
DEV = torch.device("cuda")
ENGINE_MAX_LEN = 32768 + 1024  # kvgrid.bench.gpu.engine's max_model_len: graphs pick splits by it


@triton.jit
def _noop(x_ptr):
    tl.store(x_ptr + tl.program_id(0), 0)


def graph_us(fn, reps: int = 30) -> float:
    """Microseconds per call of ``fn(layer)`` over a graph of one call per layer."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for layer in range(LAYERS):
            fn(layer)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for layer in range(LAYERS):
            fn(layer)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / LAYERS)
    return statistics.median(times)


def case(batch: int, seq_len: int):
    nblk = -(-seq_len // BS)
    cache = torch.randn(batch * nblk + 1, LAYERS, 2, BS, KVH, D, device=DEV, dtype=DT)
    tables = (torch.randperm(batch * nblk, device=DEV).int() + 1).view(batch, nblk)
    lens = torch.full((batch,), seq_len, device=DEV, dtype=torch.int32)
    q = torch.randn(batch, H, D, device=DEV, dtype=DT)
    return cache, tables, lens, q


def reference(cache, tables, lens, q, layer: int) -> torch.Tensor:
    from kvgrid.layers.attention.base import AttentionMetadata

    b, seq = q.shape[0], int(lens[0])
    meta = AttentionMetadata(
        query_start_loc=torch.arange(b + 1, device=DEV, dtype=torch.int32),
        seq_lens=lens,
        context_lens=lens - 1,
        block_tables=tables,
        slot_mapping=torch.full((b,), -1, device=DEV, dtype=torch.int64),
        max_query_len=1,
        max_seq_len=seq,
        query_start_loc_cpu=list(range(b + 1)),
        seq_lens_cpu=[seq] * b,
        context_lens_cpu=[seq - 1] * b,
    )
    k = torch.zeros(b, KVH, D, device=DEV, dtype=DT)
    one_layer = cache[:, layer : layer + 1].float()
    return TorchAttentionBackend().forward(
        q.float(), k.float(), k.float(), one_layer, 0, meta, D**-0.5, kv_written=True
    )


TILES = [(64, 4, 3), (64, 4, 2), (32, 4, 2), (32, 2, 2), (64, 8, 3), (128, 4, 2)]
CASES = [(1, 1280), (1, 8192), (1, 32768), (4, 1280), (16, 1024), (64, 1024), (128, 1024)]


def run_case(batch: int, seq_len: int, sms: int) -> tuple[list, list]:
    """Every configuration for one (batch, length): rows, and the ones that were wrong."""
    cache, tables, lens, q = case(batch, seq_len)
    o = torch.empty_like(q)
    dot = tk.dot_dtype_for(DT)
    engine_splits = min(tk.decode_num_splits(batch, KVH, ENGINE_MAX_LEN, sms), 32)
    split_set = {1, engine_splits} | ({4, 8, 16, 32} if batch * KVH < sms else set())
    ref = reference(cache, tables, lens, q, LAYERS - 1)
    kv_bytes = batch * seq_len * KVH * D * 2 * 2
    rows, failures = [], []
    for splits, (bn, nw, ns) in itertools.product(sorted(split_set), TILES):

        def call(layer, splits=splits, bn=bn, nw=nw, ns=ns):
            tk.paged_decode(
                q,
                cache[:, layer],
                tables,
                lens,
                D**-0.5,
                splits,
                o,
                dot,
                block_n=bn,
                num_warps=nw,
                num_stages=ns,
            )

        call(LAYERS - 1)
        torch.cuda.synchronize()
        err = float((o.float() - ref).norm() / ref.norm())
        ok = err < 2e-2 and bool(torch.isfinite(o).all())
        if not ok:
            failures.append((batch, seq_len, splits, bn, nw, ns, err))
        us = graph_us(call)
        rows.append(
            dict(
                batch=batch,
                seq_len=seq_len,
                splits=splits,
                block_n=bn,
                num_warps=nw,
                num_stages=ns,
                rel_err=err,
                ok=ok,
                us=us,
                GBps=kv_bytes / us / 1e3,
                engine_splits=engine_splits,
                engine_default=(splits == engine_splits and (bn, nw, ns) == (64, 4, 3)),
            )
        )
    return rows, failures


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser("kvgrid.bench.gpu.decode_attn", __doc__)
    add_common_args(ap)
    ap.add_argument(
        "--cases",
        default=",".join(f"{b}x{n}" for b, n in CASES),
        help="BATCHxCONTEXT pairs to sweep",
    )
    args = ap.parse_args(argv)
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    x = torch.zeros(1024, device=DEV, dtype=torch.int32)
    res: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "noop_kernel_us": graph_us(lambda layer: _noop[(1,)](x)),
        "rows": [],
        "failures": [],
    }
    print(
        f"{res['device']}, torch {res['torch']}, triton {res['triton']}; "
        f"an empty kernel in a graph: {res['noop_kernel_us']:.2f} us"
    )
    for batch, seq_len in cases:
        rows, failures = run_case(batch, seq_len, sms)
        torch.cuda.empty_cache()
        res["rows"] += rows
        res["failures"] += failures
        best = min((r for r in rows if r["ok"]), key=lambda r: r["us"])
        dflt = next(r for r in rows if r["engine_default"])
        print(
            f"batch {batch:>3} len {seq_len:>5}: engine default {dflt['us']:6.2f} us "
            f"(splits {dflt['splits']}); best {best['us']:6.2f} us: splits {best['splits']} "
            f"tile {best['block_n']}/{best['num_warps']}w/{best['num_stages']}s "
            f"({best['GBps']:.0f} GB/s)"
        )
    (out / "decode_attn.json").write_text(json.dumps(res, indent=1))
    print("correctness:", "PASS" if not res["failures"] else f"FAIL {res['failures']}")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"took {time.time() - t0:.0f}s")
    raise SystemExit(rc)
