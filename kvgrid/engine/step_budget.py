"""The step budget (mixed into ``Scheduler``): whether a step prefills only (an admission
burst) and how many prompt tokens a step that also decodes carries, from measured step
times: within ``mixed_step_slowdown`` times a decode step, widened to compute the waiting
prompts within ``prompt_drain_s`` (docs/design/engine.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvgrid.stats import Ewma

if TYPE_CHECKING:
    from kvgrid.engine.scheduler import SchedulerOutput
    from kvgrid.engine.sequence import Sequence

# an admission burst prefills at most this many steps in a row before decodes get a turn
MAX_BURST_STEPS = 128
# the least prompt tokens a mixed step carries, however fast decode steps are
MIN_MIXED_PREFILL_TOKENS = 256
# the share of GPU time that the waiting prompts would need, within prompt_drain_s, from
# which mixed steps carry the whole step budget (the formula's budget grows without bound
# towards a share of 1)
DRAIN_FULL_BUSY = 0.9
# share of each admission in the estimate of how much of a prompt is found cached (G1 or
# the store), which the drain window takes off the queued prompts
CACHED_SHARE_WEIGHT = 0.2
# share of each decode-only step in the decode step time: the budget of mixed steps follows
# a change of batch within a few steps, and a load report (hundreds of steps apart) sees
# the settled value
DECODE_STEP_WEIGHT = 0.2


def is_prefilling(seq: Sequence) -> bool:
    return seq.num_tokens - seq.num_computed_tokens > 1


class StepBudget:
    """Step budget of ``Scheduler`` (its ``config``, ``waiting``, ``active()`` and
    ``_compute_limit``)."""

    def _init_step_budget(self) -> None:
        # consecutive prefill-only steps of an admission burst, and measured step times
        # (seconds) fed by the engine through observe_step: the one estimate of a decode
        # step's time (also what the worker reports to routers and the planner) and a
        # prompt token's marginal cost
        self._burst_steps = 0
        self.decode_step = Ewma(DECODE_STEP_WEIGHT)
        self.prefill_token = Ewma(0.2)
        # admitted prompt tokens and, of them, those found cached (per admission, smoothed)
        self._admitted_tokens = Ewma(CACHED_SHARE_WEIGHT)
        self._admitted_cached = Ewma(CACHED_SHARE_WEIGHT)

    def _note_cached(self, prompt_tokens: int, cached_tokens: int) -> None:
        """An admission: of its ``prompt_tokens``, ``cached_tokens`` are G1 hits or loaded
        from the store (``cached_share``)."""
        self._admitted_tokens.update(prompt_tokens)
        self._admitted_cached.update(min(cached_tokens, prompt_tokens))

    def _prefill_first(self, active: list[Sequence]) -> bool:
        """Whether this step prefills only: prompts are pending and no running request has
        started decoding yet (each has at most its first token), as after a burst of
        arrivals. Bounded, so arrivals that never stop cannot starve the decodes."""
        if not self.config.prefill_first_burst or self._burst_steps >= MAX_BURST_STEPS:
            return False
        if not (self.waiting or any(is_prefilling(s) for s in active)):
            return False
        return all(s.num_output_tokens <= 1 for s in active if not is_prefilling(s))

    def _mixed_prefill_budget(self) -> int:
        """Prompt tokens a step that also decodes may carry: as many as keep it within
        ``mixed_step_slowdown`` times a decode step, from measured step times (the whole
        step budget until both have been measured)."""
        cap = self.config.max_num_batched_tokens
        slow = self.config.mixed_step_slowdown
        decode_s, token_s = self.decode_step.value, self.prefill_token.value
        if not slow or decode_s is None or token_s is None:
            return cap
        tokens = round((slow - 1.0) * decode_s / max(token_s, 1e-9))
        if self.config.prompt_drain_s > 0:
            tokens = max(tokens, self._drain_tokens(cap, decode_s, token_s))
        return max(min(tokens, cap), min(cap, MIN_MIXED_PREFILL_TOKENS))

    def queued_prompt_tokens(self) -> int:
        """Prompt tokens of the requests not yet admitted (all of each prompt: what G1 or
        the store holds of it is known only at admission)."""
        return sum(s.num_tokens - s.num_computed_tokens for s in self.waiting)

    def cached_share(self) -> float:
        """The share of admitted prompt tokens found cached (G1 hits and store loads), over
        recent admissions weighted by their length: what a queued prompt is expected not
        to compute (its own hits are known only at its admission)."""
        tokens, cached = self._admitted_tokens.value, self._admitted_cached.value
        return cached / tokens if tokens and cached is not None else 0.0

    def _drain_tokens(self, cap: int, decode_s: float, token_s: float) -> int:
        """Prompt tokens a mixed step carries to compute the prompts waiting (queued, or
        admitted and not yet prefilled) within ``prompt_drain_s``. A step of n prompt
        tokens takes decode_s + n * token_s, so a rate of R tokens a second needs
        n = R * decode_s / (1 - R * token_s); once R * token_s nears 1 the prompts alone
        would keep the GPU busy, and the whole budget goes to them. A queued request counts
        its prompt less the share recent admissions found cached: under reuse (a
        conversation's next turn) most of a queued prompt is loaded, not computed, and
        counting it whole would widen every mixed step for work that never comes."""
        pending = round(self.queued_prompt_tokens() * (1.0 - self.cached_share()))
        pending += sum(
            self._compute_limit(s) - s.num_computed_tokens
            for s in self.active()
            if is_prefilling(s)
        )
        rate = pending / self.config.prompt_drain_s
        busy = rate * token_s
        if busy >= DRAIN_FULL_BUSY:
            return cap
        return round(rate * decode_s / (1.0 - busy))

    def observe_step(self, sched: SchedulerOutput, seconds: float, steer: bool = True) -> None:
        """Feed one step's measured time: decode-step time, and (``steer``: where step times
        are steady enough to size mixed steps by, GPU engines) the marginal cost of one
        prompt token in steps that prefill."""
        prefill = sched.num_prompt_tokens
        if prefill == 0:
            self.decode_step.update(seconds)
            return
        if not steer or prefill < MIN_MIXED_PREFILL_TOKENS // 2:
            return  # too few tokens for a clean slope
        decoding = len(sched.scheduled) > sum(1 for s in sched.scheduled if s.num_tokens > 1)
        base = self.decode_step.value if decoding and self.decode_step.value is not None else 0.0
        self.prefill_token.update(max(seconds - base, 0.0) / prefill)
