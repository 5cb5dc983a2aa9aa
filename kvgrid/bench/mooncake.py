"""Mooncake FAST'25 traces as workloads.

Record format (see data/mooncake/README.md, which also gives the traces' source and
licence): ``timestamp`` (ms from the trace's start), ``input_length``, ``output_length`` and
``hash_ids``, one id per 512-token block of the prompt, the last block possibly partial. Ids
are chained prefix hashes: equal ids mean a reusable prefix.

To fit small models, ``tokens_per_block`` shrinks every 512-token block to fewer tokens (the
prefix structure is unchanged, lengths scale by tokens_per_block/512), ``max_input_tokens``
drops the blocks past a cap, and ``max_output_tokens`` caps outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvgrid import envs
from kvgrid.bench.workload import DEFAULT_VOCAB_SIZE, Request, Workload

MOONCAKE_BLOCK_TOKENS = 512
TRACE_NAMES = {
    "conversation": "conversation_trace.jsonl",
    "synthetic": "synthetic_trace.jsonl",
    "toolagent": "toolagent_trace.jsonl",
}


# The conversation and synthetic traces ship with the package; toolagent is not included.
BUNDLED_TRACES = Path(__file__).resolve().parent / "data" / "mooncake"


def trace_dir() -> Path:
    """Where trace names resolve: $KVGRID_TRACES, else the traces shipped with kvgrid."""
    return envs.KVGRID_TRACES.get() if envs.KVGRID_TRACES.is_set() else BUNDLED_TRACES


def resolve_trace(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".jsonl" or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"Mooncake trace not found: {p}")
        return p
    fname = TRACE_NAMES.get(name_or_path)
    if fname is None:
        raise ValueError(
            f"unknown Mooncake trace {name_or_path!r}: give a .jsonl path or one of "
            f"{', '.join(TRACE_NAMES)}"
        )
    p = trace_dir() / fname
    if not p.exists():
        raise FileNotFoundError(
            f"Mooncake trace not found: {p} (give a .jsonl path, or set KVGRID_TRACES to the "
            "folder holding it)"
        )
    return p


def read_records(path: Path) -> list[dict[str, Any]]:
    recs = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                int(r["timestamp"]), int(r["input_length"]), int(r["output_length"])
                list(r["hash_ids"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not a Mooncake trace record ({e})") from None
            recs.append(r)
    return recs


def prefix_family(hash_ids: list[int]) -> int:
    """The id that decides which requests can share KV past the first block."""
    return hash_ids[1] if len(hash_ids) > 1 else hash_ids[0] if hash_ids else 0


def load_mooncake(
    trace: str = "conversation",
    tokens_per_block: int = MOONCAKE_BLOCK_TOKENS,
    max_input_tokens: int | None = None,
    max_output_tokens: int | None = None,
    min_output_tokens: int = 1,
    limit: int | None = None,
    start: int = 0,
    start_s: float | None = None,
    end_s: float | None = None,
    speed: float = 1.0,
    repeat: int = 1,
    shards: int = 1,
    shard: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
) -> Workload:
    """Load a Mooncake trace (a name from TRACE_NAMES or a path).

    Requests are sorted by arrival (ties in file order). ``start_s``/``end_s`` slice by
    time, then ``shards``/``shard`` keep the requests of one prefix family shard, then
    ``start``/``limit`` slice by index, all before ``speed`` divides the gaps. ``repeat`` > 1
    overlays independent copies of the user population (every hash id offset per copy, so
    copies share nothing), multiplying the rate by ``repeat``.

    A request's prefix family is the id of its second block (its first if it has one): ids
    are chained, so two requests can share KV only within one family, past a first block
    every request may share (the conversation trace's system prompt). Shard ``shard`` of
    ``shards`` holds the families whose id is ``shard`` modulo ``shards``: what one of that
    many servers receives behind a router that keeps each family on one server. It keeps
    the trace's reuse within families and its time span, at about 1/``shards`` of its rate
    and of its working set.
    """
    if tokens_per_block <= 0 or tokens_per_block > MOONCAKE_BLOCK_TOKENS:
        raise ValueError(f"tokens_per_block must be in 1..{MOONCAKE_BLOCK_TOKENS}")
    if speed <= 0 or repeat < 1:
        raise ValueError("speed must be positive and repeat >= 1")
    if shards < 1 or not 0 <= shard < shards:
        raise ValueError(f"shard must be in 0..shards-1, got {shard} of {shards}")
    path = resolve_trace(trace)
    recs = read_records(path)
    order = sorted(range(len(recs)), key=lambda i: (recs[i]["timestamp"], i))
    # (index in arrival order, record): a request's id names its place in the whole trace,
    # whatever slice or shard it comes in
    picked = [(n, recs[i]) for n, i in enumerate(order)]
    if start_s is not None or end_s is not None:
        lo = -1e300 if start_s is None else start_s * 1000
        hi = 1e300 if end_s is None else end_s * 1000
        picked = [(n, r) for n, r in picked if lo <= r["timestamp"] < hi]
    if shards > 1:
        picked = [(n, r) for n, r in picked if prefix_family(r["hash_ids"]) % shards == shard]
    picked = picked[start : None if limit is None else start + limit]
    if not picked:
        raise ValueError(f"{path}: no requests in the selected slice")
    t0 = picked[0][1]["timestamp"]
    scale = tokens_per_block / MOONCAKE_BLOCK_TOKENS
    top = max((max(r["hash_ids"]) for _, r in picked if r["hash_ids"]), default=0) + 1
    # Each record once: (arrival, output tokens, input tokens, its hash ids, its index).
    base = []
    for idx, r in picked:
        n_in = max(1, round(r["input_length"] * scale))
        if max_input_tokens is not None and n_in > max_input_tokens:
            n_in = max_input_tokens
        n_blocks = -(-n_in // tokens_per_block)
        out = max(min_output_tokens, int(r["output_length"]))
        if max_output_tokens is not None:
            out = min(out, max_output_tokens)
        arrival = (r["timestamp"] - t0) / 1000.0 / speed
        base.append((arrival, out, n_in, tuple(r["hash_ids"][:n_blocks]), idx))
    # Copies share arrival times, so arrival order is: per run of records with one arrival
    # time (recs are sorted), copy 0's records, then copy 1's, ... (what a stable sort of
    # the copies laid end to end gives, without sorting a million requests).
    reqs: list[Request] = []
    lo = 0
    while lo < len(base):
        hi = lo + 1
        while hi < len(base) and base[hi][0] == base[lo][0]:
            hi += 1
        for copy in range(repeat):
            off = copy * top
            for arrival, out, n_in, hids, idx in base[lo:hi]:
                reqs.append(
                    Request(
                        arrival_s=arrival,
                        max_tokens=out,
                        input_length=n_in,
                        hash_ids=tuple([h + off for h in hids]) if off else hids,
                        request_id=f"mc{copy}-{idx}" if repeat > 1 else f"mc-{idx}",
                    )
                )
        lo = hi
    name = f"mooncake:{Path(path).stem.removesuffix('_trace')}"
    return Workload(
        name,
        reqs,
        tokens_per_block,
        vocab_size,
        seed,
        {
            "trace": str(path),
            "speed": speed,
            "repeat": repeat,
            "scale": scale,
            "shard": f"{shard}/{shards}",
        },
    )
