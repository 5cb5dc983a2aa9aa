"""GPU benchmark of the engine's CUDA path: correctness first, then speed, in one run.

    python -m kvgrid.bench.gpu.engine                      # everything (one H200, ~8 min)
    python -m kvgrid.bench.gpu.engine --phases env,tests,kernels

Phases (in order; each module also runs alone as ``python -m kvgrid.bench.gpu.<module>``):
env and tests (``engine_env``: versions, copy bandwidth and bf16 matmul rate, the two roofline
ceilings; the GPU test files), kernels (``engine_kernels``: Triton attention vs torch SDPA),
correct (``engine_correct``: logits vs transformers on the same weights), B
(``engine_decode``: batch-1 decode, 1K prompt, 256 new tokens), C (``engine_prefill``: 8K and
32K prompts vs transformers' SDPA forward), A (``engine_vs_transformers``: 256 requests,
lengths uniform in [100, 1024], seed 0, EOS ignored; with ``hf`` the same token lists through
transformers' continuous batching), sync (B and A again without asynchronous scheduling);
then the simulator's calibration from the steps measured (``engine_calibration``).

Model: Llama-3.1-8B shape, random bf16 weights. Prints a short table last; writes
``gpu_engine.json`` (a simulator calibration too) and ``profiles.txt`` under --out.
"""

from __future__ import annotations

import sys

from kvgrid.bench.gpu import (
    engine_calibration,
    engine_common,
    engine_correct,
    engine_decode,
    engine_env,
    engine_kernels,
    engine_prefill,
    engine_vs_transformers,
)

MODULES = [
    engine_env,
    engine_kernels,
    engine_correct,
    engine_decode,
    engine_prefill,
    engine_vs_transformers,
    engine_calibration,
]


def main(argv: list[str] | None = None) -> int:
    return engine_common.main(
        argv, MODULES, "env,tests,kernels,correct,B,C,A,sync,hf", "kvgrid.bench.gpu.engine"
    )


if __name__ == "__main__":
    sys.exit(main())
