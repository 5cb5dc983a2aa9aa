"""GPU benchmark of the context store: correctness first, then speed, in one run on one engine.

    python -m kvgrid.bench.gpu.store                      # everything (one H200, ~9 min)
    python -m kvgrid.bench.gpu.store --phases env,correct,ttft
    python -m kvgrid.bench.gpu.store --sizes 512,1024 --replay-limit 8   # CPU smoke

Phases, in order (each also runs alone as ``python -m kvgrid.bench.gpu.store_<phase>``):
env (versions, disk, host->GPU ceilings), correct (loaded KV bit-exact, tokens and logprobs
equal), ttft (time to first token from G2/G3/G4, cold and warm, vs recompute), split (a
throttled disk: forced load vs the engine's choice), enc (encryption A/B; not in the default
list), replay (a Mooncake slice in-process without and with the store). Prints a table last;
writes ``gpu_store.json`` under --out after every phase.
"""

from __future__ import annotations

import sys

from kvgrid.bench.gpu import (
    store_common,
    store_correct,
    store_enc,
    store_env,
    store_replay,
    store_split,
    store_ttft,
)

PHASES = [store_env, store_correct, store_ttft, store_split, store_enc, store_replay]
DEFAULT = "env,correct,ttft,split,replay"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--phases" or a.startswith("--phases=") for a in argv):
        argv = ["--phases", DEFAULT, *argv]
    return store_common.main(argv, PHASES, "kvgrid.bench.gpu.store")


if __name__ == "__main__":
    sys.exit(main())
