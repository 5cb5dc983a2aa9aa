"""Step budget of the scheduler: burst prefill before decoding, measured mixed-step budget."""

from __future__ import annotations

import pytest

from kvgrid.engine.block_manager import BlockManager
from kvgrid.engine.config import EngineConfig
from kvgrid.engine.sampling_params import SamplingParams
from kvgrid.engine.scheduler import Scheduler
from kvgrid.engine.sequence import Sequence, SequenceStatus
from kvgrid.engine.step_budget import MIN_MIXED_PREFILL_TOKENS

BS = 16


def make(budget: int = 64, blocks: int = 256, **kw) -> Scheduler:
    cfg = EngineConfig(block_size=BS, max_num_batched_tokens=budget, **kw)
    return Scheduler(cfg, BlockManager(blocks, BS, True))


def add(sched: Scheduler, n_prompt: int, name: str, max_tokens: int = 50) -> Sequence:
    # distinct first tokens: no prefix sharing between the prompts
    prompt = [hash(name) % 1000 + 1] + list(range(n_prompt - 1))
    seq = Sequence(name, prompt, SamplingParams(max_tokens=max_tokens), b"s" * 16, BS, max_tokens)
    sched.add(seq)
    return seq


def step(sched: Scheduler) -> list[tuple[str, int]]:
    """One scheduler step, then what the engine does to the sequences afterwards."""
    out = sched.schedule()
    for item in out.scheduled:
        seq = item.seq
        seq.num_computed_tokens += item.num_tokens
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(7)
    return [(i.seq.request_id, i.num_tokens) for i in out.scheduled]


def test_a_burst_is_prefilled_before_anyone_decodes():
    sched = make(budget=64)
    for i in range(3):
        add(sched, 100, f"r{i}")
    steps = []
    while any(len(s.output_token_ids) == 0 for s in sched.running) or sched.waiting:
        steps.append(step(sched))
    # 300 prompt tokens at 64 per step; no step carried a decode (1-token) entry
    assert len(steps) == 5
    assert all(n > 1 for s in steps for _, n in s)
    # then every request decodes, all in one step
    assert sorted(step(sched)) == [("r0", 1), ("r1", 1), ("r2", 1)]
    # a late arrival while decoding is under way joins as a mixed step, decodes first
    add(sched, 40, "late")
    mixed = step(sched)
    assert mixed[:3] == [("r0", 1), ("r1", 1), ("r2", 1)] and mixed[3] == ("late", 40)


def test_burst_mode_can_be_switched_off():
    sched = make(budget=64, prefill_first_burst=False)
    for i in range(3):
        add(sched, 100, f"r{i}")
    seen_mixed = False
    for _ in range(8):
        s = step(sched)
        seen_mixed |= any(n == 1 for _, n in s) and any(n > 1 for _, n in s)
    assert seen_mixed


def test_burst_falls_back_to_decoding_when_nothing_can_be_prefilled():
    # room for the first request's blocks only: the second waits, the first must decode
    sched = make(budget=256, blocks=8)
    add(sched, 100, "a")
    add(sched, 100, "b")
    assert step(sched) == [("a", 100)]
    assert step(sched) == [("a", 1)]


def test_mixed_steps_carry_a_measured_prompt_budget():
    sched = make(budget=2048)
    add(sched, 20, "d")
    step(sched)
    step(sched)  # "d" is decoding now
    add(sched, 3000, "long")
    # nothing measured yet: the whole step budget
    assert step(sched) == [("d", 1), ("long", 2047)]
    # decode step 20 ms, 20 µs per prompt token: 1.4x a decode step leaves 400 tokens
    sched.decode_step.value, sched.prefill_token.value = 0.020, 20e-6
    assert step(sched) == [("d", 1), ("long", 400)]
    # never below the floor, however fast decode steps are
    sched.decode_step.value = 1e-4
    assert step(sched) == [("d", 1), ("long", MIN_MIXED_PREFILL_TOKENS)]


def test_queued_prompts_widen_mixed_steps_to_drain_within_their_window():
    """Once requests decode, the slowdown share alone lets a queue of long prompts grow
    without bound (a few hundred prompt tokens a step); the mixed budget widens to compute
    what waits within prompt_drain_s, and takes the whole step once the prompts alone would
    fill the GPU."""

    def queue(drain_s: float) -> Scheduler:
        sched = make(budget=8192, blocks=8000, prompt_drain_s=drain_s)
        add(sched, 20, "d")
        step(sched)
        step(sched)  # "d" is decoding now
        sched.decode_step.value, sched.prefill_token.value = 0.020, 20e-6
        add(sched, 3000, "long")
        # 3,000 tokens to drain in 1 s need 64 a step: the slowdown share (400) is more
        assert step(sched) == [("d", 1), ("long", 400)]
        for i in range(4):
            add(sched, 5000, f"q{i}")
        return sched

    sched = queue(1.0)
    # 2,600 + 20,000 tokens in 1 s: 22,600 x 20 ms / (1 - 22,600 x 20 us) = 825 a step
    assert step(sched) == [("d", 1), ("long", 825)]
    for i in range(2):
        add(sched, 20000, f"big{i}")
    # 61,775 tokens would need more than the GPU for 1 s: the whole step budget
    assert step(sched) == [("d", 1), ("long", 1775), ("q0", 5000), ("q1", 1416)]
    # without a drain window: the slowdown share whatever waits
    sched = queue(0.0)
    assert step(sched) == [("d", 1), ("long", 400)]


