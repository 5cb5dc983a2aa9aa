"""Workload generators and the workload spec that names one (or a Mooncake trace).

Generators: multi-turn chat, agent fan-out, shared system prompt, long-document QA, bursty
sinusoidal arrivals and a no-reuse stream. All take a ``seed`` and are reproducible; each
returns a ``kvgrid.bench.workload.Workload``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvgrid.bench.mooncake import load_mooncake
from kvgrid.bench.workload import DEFAULT_VOCAB_SIZE, Request, Workload

# ---- helpers for generators -----------------------------------------------------------


class _Ids:
    """Allocates fresh hash ids (unique within one workload)."""

    def __init__(self, start: int = 0) -> None:
        self.next = start

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def _blocks(n_tokens: int, bt: int) -> int:
    return -(-n_tokens // bt)


def poisson_arrivals(rng: np.random.Generator, n: int, rate: float, start: float = 0.0) -> list:
    if rate <= 0:
        raise ValueError("rate must be positive")
    return (start + np.cumsum(rng.exponential(1.0 / rate, size=n))).tolist()


def sinusoidal_arrivals(
    rng: np.random.Generator,
    duration_s: float,
    min_rate: float,
    max_rate: float,
    period_s: float,
    phase: float = -math.pi / 2,
) -> list[float]:
    """A Poisson process whose rate swings between ``min_rate`` and ``max_rate`` (thinning).
    The default phase starts at the minimum."""
    if not 0 <= min_rate <= max_rate or max_rate <= 0:
        raise ValueError("need 0 <= min_rate <= max_rate and max_rate > 0")
    mid, amp = (max_rate + min_rate) / 2, (max_rate - min_rate) / 2
    n_cand = rng.poisson(max_rate * duration_s)
    t = np.sort(rng.uniform(0, duration_s, size=n_cand))
    rate = mid + amp * np.sin(2 * math.pi * t / period_s + phase)
    keep = rng.uniform(0, max_rate, size=n_cand) < rate
    return t[keep].tolist()


def _lengths(rng: np.random.Generator, mean: int, n: int, spread: float) -> list[int]:
    """Lengths around ``mean`` (uniform +-spread), at least 1."""
    if spread <= 0:
        return [mean] * n
    lo, hi = max(1, int(mean * (1 - spread))), max(1, int(mean * (1 + spread)))
    return rng.integers(lo, hi + 1, size=n).tolist()


def _finish(name: str, reqs: list[Request], bt: int, vocab: int, seed: int, **meta) -> Workload:
    reqs.sort(key=lambda r: r.arrival_s)
    for i, r in enumerate(reqs):
        if not r.request_id:
            r.request_id = f"{name}-{i}"
    return Workload(name, reqs, bt, vocab, seed, meta)


# ---- generators -----------------------------------------------------------------------


def multi_turn_chat(
    num_sessions: int = 50,
    turns: int = 4,
    system_tokens: int = 256,
    user_tokens: int = 128,
    output_tokens: int = 128,
    session_rate: float = 1.0,
    think_time_s: float = 10.0,
    block_tokens: int = 64,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
) -> Workload:
    """Chat sessions: each turn resends the whole conversation so far (shared system prompt,
    earlier user turns and the recorded assistant replies) plus a new user message.

    A session is one stream of blocks; turn t's prompt is the stream's first L_t tokens, so
    a partial last block of one turn is the start of the same full block in the next. The
    system prompt is rounded up to whole blocks so that every session shares it exactly.
    """
    rng = np.random.default_rng(seed)
    ids = _Ids()
    sys_blocks = ids.take(_blocks(system_tokens, block_tokens))
    sys_len = len(sys_blocks) * block_tokens
    starts = poisson_arrivals(rng, num_sessions, session_rate)
    reqs: list[Request] = []
    for s, t0 in enumerate(starts):
        length = sys_len
        stream = list(sys_blocks)
        t = t0
        for turn in range(turns):
            length += int(_lengths(rng, user_tokens, 1, 0.5)[0])
            need = _blocks(length, block_tokens)
            if need > len(stream):
                stream += ids.take(need - len(stream))
            out = int(_lengths(rng, output_tokens, 1, 0.5)[0])
            reqs.append(
                Request(
                    t,
                    out,
                    length,
                    tuple(stream[:need]),
                    session_id=f"chat-{s}",
                    meta={"turn": turn},
                )
            )
            length += out  # the recorded reply becomes part of the next turn's prompt
            t += float(rng.exponential(think_time_s))
    return _finish("multi_turn_chat", reqs, block_tokens, vocab_size, seed, turns=turns)


def agent_fanout(
    num_tasks: int = 20,
    fanout: int = 16,
    prefix_tokens: int = 4096,
    suffix_tokens: int = 256,
    output_tokens: int = 128,
    task_rate: float = 0.5,
    spread_s: float = 0.5,
    block_tokens: int = 64,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
) -> Workload:
    """Agents that fan out: per task, ``fanout`` sibling requests on one long prefix, sent
    within ``spread_s`` of each other (tool calls, parallel sub-questions)."""
    rng = np.random.default_rng(seed)
    ids = _Ids()
    starts = poisson_arrivals(rng, num_tasks, task_rate)
    pre_blocks = _blocks(prefix_tokens, block_tokens)
    pre_len = pre_blocks * block_tokens
    reqs = []
    for k, t0 in enumerate(starts):
        prefix = ids.take(pre_blocks)
        for j in range(fanout):
            n = pre_len + int(_lengths(rng, suffix_tokens, 1, 0.5)[0])
            tail = ids.take(_blocks(n, block_tokens) - pre_blocks)
            reqs.append(
                Request(
                    t0 + float(rng.uniform(0, spread_s)),
                    int(_lengths(rng, output_tokens, 1, 0.5)[0]),
                    n,
                    tuple(prefix + tail),
                    session_id=f"task-{k}",
                    meta={"sibling": j},
                )
            )
    return _finish("agent_fanout", reqs, block_tokens, vocab_size, seed, fanout=fanout)


def shared_system_prompt(
    num_requests: int = 500,
    system_tokens: int = 2048,
    user_tokens: int = 256,
    output_tokens: int = 128,
    rate: float = 10.0,
    num_users: int = 100,
    block_tokens: int = 64,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
) -> Workload:
    """Many users, one system prompt: every request starts with the same prefix, then a
    user message of its own. A hot prefix that a router must spread, not pile up."""
    rng = np.random.default_rng(seed)
    ids = _Ids()
    sys_blocks = ids.take(_blocks(system_tokens, block_tokens))
    sys_len = len(sys_blocks) * block_tokens
    times = poisson_arrivals(rng, num_requests, rate)
    users = rng.integers(0, num_users, size=num_requests)
    ins = _lengths(rng, user_tokens, num_requests, 0.5)
    outs = _lengths(rng, output_tokens, num_requests, 0.5)
    reqs = []
    for i, t in enumerate(times):
        n = sys_len + ins[i]
        tail = ids.take(_blocks(n, block_tokens) - len(sys_blocks))
        reqs.append(Request(t, outs[i], n, tuple(sys_blocks + tail), session_id=f"user-{users[i]}"))
    return _finish("shared_system_prompt", reqs, block_tokens, vocab_size, seed)


def long_document_qa(
    num_docs: int = 10,
    questions_per_doc: int = 8,
    doc_tokens: int = 16_384,
    question_tokens: int = 64,
    output_tokens: int = 256,
    rate: float = 1.0,
    block_tokens: int = 64,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
) -> Workload:
    """Questions about long documents, the questions of all documents interleaved in time
    (so a document's KV must survive other documents' traffic to be reused)."""
    rng = np.random.default_rng(seed)
    ids = _Ids()
    docs = [ids.take(_blocks(doc_tokens, block_tokens)) for _ in range(num_docs)]
    doc_len = len(docs[0]) * block_tokens
    n = num_docs * questions_per_doc
    order = rng.permutation(np.repeat(np.arange(num_docs), questions_per_doc))
    times = poisson_arrivals(rng, n, rate)
    reqs = []
    for i, (t, d) in enumerate(zip(times, order)):
        length = doc_len + int(_lengths(rng, question_tokens, 1, 0.5)[0])
        tail = ids.take(_blocks(length, block_tokens) - len(docs[d]))
        reqs.append(
            Request(
                t,
                int(_lengths(rng, output_tokens, 1, 0.3)[0]),
                length,
                tuple(docs[d] + tail),
                session_id=f"doc-{d}",
                meta={"question": i},
            )
        )
    return _finish("long_document_qa", reqs, block_tokens, vocab_size, seed)


def no_reuse(
    num_requests: int = 500,
    input_tokens: int = 1024,
    output_tokens: int = 128,
    rate: float = 10.0,
    spread: float = 0.5,
    block_tokens: int = 64,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
) -> Workload:
    """Every prompt unique from its first token: nothing to reuse, routing is pure balance."""
    rng = np.random.default_rng(seed)
    ids = _Ids()
    times = poisson_arrivals(rng, num_requests, rate)
    ins = _lengths(rng, input_tokens, num_requests, spread)
    outs = _lengths(rng, output_tokens, num_requests, spread)
    reqs = [
        Request(t, outs[i], ins[i], tuple(ids.take(_blocks(ins[i], block_tokens))))
        for i, t in enumerate(times)
    ]
    return _finish("no_reuse", reqs, block_tokens, vocab_size, seed)


def bursty_sinusoidal(
    duration_s: float = 600.0,
    min_rate: float = 1.0,
    max_rate: float = 24.0,
    period_s: float = 300.0,
    input_tokens: int = 8192,
    output_tokens: int = 1024,
    spread: float = 0.0,
    shared_prefix_tokens: int = 0,
    block_tokens: int = 64,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
) -> Workload:
    """Arrivals whose rate swings sinusoidally between ``min_rate`` and ``max_rate``
    (starting at the minimum); prompts unique beyond an optional shared prefix."""
    rng = np.random.default_rng(seed)
    ids = _Ids()
    pre = ids.take(_blocks(shared_prefix_tokens, block_tokens)) if shared_prefix_tokens else []
    pre_len = len(pre) * block_tokens
    times = sinusoidal_arrivals(rng, duration_s, min_rate, max_rate, period_s)
    n = len(times)
    ins = _lengths(rng, input_tokens, n, spread)
    outs = _lengths(rng, output_tokens, n, spread)
    reqs = []
    for i, t in enumerate(times):
        length = max(ins[i], pre_len + 1)
        reqs.append(
            Request(
                t, outs[i], length, tuple(pre + ids.take(_blocks(length, block_tokens) - len(pre)))
            )
        )
    return _finish(
        "bursty_sinusoidal",
        reqs,
        block_tokens,
        vocab_size,
        seed,
        min_rate=min_rate,
        max_rate=max_rate,
        period_s=period_s,
    )


def constant_rate(
    duration_s: float = 600.0,
    rate: float = 8.0,
    input_tokens: int = 8192,
    output_tokens: int = 1024,
    block_tokens: int = 64,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
) -> Workload:
    """Poisson arrivals at a fixed rate, unique prompts (the planner's steady-state case)."""
    w = bursty_sinusoidal(
        duration_s,
        rate,
        rate,
        1.0,
        input_tokens,
        output_tokens,
        0.0,
        0,
        block_tokens,
        vocab_size,
        seed,
    )
    w.name = "constant_rate"
    return w


def scale_time(w: Workload, speed: float) -> Workload:
    """Arrivals ``speed`` times faster (2.0 halves every gap)."""
    if speed <= 0:
        raise ValueError("speed must be positive")
    for r in w.requests:
        r.arrival_s /= speed
    w.meta["speed"] = w.meta.get("speed", 1.0) * speed
    return w


def mix(workloads: Sequence[Workload], name: str = "mix") -> Workload:
    """Merge workloads into one stream; hash ids are offset so they stay distinct. All
    parts must share the block size."""
    bts = {w.block_tokens for w in workloads}
    if len(bts) != 1:
        raise ValueError(f"cannot mix workloads of different block sizes: {sorted(bts)}")
    offset, reqs = 0, []
    for w in workloads:
        top = -1
        for r in w.requests:
            if r.hash_ids:
                top = max(top, max(r.hash_ids))
            r.hash_ids = tuple(h + offset for h in r.hash_ids)
            r.request_id = f"{w.name}:{r.request_id}"
            reqs.append(r)
        offset += top + 1
    reqs.sort(key=lambda r: r.arrival_s)
    return Workload(name, reqs, bts.pop(), workloads[0].vocab_size, workloads[0].seed)


GENERATORS: dict[str, Callable[..., Workload]] = {
    "chat": multi_turn_chat,
    "agent": agent_fanout,
    "system_prompt": shared_system_prompt,
    "docqa": long_document_qa,
    "sinusoidal": bursty_sinusoidal,
    "constant": constant_rate,
    "no_reuse": no_reuse,
}


SPEC_HELP = (
    "mooncake:conversation | mooncake:synthetic | mooncake:PATH.jsonl, options after commas "
    "(tokens_per_block=64,max_input_tokens=1536,max_output_tokens=32,limit=200,repeat=2,"
    "speed=2,shards=16,shard=0); or a generator: chat, agent, system_prompt, docqa, "
    "sinusoidal, constant, no_reuse with key=value options"
)


def _parse_value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def load_workload(spec: str, **overrides: Any) -> Workload:
    """A workload from a spec: ``mooncake:conversation``, ``mooncake:PATH.jsonl``, or a
    generator name with options, ``chat:num_sessions=20,turns=3,seed=1``. Mooncake options
    (``tokens_per_block``, ``max_input_tokens``, ``limit``, ``repeat`` ...) go after a comma."""
    name, _, rest = spec.partition(":")
    opts: dict[str, Any] = {}
    target = ""
    for part in filter(None, rest.split(",")):
        if "=" in part:
            k, v = part.split("=", 1)
            opts[k.strip()] = _parse_value(v.strip())
        else:
            target = part.strip()
    opts.update({k: v for k, v in overrides.items() if v is not None})
    if name == "mooncake":
        gen: Callable[..., Workload] = functools.partial(load_mooncake, target or "conversation")
    elif name in GENERATORS:
        gen = GENERATORS[name]
    else:
        raise ValueError(
            f"unknown workload {name!r}; use mooncake:<trace> or one of {', '.join(GENERATORS)}"
        )
    try:
        return gen(**opts)
    except TypeError as e:
        raise ValueError(f"bad options for workload {name!r}: {e}") from None


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``kvgrid bench workload``."""
    p.add_argument("spec", help=SPEC_HELP)
    p.add_argument("--block-size", type=int, default=None, help="engine block size")


def run(args: argparse.Namespace) -> int:
    """``kvgrid bench workload``: a workload's statistics and theoretical hit rate."""
    w = load_workload(args.spec)
    out = w.stats()
    out["theoretical_hit_rate"] = w.theoretical_hit_rate()
    if args.block_size:
        out["theoretical_hit_rate_engine_blocks"] = w.theoretical_hit_rate(args.block_size)
    print(json.dumps(out, indent=1))
    return 0
