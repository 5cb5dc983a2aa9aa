"""Load planning: how a stored prefix is split between recomputing its first blocks and loading
the rest (``plan_blocks``), and when a load stops waiting and the rest is recomputed
(``LoadDeadline``).

A block's stored K/V does not depend on computing the blocks before it, so the first blocks
of a stored prefix can be recomputed on the GPU while the later ones load: balanced, the time
to first token is the smaller of load and recompute, or less.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

_POLL_S = 0.005  # a load waiting on a fetch looks at its deadline this often

# Host work of the extra prefill chunk a split adds (scheduling, input building): a split
# must win by more than this, so a fast tier (G2) is simply loaded.
SPLIT_OVERHEAD_S = 0.02


@dataclass(frozen=True)
class LoadPlan:
    compute_blocks: int  # leading stored blocks recomputed instead, overlapping the load
    load_blocks: int  # the stored blocks after those, loaded
    expected_s: float | None = None  # predicted time until both parts are done
    load_s: float | None = None  # predicted time of the loaded part alone, once started


# Under load, a split recomputes as little as keeps the request within this share of its
# own recompute time (the rest of the margin absorbs misjudged tier speeds).
GUARANTEE_MARGIN = 0.9


def plan_blocks(
    load_s: list[float],
    block_tokens: int,
    prefill_tokens_per_s: float | None,
    overhead_s: float = SPLIT_OVERHEAD_S,
    start_s: float = 0.0,
    busy: bool = False,
) -> LoadPlan:
    """Split a stored prefix whose blocks cost ``load_s[i]`` seconds each to load: recompute
    the first c while loading the rest, minimising max(overhead + c * recompute, start +
    load of blocks c..), where the load starts ``start_s`` late (it waits for the engine to
    launch the step that computes the first part: ``KVLoader``). Split only where that beats
    loading everything by 10% (the costs are estimates); never recompute all of it
    (``lookup`` decides whether to use it at all).

    ``busy``: other requests wait for the GPU, so every block loaded instead of recomputed
    is GPU time they get; the request itself need only not be slower than its own recompute.
    Then c is the smallest split whose predicted time stays within ``GUARANTEE_MARGIN`` of
    recomputing all n blocks (the most loaded), if there is one."""
    n = len(load_s)
    total = float(sum(load_s))
    if n < 2 or not prefill_tokens_per_s:
        return LoadPlan(0, n, start_s + total, total)
    tc = block_tokens / prefill_tokens_per_s
    if busy:
        bound, rest = GUARANTEE_MARGIN * n * tc, total
        for c in range(n):
            if c:
                rest -= load_s[c - 1]
            t = max(overhead_s + c * tc if c else 0.0, start_s + rest)
            if t <= bound:
                return LoadPlan(c, n - c, t, rest)
    best_c, best, rest = 0, start_s + total, total
    for c in range(1, n):
        rest -= load_s[c - 1]  # load time of blocks c..n-1
        t = max(overhead_s + c * tc, start_s + rest)
        if t < best:
            best_c, best, best_rest = c, t, rest
        elif overhead_s + c * tc > start_s + rest:
            break  # the recompute side only grows from here
    if best_c == 0 or best >= 0.9 * (start_s + total):
        return LoadPlan(0, n, start_s + total, total)
    return LoadPlan(best_c, n - best_c, best, best_rest)


@dataclass
class LoadDeadline:
    """When a load stops waiting for blocks below G2 (``at``, a time.monotonic(); None: never)
    and the caller recomputes the rest. The engine may move ``at`` while the load runs; the
    load counts the blocks it has copied in ``landed``, and says in ``stopped`` why it ended
    early: ``deadline`` (a block was not ready by ``at``) or ``missing`` (no tier had a
    valid copy of a block any more: evicted since the lookup, expired, or failed its check,
    which the store counts as such)."""

    at: float | None = None
    landed: int = 0
    stopped: str | None = None

    def wait(self, fut: Future):
        """``fut``'s result, or raise FutureTimeout once ``at`` has passed first."""
        while True:
            at = self.at
            left = _POLL_S if at is None else min(_POLL_S, at - time.monotonic())
            if left <= 0 and not fut.done():
                raise FutureTimeout
            try:
                return fut.result(timeout=max(left, 0.0))
            except FutureTimeout:
                continue


def short_load_reason(ctl: LoadDeadline | None, failed: bool, now: float) -> str:
    """The lost-hit reason for the blocks a load did not bring (``BlockLedger.count``):
    ``not_loaded_deadline`` or ``not_loaded_missing`` as the load said (a deadline already
    past counts as the former), ``not_loaded_error`` when it raised or said nothing."""
    stopped = None if failed or ctl is None else ctl.stopped
    if stopped is None and not failed and ctl is not None and ctl.at is not None:
        stopped = "deadline" if now >= ctl.at else None
    return f"not_loaded_{stopped}" if stopped else "not_loaded_error"
