"""Routing policies behind one interface: given scored candidates, pick one.

The router fills each ``Candidate`` (cache overlap, backlog, measured speeds and a predicted
time to first token) before calling a policy, so every policy sees the same facts and every
decision can be explained with them. Policies differ only in how they weigh those facts:

- ``round_robin``      cycle over the workers, ignoring everything.
- ``least_load``       fewest active requests, then the smallest prefill backlog.
- ``prefix_affinity``  cache-aware with a load-imbalance fallback, in the manner of SGLang's
                       router: when loads are balanced, the best prefix match above a match-rate
                       threshold wins, otherwise the worker with the least cached data; when
                       loads are skewed, the least loaded worker wins.
- ``dynamo_cost``      a block-count cost in the manner of Dynamo's KV router: the prefill
                       blocks the worker would still have to compute (its queue plus this
                       request, cached blocks credited per tier) plus its decode load in blocks.
- ``ttft``             kvgrid's default: the lowest predicted time to first token, plus a small
                       charge for the compute a cache miss spends (so siblings stay together
                       while the cached worker's queue is short, and spread once it is not)
                       and a per-request load check (a worker carrying more than 1.25x the
                       least loaded worker's requests pays for the excess, so hot prefixes
                       spread instead of piling up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from operator import attrgetter

from kvgrid.router.index import Overlap

_RANK = attrgetter("score", "num_active", "backlog_tokens")

# Dynamo-style credit of a cached block by the tier it sits in (G1 .. G4); predicted blocks
# are freshly computed, so G1.
TIER_CREDIT = (1.0, 0.75, 0.5, 0.25)


@dataclass(slots=True)
class Candidate:
    worker_id: str
    freshness: str  # exact | predicted | stale
    overlap: Overlap
    prompt_tokens: int
    cached_tokens: int  # prompt tokens the worker should serve from cache (engine's rule)
    uncached_tokens: int
    backlog_tokens: int  # prefill tokens queued in front of this request
    num_decoding: int
    num_active: int
    kv_usage: float
    num_cached_blocks: int  # blocks the index holds for the worker (all tiers)
    active_kv_blocks: float  # G1 blocks held by running requests
    block_size: int
    prefill_tokens_per_s: float
    decode_step_s: float
    max_num_batched_tokens: int
    tier_load_s: float = 0.0  # time to bring lower-tier blocks up to G1
    network_s: float = 0.0  # the round trip to the worker's site
    predicted_ttft_s: float = 0.0
    score: float = 0.0

    def ttft_parts(self) -> dict[str, float]:
        """The terms of ``predicted_ttft_s`` (see predict_ttft)."""
        pf = self.prefill_tokens_per_s
        steps = math.ceil(
            (self.backlog_tokens + self.uncached_tokens) / self.max_num_batched_tokens
        )
        return {
            "queue_s": self.backlog_tokens / pf,
            "prefill_s": self.uncached_tokens / pf,
            "tier_load_s": self.tier_load_s,
            "decode_interference_s": steps * self.decode_step_s if self.num_decoding else 0.0,
            "network_s": self.network_s,
        }

    def to_dict(self) -> dict:
        o = self.overlap
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
            "cached_tokens": self.cached_tokens,
            "uncached_tokens": self.uncached_tokens,
            "backlog_tokens": self.backlog_tokens,
            "num_decoding": self.num_decoding,
            "num_active": self.num_active,
            "kv_usage": round(self.kv_usage, 4),
            "predicted_ttft_s": round(self.predicted_ttft_s, 6),
            "ttft_parts": {k: round(v, 6) for k, v in self.ttft_parts().items()},
            "score": round(self.score, 6),
        }


class Policy:
    name = "base"

    def choose(self, cands: list[Candidate]) -> Candidate:
        raise NotImplementedError

    _ties = 0

    def _min(self, cands: list[Candidate]) -> Candidate:
        # ties go to the less busy worker, then rotate (deterministic): always taking the
        # lexically first of several idle workers would load the low ids most at light load.
        # (The worker id need not break ties in `min`: several tied candidates are sorted
        # by id below, and a single one is the minimum whatever the order.)
        best = min(cands, key=_RANK)
        s, a, b = best.score, best.num_active, best.backlog_tokens
        tied = [c for c in cands if c.score == s and c.num_active == a and c.backlog_tokens == b]
        if len(tied) == 1:
            return best
        tied.sort(key=lambda c: c.worker_id)
        pick = tied[self._ties % len(tied)]
        self._ties += 1
        return pick


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, cands: list[Candidate]) -> Candidate:
        ordered = sorted(cands, key=lambda c: c.worker_id)
        pick = ordered[self._next % len(ordered)]
        self._next += 1
        for c in cands:
            c.score = 0.0 if c is pick else 1.0
        return pick


class LeastLoad(Policy):
    name = "least_load"

    def choose(self, cands: list[Candidate]) -> Candidate:
        for c in cands:
            c.score = c.num_active + c.backlog_tokens / 1e6
        return self._min(cands)


class PrefixAffinity(Policy):
    name = "prefix_affinity"

    def __init__(
        self,
        cache_threshold: float = 0.5,
        balance_abs_threshold: int = 32,
        balance_rel_threshold: float = 1.1,
    ) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def choose(self, cands: list[Candidate]) -> Candidate:
        loads = [c.num_active for c in cands]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            for c in cands:
                c.score = float(c.num_active)
            return self._min(cands)
        for c in cands:
            c.score = -c.cached_tokens / max(1, c.prompt_tokens)  # minus the match rate
        best = self._min(cands)
        if -best.score > self.cache_threshold:
            return best
        # no good match: the worker with the most room (least cached data), like the
        # smallest radix tree
        for c in cands:
            c.score = float(c.num_cached_blocks)
        return self._min(cands)


class DynamoCost(Policy):
    name = "dynamo_cost"

    def __init__(self, overlap_weight: float = 1.0) -> None:
        self.overlap_weight = overlap_weight

    def choose(self, cands: list[Candidate]) -> Candidate:
        for c in cands:
            bs = c.block_size
            o = c.overlap
            credited = (o.by_tier[0] + o.predicted) * TIER_CREDIT[0] + sum(
                n * w for n, w in zip(o.by_tier[1:], TIER_CREDIT[1:])
            )
            request_blocks = c.prompt_tokens / bs - credited
            prefill_blocks = c.backlog_tokens / bs + max(0.0, request_blocks)
            decode_blocks = c.active_kv_blocks
            c.score = self.overlap_weight * prefill_blocks + decode_blocks
        return self._min(cands)


class PredictedTTFT(Policy):
    """kvgrid's default: the lowest predicted time to first token, with two charges.

    - ``recompute_weight`` per second of prefill this request would compute there: that
      compute delays every later request on the chosen worker, so a cache hit is worth a
      little more than the time it saves this request.
    - A per-request load check, soft: every active request a worker carries beyond
      ``1 + spread_rel`` times the least loaded worker's count costs ``excess_s`` seconds.
      A cached prefix still wins wherever it saves more than that, but a hot prefix never
      piles up on the workers that happen to hold it while others sit idle: once its
      holders are busier than the rest, a cold worker takes a request, computes the prefix
      once and holds it from then on. No fleet-wide switch: each request weighs its own
      saving against each worker's excess load.
    """

    name = "ttft"

    def __init__(
        self,
        recompute_weight: float = 0.2,
        spread_rel: float = 0.25,
        excess_s: float = 0.05,
    ) -> None:
        self.recompute_weight = recompute_weight
        self.spread_rel = spread_rel
        self.excess_s = excess_s

    def choose(self, cands: list[Candidate]) -> Candidate:
        least = min([c.num_active for c in cands])
        allowed = (1 + self.spread_rel) * least
        rw, xs = self.recompute_weight, self.excess_s
        for c in cands:
            c.score = (
                c.predicted_ttft_s
                + rw * (c.uncached_tokens / c.prefill_tokens_per_s)
                + xs * max(0.0, c.num_active - allowed)
            )
        return self._min(cands)


def predict_ttft(c: Candidate) -> float:
    """Queue wait + this request's uncached prefill + loads from lower tiers + the round
    trip to the worker's site, in seconds.

    With chunked prefill each step also carries the running decodes, so every step the
    prefill needs costs one decode step on top when the worker is decoding.
    """
    work = c.backlog_tokens + c.uncached_tokens
    t = work / c.prefill_tokens_per_s + c.tier_load_s + c.network_s
    if c.num_decoding:
        t += -(-work // c.max_num_batched_tokens) * c.decode_step_s
    c.predicted_ttft_s = t
    return t


POLICIES = {p.name: p for p in (RoundRobin, LeastLoad, PrefixAffinity, DynamoCost, PredictedTTFT)}
DEFAULT_POLICY = PredictedTTFT.name


def make_policy(name: str, **kwargs) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}"
        ) from None
    return cls(**kwargs)
