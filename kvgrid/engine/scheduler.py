"""Scheduler: continuous batching under a token budget, with chunked prefill and preemption.

Each step spends at most `max_num_batched_tokens` new tokens. Running requests come first,
decodes before prefill chunks, so inter-token latency stays steady while long prompts are
cut into chunks; waiting requests are then admitted first-come first-served while free
blocks allow. When a running request needs a block and none is free, the most recently
admitted request is preempted: its blocks are released (full ones stay in the prefix cache)
and it is recomputed later, usually from those cached blocks.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvgrid.engine.block_manager import BlockManager
from kvgrid.engine.config import EngineConfig
from kvgrid.engine.hand_down import HandDown
from kvgrid.engine.kv_loader import KVLoader
from kvgrid.engine.sequence import Sequence, SequenceStatus
from kvgrid.engine.step_budget import MIN_MIXED_PREFILL_TOKENS, StepBudget, is_prefilling
from kvgrid.stats import Ewma
from kvgrid.store.load_plan import SPLIT_OVERHEAD_S, LoadDeadline, short_load_reason
from kvgrid.store.prefetch import Queued

if TYPE_CHECKING:
    from kvgrid.store.connector import StoreConnector

log = logging.getLogger(__name__)


# a prompt whose rest after this step's chunk would be at most this many tokens is finished
# in this step instead: a step of its own for a short tail costs a whole decode step, where
# the tail adds a fraction of one to this step
PROMPT_TAIL_TOKENS = MIN_MIXED_PREFILL_TOKENS // 2
# Once a load's recomputed part (if any) has run, the load is waited for at most this
# share of the time that recomputing its blocks not landed yet would take, plus the fixed
# cost of the step that would recompute them (a cut a few blocks before the end cannot pay
# for it); then those are recomputed.
LATE_LOAD_WAIT = 0.5
# Before the engine has measured its prefill speed, a load still has a deadline: this many
# times its predicted time, and at least UNMEASURED_LOAD_MIN_S (a stuck tier read must
# never hold a request for good).
UNMEASURED_LOAD_FACTOR = 4.0
UNMEASURED_LOAD_MIN_S = 1.0


def _chunk(left: int, budget: int, prefill_budget: int) -> int:
    """Prompt tokens to compute of ``left`` under the step's ``budget`` and its share for
    prompts, ``prefill_budget``; a tail of up to PROMPT_TAIL_TOKENS joins the chunk."""
    n = min(left, budget, prefill_budget)
    if 0 < n < left <= min(n + PROMPT_TAIL_TOKENS, budget):
        return left
    return n


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed for it this step


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of the step's prompt chunks (a decode row computes one token)."""
        return sum(s.num_tokens for s in self.scheduled if s.num_tokens > 1)

    @property
    def empty(self) -> bool:
        return not self.scheduled

    def written_blocks(self, block_size: int) -> Iterator[int]:
        """The G1 blocks this step's forward writes (its new tokens' KV), before it runs;
        lazily (most steps have no write-back to order after)."""
        for item in self.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_tokens - 1
            yield from seq.block_table[start // block_size : end // block_size + 1]


class Scheduler(HandDown, StepBudget):
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        connector: StoreConnector | None = None,
    ):
        self.config = config
        self.bm = block_manager
        self.connector = connector
        self.loader: KVLoader | None = None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_room_waits = 0  # steps whose next admission waited for free G1 blocks
        self.store_loaded_tokens = 0
        # the waiting queue as last published to the store (_publish_queue)
        self._published_at = 0.0
        self._published_head: tuple[int, int] | None = None  # None: published empty
        # the head of the queue as last refused a parking place for want of G1 room
        # (_park_refused): seq, its G1 hits, room left over the running, step tokens, when
        self._refused: tuple[Sequence, int, int, int, float] | None = None
        self._last_admit: float | None = None
        self._admit_gap = Ewma(0.2)
        self._init_step_budget()
        self._ahead: dict[int, bytes] = {}  # block id -> the name it was cleaned ahead under

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.drop_pending()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # decodes first, then unfinished prefills, in admission order
        self._seat_parked()
        active = self.active()
        self._unpark(active)
        order = sorted(active, key=is_prefilling)
        burst = self._prefill_first(active)
        if burst:
            # an admission burst: its prompts go in before anyone decodes, so no decode
            # step carries prefill chunks (each such step costs several decode steps)
            order = [s for s in order if is_prefilling(s)]
            prefill_budget = budget
        else:
            prefill_budget = self._mixed_prefill_budget()
        # a prefix still landing in G1 holds its step's forward, layer by layer, until it
        # has landed: it waits out of a step that decodes (every decode row would wait),
        # and joins one that only prefills (they all wait for their first token anyway,
        # and one step for all of them costs less than a step for each as it lands)
        hold = any(not is_prefilling(s) for s in order)
        budget, prefill_budget = self._schedule_running(
            order, out, budget, prefill_budget, hold_landing=hold
        )
        if not out.preempted:
            self._admit(out, budget, prefill_budget)
        if burst and not out.scheduled and not out.preempted:
            # nothing could be prefilled (no blocks, or a full batch): decode after all
            decodes = [s for s in active if not is_prefilling(s)]
            self._schedule_running(decodes, out, budget, 0)
        self._burst_steps = self._burst_steps + 1 if burst else 0
        self._flush_evictions()
        self._clean_ahead(out)
        return out

    def _schedule_running(
        self,
        order: list[Sequence],
        out: SchedulerOutput,
        budget: int,
        prefill_budget: int,
        hold_landing: bool = True,
    ) -> tuple[int, int]:
        for seq in order:
            if seq.status != SequenceStatus.RUNNING or budget == 0:
                continue
            if seq.num_pending and seq.num_output_tokens >= seq.max_tokens:
                continue  # its token still in flight is its last (asynchronous scheduling)
            if seq.load_future is not None:
                self._try_finish_load(seq)
            if hold_landing and seq.kv_landing is not None and not seq.kv_landing.landed():
                continue  # its prefix is still crossing to G1; it joins once landed
            prefilling = is_prefilling(seq)
            left = self._compute_limit(seq) - seq.num_computed_tokens
            n = _chunk(left, budget, prefill_budget) if prefilling else min(left, budget)
            if n <= 0:
                continue  # waiting for its blocks to arrive from the store, or no budget
            while not self.bm.ensure_slots(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                if prefilling:
                    prefill_budget -= n
        return budget, prefill_budget

    def active(self) -> list[Sequence]:
        """The running requests a step may compute: the first ``max_num_seqs`` admitted. The
        others are parked: admitted early to land their stored prefixes in G1 while the
        batch is full (``_admit``), they compute once a slot frees."""
        return self.running[: self.config.max_num_seqs]

    @staticmethod
    def _compute_limit(seq: Sequence) -> int:
        """Tokens that may be computed now: up to a pending load's first block, else all."""
        if seq.load_future is not None:
            return seq.load_start_block * seq.block_size
        return seq.num_tokens

    def _admit(self, out: SchedulerOutput, budget: int, prefill_budget: int) -> None:
        bs = self.bm.block_size
        slots = self.config.max_num_seqs
        most = slots + (self.config.max_parked_seqs if self.loader is not None else 0)
        while self.waiting and min(budget, prefill_budget) > 0 and len(self.running) < most:
            parking = len(self.running) >= slots
            seq = self.waiting[0]
            # the last token is always computed: its logits choose the next token; a request
            # for prompt logprobs computes its whole prompt (cached blocks have no logits)
            hit_keys = (
                []
                if seq.prompt_logprobs is not None
                else seq.block_keys((seq.num_tokens - 1) // bs)
            )
            g1_hits = self.bm.match_prefix(hit_keys)
            g = len(g1_hits)
            room = self.bm.num_free_blocks - self.bm.num_revived(g1_hits)
            step_tokens = min(budget, prefill_budget)
            if parking and self._park_refused(seq, g, room, step_tokens):
                break
            n_store = 0
            if self.loader is not None and self.bm.enable_prefix_caching:
                if self.bm.pending_evictions:
                    # blocks the admissions before it evicted go down first: this one may
                    # want them (a conversation's history, evicted by its neighbour)
                    self._flush_evictions()
                busy = len(self.running) + len(self.waiting) > 1  # others want the GPU
                # parked, it waits for a slot anyway: a load that lands meanwhile is free
                slack = self._slot_wait_s() if parking else 0.0
                n_store = self.connector.lookup(hit_keys, seq.tenant, g, busy, slack)
            n = _chunk(seq.num_tokens - (g + n_store) * bs, budget, prefill_budget)
            new_blocks = self.bm.blocks_needed((g + n_store) * bs + n) - g
            if parking and not self._may_park(seq, n_store, new_blocks, room):
                if n_store and new_blocks + len(self.running) > room:
                    over = room - len(self.running)
                    self._refused = (seq, g, over, step_tokens, time.monotonic())
                break
            if new_blocks > room:
                # head-of-line: admit in arrival order only. A stored prefix waits for G1
                # room like a recomputed one (a load is never given up for want of room)
                self.num_room_waits += 1
                break
            self.waiting.popleft()
            self._note_admission()
            if self.connector is not None:
                # once per admission, not per lookup: a request blocked at the head of the
                # queue is looked up every step
                self.connector.note_admitted(hit_keys)
                if self.loader is not None and self.bm.enable_prefix_caching:
                    self.connector.account_admission(seq.tenant, n_store)
            seq.stored_from, seq.stored_to = g, g + n_store
            if g + n_store:
                seq.prospect = 1.0
            self.bm.take_cached(seq, g1_hits)
            fresh = self.bm.allocate(seq, new_blocks)
            seq.num_computed_tokens = g * bs
            seq.parked = parking
            if n_store:
                self._start_load(seq, hit_keys, g, n_store, fresh)
            elif seq.num_cached_tokens is None:
                seq.num_cached_tokens = min(g * bs, seq.num_prompt_tokens)
            self._note_cached(seq.num_tokens, (g + (seq.load_count if n_store else 0)) * bs)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = _chunk(self._compute_limit(seq) - seq.num_computed_tokens, budget, prefill_budget)
            if n > 0 and not parking:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                prefill_budget -= n
        if self.loader is not None:
            self._publish_queue()

    def _slot_wait_s(self) -> float:
        """How soon a slot is expected to free: the running request closest to its token
        limit, at the measured decode step time (0 when unknown; a request may also stop
        earlier, on its end-of-sequence token)."""
        step = self.decode_step.value
        left = [s.max_tokens - s.num_output_tokens for s in self.active() if not is_prefilling(s)]
        return step * min(left) if step and left else 0.0

    def _seat_parked(self) -> None:
        """A free slot goes to the parked request whose stored prefix has landed first, not
        to an older one still loading: that one would hold the slot with nothing to compute
        while the others decode (and it keeps loading, parked)."""
        slots = self.config.max_num_seqs
        if len(self.running) <= slots or not self.running[slots - 1].parked:
            return
        seated = [s for s in self.running if not s.parked]
        parked = [s for s in self.running if s.parked]
        parked.sort(key=lambda s: s.load_future is not None and not s.load_future.done())
        self.running[:] = seated + parked

    def _unpark(self, active: list[Sequence]) -> None:
        """Requests that got a slot: a load still in flight is bounded from now, as an
        admitted request's is from its admission."""
        for seq in active:
            if seq.parked:
                seq.parked = False
                if seq.load_future is not None and seq.num_computed_tokens >= (
                    seq.load_start_block * self.bm.block_size
                ):
                    self.bound_late_load(seq, time.monotonic())

    def _park_refused(self, seq: Sequence, g: int, room: int, step_tokens: int) -> bool:
        """Whether ``seq`` was refused a parking place for want of G1 room within the last
        ``_PARK_RECHECK_S``, and nothing since could make room for it: the same G1 hits, no
        more room over the running requests, no fewer tokens to the step. Its store lookup
        (a pass over its keys) is then skipped: at the head of the queue while every slot
        is taken, it would be looked up every step. A stored prefix found since can only
        need more room; one lost since is found within the recheck."""
        r = self._refused
        if r is None or r[0] is not seq:
            return False
        _, g0, over, tokens, at = r
        return (
            g == g0
            and room - len(self.running) <= over
            and step_tokens >= tokens
            and time.monotonic() - at < self._PARK_RECHECK_S
        )

    def _may_park(self, seq: Sequence, n_store: int, new_blocks: int, room: int) -> bool:
        """Whether ``seq`` is admitted while every slot is taken, to land its stored prefix
        in G1 before a slot frees (its first step then computes only its new tokens,
        where admitted at that moment it would wait for the whole load): only a prefix the
        store loads whole (a split recomputes part, and needs a slot for it), and only into
        room the running requests do not need next (a block of growth each)."""
        if not n_store or self.connector.load_plan(seq.tenant, n_store).compute_blocks:
            return False
        return new_blocks + len(self.running) <= room

    # ---- loads from the context store -----------------------------------------------------

    _QUEUE_SCAN = 16  # queued requests published per step (the queue can be long)
    # at most this often while the queue keeps its head and length: the store plans on its
    # own thread, and the queue's estimates move slowly (a change is published at once)
    _PUBLISH_S = 0.05
    _PARK_RECHECK_S = 0.1  # a head refused parking for want of room is looked up again

    def _note_admission(self) -> None:
        """Time between admissions while requests wait (EWMA): how soon the n-th queued
        request is likely to start, whatever holds the queue (prefill work or full slots)."""
        now = time.monotonic()
        if self._last_admit is not None and self.waiting:
            self._admit_gap.update(now - self._last_admit)
        self._last_admit = now

    def _publish_queue(self) -> None:
        """Tell the store which stored prefixes the waiting requests will want and when the
        GPU would start computing each (``kvgrid.store.prefetch``): it brings up from G3/G4
        into G2 what can arrive before then, and keeps it there until admission. Whenever
        the queue is re-evaluated, so a request whose blocks left G1 while it waited is
        planned again."""
        if not self.bm.enable_prefix_caching:
            return
        now = time.monotonic()
        head = (id(self.waiting[0]), len(self.waiting)) if self.waiting else None
        if head == self._published_head and (
            head is None or now - self._published_at < self._PUBLISH_S
        ):
            return
        self._published_at, self._published_head = now, head
        bs = self.bm.block_size
        speed = self.connector.prefill_tokens_per_s
        ahead = sum(s.num_tokens - s.num_computed_tokens - 1 for s in self.running)
        queue = []
        for i, seq in enumerate(self.waiting):
            if i >= self._QUEUE_SCAN:
                break
            keys = seq.block_keys((seq.num_tokens - 1) // bs)
            g = len(self.bm.match_prefix(keys))
            start = now + (ahead / speed if speed else 0.0)
            if self._admit_gap.value is not None:
                start = max(start, now + i * self._admit_gap.value)
            queue.append(Queued(seq.tenant, tuple(keys[g:]), start))
            ahead += seq.num_tokens - g * bs
        self.connector.plan_queue(queue, bs / speed if speed else None)

    def wait_for_loads(self, timeout_s: float) -> bool:
        """Block until a running request's store load lands (at most ``timeout_s``); False if
        none is in flight. For steps with nothing to compute: a caller spinning on step()
        would hold the GIL that the loader threads need between their copies."""
        futs = [s.load_future for s in self.running if s.load_future is not None]
        if not futs:
            return False
        wait_futures(futs, timeout=timeout_s, return_when=FIRST_COMPLETED)
        return True

    def _start_load(self, seq: Sequence, hit_keys, g: int, n_store: int, fresh: list[int]):
        plan = self.connector.load_plan(seq.tenant, n_store)  # what lookup() chose
        self._flush_evictions()  # the store reads evicted blocks before the load overwrites them
        first = g + plan.compute_blocks
        seq.load_start_block, seq.load_count = first, plan.load_blocks
        # A stalled or misjudged tier (a hung network mount, say): once the load has taken
        # twice its prediction, and longer than recomputing its blocks would have, whatever
        # has not landed is recomputed instead (with the prefill speed not measured yet, a
        # few times its prediction). The engine brings it forward once the recomputed part
        # has run (bound_late_load).
        seq.load_deadline = LoadDeadline()
        speed = self.connector.prefill_tokens_per_s
        now = time.monotonic()
        if plan.load_s is not None and speed:
            recompute_s = plan.load_blocks * self.bm.block_size / speed
            seq.load_deadline.at = now + max(2 * plan.load_s, recompute_s) + 0.5
        else:
            wait = UNMEASURED_LOAD_FACTOR * (plan.expected_s or 0.0)
            seq.load_deadline.at = now + max(wait, UNMEASURED_LOAD_MIN_S)
        # (a parked request's plan counts its slot wait off: its load takes load_s from now)
        expected = plan.load_s if seq.parked and plan.load_s is not None else plan.expected_s
        seq.load_expected_end = now + max(expected or 0.0, 0.0)
        seq.load_future = self.loader.submit(
            hit_keys[first : g + n_store],
            seq.tenant,
            fresh[plan.compute_blocks : n_store],
            seq.load_deadline,
            split=plan.compute_blocks > 0,
        )
        if not plan.compute_blocks and not seq.parked:  # nothing to compute beside it
            self.bound_late_load(seq, now)  # bounded from now (parked: once it has a slot)
        seq.num_cached_tokens_g1 = g * self.bm.block_size

    def _try_finish_load(self, seq: Sequence) -> None:
        # the recomputed part must be done, and the loaded part landed
        if seq.num_computed_tokens < self._compute_limit(seq) or not seq.load_future.done():
            return
        failed = False
        try:
            res = seq.load_future.result()
            loaded, seq.kv_landing = res.blocks, res.landing
        except Exception:
            log.exception("loading %d blocks from the store failed", seq.load_count)
            loaded, failed = 0, True
        seq.load_future = None
        if loaded < seq.load_count:
            reason = short_load_reason(seq.load_deadline, failed, time.monotonic())
            self.connector.store.ledger.count(reason, seq.load_count - loaded)
        if seq.status != SequenceStatus.RUNNING:
            return
        bs = self.bm.block_size
        seq.num_computed_tokens = (seq.load_start_block + loaded) * bs
        if seq.kv_landing is None:
            # still landing: named (shareable) only after the forward that waits for them,
            # when the engine commits the step's full blocks
            self.bm.commit_full_blocks(seq, seq.block_keys(seq.load_start_block + loaded))
        self.store_loaded_tokens += loaded * bs
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = min(
                seq.num_cached_tokens_g1 + loaded * bs, seq.num_prompt_tokens
            )

    def bound_late_load(self, seq: Sequence, done_at: float) -> None:
        """The part recomputed beside ``seq``'s load has run on the device (at ``done_at``,
        time.monotonic(); the engine calls this when it completes that step). Past the
        load's predicted end, the load may take at most ``LATE_LOAD_WAIT`` of the time
        recomputing what it has not landed would, plus one step's fixed cost: a load behind
        its plan (a slower disk, a busy host) then costs at most that much more than
        recomputing its late blocks, never an open-ended wait. The load stops at the first
        block not landed by then; a deadline already earlier stays."""
        ctl, speed = seq.load_deadline, self.connector.prefill_tokens_per_s
        if ctl is None or not speed:
            return
        left = (seq.load_count - ctl.landed) * self.bm.block_size / speed
        at = max(done_at, seq.load_expected_end) + LATE_LOAD_WAIT * left + SPLIT_OVERHEAD_S
        ctl.at = at if ctl.at is None else min(ctl.at, at)

    def _release(self, seq: Sequence) -> None:
        fut = seq.load_future
        if fut is not None:
            # a load still writing into these blocks must land before they are handed out;
            # it stops at the next block it would wait for, so this wait is a copy's length
            if seq.load_deadline is not None:
                seq.load_deadline.at = time.monotonic()
            if not fut.cancel() and fut.exception() is None:
                seq.kv_landing = seq.kv_landing or fut.result().landing
            seq.load_future = None
        if seq.kv_landing is not None:
            # device work after this (whoever gets the blocks next) waits for the copies
            seq.kv_landing.wait_all()
            seq.kv_landing = None
        self.bm.free_seq(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._keep_below(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]
