"""A worker as a candidate for one request: the facts every policy weighs, and how the router
gathers them.

``Candidate`` groups what the cache holds for this request there (``overlap``, and
``PromptWork``: tokens served from cache, tokens left to compute, the time to bring
lower-tier blocks up) and the worker's state at the decision (``WorkerView``: queue,
requests, memory, measured speeds, its site's round trip). The router fills in the predicted
time to first token (``predict_ttft``); a policy (kvgrid.router.policies) then writes its
score. Pure and clock-free, like the router.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from kvgrid.router.index import Overlap, WorkerEntry
from kvgrid.router.workers import DEFAULT_TIER_BYTES_PER_S, WorkerLoad, WorkerState

_EMPTY = Overlap()

# PromptWork and WorkerView are facts, never changed once built, yet not frozen: the router
# builds both for every worker of every decision, and a frozen dataclass's __init__ costs
# several times a plain one's, enough to slow every decision in a large fleet.


@dataclass(slots=True)
class PromptWork:
    """The request's prompt on one worker: what its cache serves and what is left to do."""

    prompt_tokens: int
    cached_tokens: int  # prompt tokens the worker should serve from cache (engine's rule)
    uncached_tokens: int
    block_size: int
    tier_load_s: float = 0.0  # time to bring lower-tier blocks up to G1


@dataclass(slots=True)
class WorkerView:
    """The worker at the decision: its queue, requests, memory, speeds and distance."""

    backlog_tokens: int  # prefill tokens queued in front of this request
    num_decoding: int
    num_active: int
    kv_usage: float
    num_cached_blocks: int  # blocks the index holds for the worker (all tiers)
    active_kv_blocks: float  # G1 blocks held by running requests
    prefill_tokens_per_s: float
    decode_step_s: float
    max_num_batched_tokens: int
    network_s: float = 0.0  # the round trip to the worker's site


@dataclass(slots=True)
class Candidate:
    """One worker as a policy sees it: the facts (``prompt``, ``worker``) and what the router
    and the policy derive from them (``predicted_ttft_s``, ``score``)."""

    worker_id: str
    freshness: str  # exact | predicted | stale
    overlap: Overlap
    prompt: PromptWork
    worker: WorkerView
    predicted_ttft_s: float = 0.0
    score: float = 0.0

    def ttft_parts(self) -> dict[str, float]:
        """The terms of ``predicted_ttft_s`` (see predict_ttft)."""
        p, w = self.prompt, self.worker
        pf = w.prefill_tokens_per_s
        steps = math.ceil((w.backlog_tokens + p.uncached_tokens) / w.max_num_batched_tokens)
        return {
            "queue_s": w.backlog_tokens / pf,
            "prefill_s": p.uncached_tokens / pf,
            "tier_load_s": p.tier_load_s,
            "decode_interference_s": steps * w.decode_step_s if w.num_decoding else 0.0,
            "network_s": w.network_s,
        }

    def to_dict(self) -> dict:
        o, p, w = self.overlap, self.prompt, self.worker
        return {
            "worker_id": self.worker_id,
            "freshness": self.freshness,
            "matched_blocks": o.blocks,
            "matched_by_tier": {
                "G1": o.by_tier[0],
                "G2": o.by_tier[1],
                "G3": o.by_tier[2],
                "G4": o.by_tier[3],
                "predicted": o.predicted,
            },
            "cached_tokens": p.cached_tokens,
            "uncached_tokens": p.uncached_tokens,
            "backlog_tokens": w.backlog_tokens,
            "num_decoding": w.num_decoding,
            "num_active": w.num_active,
            "kv_usage": round(w.kv_usage, 4),
            "predicted_ttft_s": round(self.predicted_ttft_s, 6),
            "ttft_parts": {k: round(v, 6) for k, v in self.ttft_parts().items()},
            "score": round(self.score, 6),
        }


def predict_ttft(c: Candidate) -> float:
    """Queue wait + this request's uncached prefill + loads from lower tiers + the round
    trip to the worker's site, in seconds.

    With chunked prefill each step also carries the running decodes, so every step the
    prefill needs costs one decode step on top when the worker is decoding.
    """
    p, w = c.prompt, c.worker
    work = w.backlog_tokens + p.uncached_tokens
    t = work / w.prefill_tokens_per_s + p.tier_load_s + w.network_s
    if w.num_decoding:
        t += -(-work // w.max_num_batched_tokens) * w.decode_step_s
    c.predicted_ttft_s = t
    return t


def tier_load_s(o: Overlap, ld: WorkerLoad, bytes_per_block: int, bs: int, pf: float) -> float:
    """The time to bring the matched lower-tier blocks up to G1: loading a block competes
    with recomputing it, so each costs the lesser of the two."""
    t = 0.0
    for ti, tier in enumerate(("G2", "G3", "G4"), start=1):
        n = o.by_tier[ti]
        if n:
            bw = ld.tier_bytes_per_s.get(tier) or DEFAULT_TIER_BYTES_PER_S[tier]
            t += min(n * bytes_per_block / bw, n * bs / pf)
    return t


def score_group(
    members: list[tuple[WorkerState, WorkerEntry]],
    overlaps: dict[str, Overlap],
    prompt_tokens: int,
    block_size: int,
    whole_prompt: bool,
    fleet_speeds: Callable[[], tuple[float, float]],
    site_rtt_s: dict[str, float],
) -> list[Candidate]:
    """The candidates of workers that share a key chain (so one ``overlaps`` lookup serves
    them all), each with its predicted TTFT. ``fleet_speeds``: (prefill tokens/s, decode
    step s) for a worker that has not measured its own yet. ``whole_prompt``: no cached
    block serves the request (prompt logprobs)."""
    n, bs = prompt_tokens, block_size
    # the last prompt token is always computed
    hit_cap = 0 if whole_prompt else max(0, (n - 1) // bs)
    out = []
    for w, e in members:
        ld, info = w.load, w.info
        o = overlaps.get(info.worker_id, _EMPTY)
        blocks = o.blocks
        cached = (blocks if blocks < hit_cap else hit_cap) * bs
        pf, ds = ld.prefill_tokens_per_s, ld.decode_step_s
        if not (pf and ds):
            fleet = fleet_speeds()
            pf, ds = pf or fleet[0], ds or fleet[1]
        tier_load = 0.0
        if blocks > o.by_tier[0] + o.predicted and info.bytes_per_block:
            tier_load = tier_load_s(o, ld, info.bytes_per_block, bs, pf)
        if not info.events:
            fresh = "predicted"
        else:
            fresh = "stale" if e.stale else "exact"
        backlog, decoding, active = w.loads()
        view = WorkerView(
            backlog,
            decoding,
            active,
            ld.kv_usage,
            e.num_blocks(),
            ld.kv_usage * ld.num_kv_blocks,
            pf,
            ds,
            info.max_num_batched_tokens,
            site_rtt_s.get(info.site, 0.0) if site_rtt_s else 0.0,
        )
        c = Candidate(
            info.worker_id, fresh, o, PromptWork(n, cached, n - cached, bs, tier_load), view
        )
        predict_ttft(c)
        out.append(c)
    return out