def test_the_drain_window_counts_queued_prompts_less_what_admissions_find_cached():
    """Under reuse most of a queued prompt is a history G1 or the store holds: the drain
    window counts the queued prompts less the share recent admissions found cached, so a
    queue of next turns does not widen mixed steps as if each were computed whole."""

    def queue(shared: bool) -> Scheduler:
        sched = make(budget=8192, blocks=8000, prompt_drain_s=1.0)
        add(sched, 20, "d")
        step(sched)
        step(sched)  # "d" is decoding now
        sched.decode_step.value, sched.prefill_token.value = 0.020, 20e-6
        history = list(range(1, 4801))  # 300 blocks
        for i in range(6):
            # one conversation's turns: the first computes the history, the others find
            # it in G1 (without sharing: each its own history)
            tail = [5000 + 200 * i + j for j in range(200)]
            prompt = (history if shared else [9000 + i] + history[1:]) + tail
            seq = Sequence(f"t{i}", prompt, SamplingParams(max_tokens=50), b"s" * 16, BS, 50)
            sched.add(seq)
            running = SequenceStatus.RUNNING
            while seq.num_computed_tokens < seq.num_tokens - 1 or seq.status != running:
                step(sched)
                done = seq.num_computed_tokens // BS
                sched.bm.commit_full_blocks(seq, seq.block_keys(min(done, len(prompt) // BS)))
        for i in range(4):
            tail = [7000 + 200 * i + j for j in range(200)]
            prompt = (history if shared else [9100 + i] + history[1:]) + tail
            sched.add(Sequence(f"q{i}", prompt, SamplingParams(max_tokens=50), b"s" * 16, BS, 50))
        return sched

    def prompts(out: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return [(name, n) for name, n in out if n > 1]

    sched = queue(shared=True)
    # 5 of 7 admissions found 4,800 of 5,000 tokens cached ("d" and the first turn
    # nothing): a smoothed share of 0.87, so 20,000 queued tokens count 2,530; draining
    # them in 1 s needs 53 tokens a step, under the slowdown share (400)
    assert sched.cached_share() == pytest.approx(0.8735, abs=0.001)
    assert prompts(step(sched)) == [("q0", 200), ("q1", 200)]
    # without reuse the queued prompts count whole: 20,000 x 20 ms / (1 - 0.4) = 667 a step
    sched = queue(shared=False)
    assert sched.cached_share() == 0.0
    assert prompts(step(sched)) == [("q0", 667)]


def test_observe_step_measures_decode_and_marginal_prefill_cost():
    sched = make(budget=2048)
    a = add(sched, 20, "a")
    step(sched)
    out = sched.schedule()  # a decode step
    sched.observe_step(out, 0.010)
    assert sched.decode_step.value == 0.010
    a.num_computed_tokens += 1
    a.append_token(7)
    add(sched, 1000, "b")
    out = sched.schedule()  # decode + 1000 prompt tokens
    assert out.num_batched_tokens == 1001
    sched.observe_step(out, 0.030)
    assert abs(sched.prefill_token.value - 20e-6) < 1e-12  # (30 ms - 10 ms) / 1000


def test_a_free_slot_goes_to_the_parked_request_whose_prefix_has_landed():
    """Parked requests load their stored prefixes while the batch is full; a slot that frees
    goes to one whose load is done, not to an older one still loading (it would hold the
    slot with nothing to compute)."""
    from concurrent.futures import Future

    sched = make(max_num_seqs=2)
    a, loading, landed = (add(sched, 8, n) for n in ("a", "loading", "landed"))
    sched.waiting.clear()
    loading.load_future, landed.load_future = Future(), Future()
    landed.load_future.set_result(None)
    loading.parked = landed.parked = True
    sched.running[:] = [a, loading, landed]
    sched._seat_parked()
    assert sched.active() == [a, landed]
    landed.parked = False  # seated (what _unpark does)
    sched._seat_parked()  # every slot taken: the order stays
    assert sched.running == [a, landed, loading]
