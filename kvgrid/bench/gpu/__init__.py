"""GPU benchmarks: one module per measure on a shared harness (``harness.py``).

Each runs as ``python -m kvgrid.bench.gpu.NAME [args]`` or ``kvgrid bench gpu NAME [args]``;
``BENCHES`` names them (modules are imported only when run, so listing them needs no torch).
"""

from __future__ import annotations

import importlib
from types import ModuleType

BENCHES: dict[str, str] = {
    "engine": "every engine phase below in one run, on one engine",
    "engine_env": "device ceilings (copy bandwidth, bf16 matmul rate) and the GPU test files",
    "engine_kernels": "Triton attention, GEMV and fused ops against torch",
    "engine_correct": "logits against transformers on the same weights (prefill, decode, graphs)",
    "engine_decode": "B: batch-1 decode of a 1K prompt, 256 new tokens, vs its roofline",
    "engine_prefill": "C: prefill of 8K and 32K prompts vs transformers' SDPA forward",
    "engine_vs_transformers": "A: 256 mixed requests, kvgrid vs transformers' continuous batching",
    "engine_calibration": "the fleet simulator's step-time fit from measured engine steps",
    "engine_offline": "throughput and latency of a fixed offline workload (any model, CPU too)",
    "store": "every context-store phase below in one run, on one engine",
    "store_env": "host->GPU ceilings and the layer-by-layer landing kernel",
    "store_correct": "KV loaded from G2/G3/G4 equals computed KV; tokens and logprobs equal",
    "store_ttft": "time to first token from G2, G3 and G4 (cold and warm disk) vs recompute",
    "store_split": "a throttled disk: forced load vs the engine's load/recompute choice",
    "store_enc": "encryption's cost on G3 loads, A/B pairs",
    "store_replay": "in-process Mooncake replay without and with the store, per-step breakdown",
    "serve_replay": "`kvgrid serve` replay of Mooncake traces without and with the store",
    "disagg": "prefill/decode disaggregation across workers vs mixed workers",
    "ray_serve": "`kvgrid serve --ray` against `kvgrid serve`, the same replay",
    "guided": "guided decoding: mask cost and throughput with a grammar",
    "gemv": "the decode GEMV kernel's tile sweep against cuBLAS",
    "decode_attn": "the decode attention kernel's tile sweep and launch cost",
    "mixed_step": "host launch cost of mixed prefill+decode steps",
    "profile_store_write": "stages of a G2->G3 write-down on a real directory",
    "profile_g3_load": "stages of a warm-cache G3 load against plain reads",
    "profile_disk_lookup": "a busy disk tier's lookups: its owner's, from memory, against stats",
    "profile_gil": "what a disk tier's loads cost a thread of short torch calls (the GIL)",
    "writeback_copy": "G1 -> pinned G2 write-back copies: copy engine against one kernel launch",
    "bf16_error_budget": "where bf16 rounding error enters a forward pass",
    "bf16_floor_trained": "the bf16 error floor on trained weights",
    "plot_store": "plots of a store benchmark's JSON",
    "smoke": "every benchmark above once at small sizes (does each still run?)",
}


def load(name: str) -> ModuleType:
    """The benchmark module registered as ``name``."""
    if name not in BENCHES:
        raise KeyError(f"unknown GPU benchmark {name!r}: choose from {', '.join(BENCHES)}")
    return importlib.import_module(f"{__name__}.{name}")


def add_cli(bench_sub) -> None:
    """``kvgrid bench gpu NAME [args]``: everything after NAME goes to the module's main."""
    import argparse

    gpu = bench_sub.add_parser("gpu", help="GPU benchmarks (kvgrid.bench.gpu.NAME)")
    gsub = gpu.add_subparsers(dest="gpu_bench", metavar="NAME")
    gpu.set_defaults(func=lambda a: (gpu.print_help(), 2)[1])
    for name, text in BENCHES.items():
        # no options of its own (a prefix no argument uses), so that every argument, --help
        # included, reaches the module's parser
        p = gsub.add_parser(name, help=text, add_help=False, prefix_chars="\0")
        p.add_argument("bench_args", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda a, name=name: load(name).main(a.bench_args))
