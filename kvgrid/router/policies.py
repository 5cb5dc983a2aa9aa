"""Routing policies behind one interface: given scored candidates, pick one.

The router fills each ``Candidate`` (kvgrid.router.candidates: cache overlap, backlog,
measured speeds and a predicted time to first token) before calling a policy, so every policy
sees the same facts and every decision can be explained with them. Policies differ only in
how they weigh those facts:

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

from operator import attrgetter

from kvgrid.router.candidates import Candidate

_RANK = attrgetter("score", "worker.num_active", "worker.backlog_tokens")

# Dynamo-style credit of a cached block by the tier it sits in (G1 .. G4); predicted blocks
# are freshly computed, so G1.
TIER_CREDIT = (1.0, 0.75, 0.5, 0.25)


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
        s, a, b = best.score, best.worker.num_active, best.worker.backlog_tokens
        tied = [
            c
            for c in cands
            if c.score == s and c.worker.num_active == a and c.worker.backlog_tokens == b
        ]
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
            c.score = c.worker.num_active + c.worker.backlog_tokens / 1e6
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
        loads = [c.worker.num_active for c in cands]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            for c in cands:
                c.score = float(c.worker.num_active)
            return self._min(cands)
        for c in cands:
            c.score = -c.prompt.cached_tokens / max(
                1, c.prompt.prompt_tokens
            )  # minus the match rate
        best = self._min(cands)
        if -best.score > self.cache_threshold:
            return best
        # no good match: the worker with the most room (least cached data), like the
        # smallest radix tree
        for c in cands:
            c.score = float(c.worker.num_cached_blocks)
        return self._min(cands)


class DynamoCost(Policy):
    name = "dynamo_cost"

    def __init__(self, overlap_weight: float = 1.0) -> None:
        self.overlap_weight = overlap_weight

    def choose(self, cands: list[Candidate]) -> Candidate:
        for c in cands:
            bs = c.prompt.block_size
            o = c.overlap
            credited = (o.by_tier[0] + o.predicted) * TIER_CREDIT[0] + sum(
                n * w for n, w in zip(o.by_tier[1:], TIER_CREDIT[1:])
            )
            request_blocks = c.prompt.prompt_tokens / bs - credited
            prefill_blocks = c.worker.backlog_tokens / bs + max(0.0, request_blocks)
            decode_blocks = c.worker.active_kv_blocks
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
        least = min([c.worker.num_active for c in cands])
        allowed = (1 + self.spread_rel) * least
        rw, xs = self.recompute_weight, self.excess_s
        for c in cands:
            w = c.worker
            c.score = (
                c.predicted_ttft_s
                + rw * (c.prompt.uncached_tokens / w.prefill_tokens_per_s)
                + xs * max(0.0, w.num_active - allowed)
            )
        return self._min(cands)


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
