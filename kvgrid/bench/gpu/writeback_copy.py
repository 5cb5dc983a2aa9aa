"""Write-back copies G1 -> pinned G2 of scattered blocks: one copy-engine call per block
against one kernel launch for all of them (``CudaCopier.kernel_min_runs``). Bit-exactness
first, then per batch size the host time to issue the copies (the engine's thread pays it)
and the time until they have landed.

    python -m kvgrid.bench.gpu.writeback_copy [--block-mib 8] [--out DIR]
"""

from __future__ import annotations

import json
import time

import torch

from kvgrid.bench.gpu.harness import GPU, add_common_args, markdown_table, med, parser, versions
from kvgrid.store.transfer import CudaCopier

SIZES = (1, 4, 16, 32, 64, 256)
PATHS = {"copy engine": 1 << 30, "kernel": 1}


def run(block_mib: int, reps: int) -> dict:
    dev = torch.device("cuda")
    n_g1, n_g2 = 512, 256
    words = block_mib * (1 << 20) // 2
    g1 = torch.randn(n_g1, words, device=dev).to(torch.bfloat16)
    g2 = torch.empty(n_g2, words, dtype=torch.bfloat16, pin_memory=True)
    gen = torch.Generator().manual_seed(0)
    copier = CudaCopier()
    rows, out = [], {"block_bytes": g1[0].nbytes, "sizes": {}}
    for n in SIZES:
        src = torch.randperm(n_g1, generator=gen)[:n].tolist()  # scattered, as G1 evicts
        dst = torch.randperm(n_g2, generator=gen)[:n].tolist()
        pairs = [(g2[d], g1[s]) for s, d in zip(src, dst)]
        res = {}
        for name, min_runs in PATHS.items():
            copier.kernel_min_runs = min_runs
            g2[dst] = 0
            copier.copy(pairs).synchronize()
            exact = all(torch.equal(g2[d], g1[s].cpu()) for s, d in zip(src, dst))
            issue, landed = [], []
            for _ in range(reps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                ev = copier.copy(pairs)
                t1 = time.perf_counter()
                ev.synchronize()
                issue.append(t1 - t0)
                landed.append(time.perf_counter() - t0)
            gbs = n * g1[0].nbytes / med(landed) / 1e9
            res[name] = {"bit_exact": exact, "issue_ms": 1e3 * med(issue),
                         "landed_ms": 1e3 * med(landed), "GB_s": gbs}  # fmt: skip
            rows.append([n, name, exact, f"{1e3 * med(issue):.3f}", f"{1e3 * med(landed):.2f}",
                         f"{gbs:.1f}"])  # fmt: skip
        out["sizes"][n] = res
    out["table"] = markdown_table(
        ["blocks", "path", "bit exact", "issue ms", "landed ms", "GB/s"], rows
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser("kvgrid.bench.gpu.writeback_copy", __doc__)
    add_common_args(p)
    p.add_argument("--block-mib", type=int, default=8, help="block size (8: Llama-3-8B, 64 tokens)")
    p.add_argument("--reps", type=int, default=20, help="timed copies per size and path")
    a = p.parse_args(argv)
    if not GPU:
        print("writeback_copy needs a CUDA GPU (it times G1 -> pinned G2 copies)")
        return 2
    res = {"bench": "writeback_copy", **versions(), **run(a.block_mib, a.reps)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "writeback_copy.json").write_text(json.dumps(res, indent=1, default=str))
    print(res["table"])
    return 0 if all(r["bit_exact"] for s in res["sizes"].values() for r in s.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
