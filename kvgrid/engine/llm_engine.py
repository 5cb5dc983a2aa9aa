"""LLMEngine: requests in, tokens out, one scheduler step at a time (not thread-safe)."""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING

import torch

from kvgrid import keys
from kvgrid.engine import choices
from kvgrid.engine.block_manager import BlockManager
from kvgrid.engine.config import EngineConfig
from kvgrid.engine.kv_loader import KVLoader
from kvgrid.engine.model_runner import ModelRunner
from kvgrid.engine.outputs import RequestOutput
from kvgrid.engine.request_checks import RequestChecker
from kvgrid.engine.sampler import sample_on_device, sampler_output
from kvgrid.engine.sampling_params import RequestError, SamplingParams
from kvgrid.engine.scheduler import Scheduler, SchedulerOutput
from kvgrid.engine.sequence import Sequence, SequenceStatus
from kvgrid.engine.stops import check_stops
from kvgrid.events import KVEvent
from kvgrid.models.loader import load_tokenizer, resolve_model
from kvgrid.stats import ewma

if TYPE_CHECKING:
    from kvgrid.engine.guided import MaskJob
    from kvgrid.store.connector import StoreConnector

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Step:
    """A launched step whose tokens the host has not read yet."""

    sched: SchedulerOutput
    sampled: list[Sequence]
    tokens: torch.Tensor | None  # [len(sampled)] on the device
    logprobs_all: torch.Tensor | None
    t0: float
    deferred: bool = False  # completed after the next step is launched
    host_tokens: torch.Tensor | None = None  # pinned copy of tokens, in flight
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # start, end on the GPU
    # hidden states of prompt positions whose next token a request scores (prompt logprobs)
    prompt_hidden: torch.Tensor | None = None
    prompt_targets: list | None = None
    # the next step's grammar masks, begun when this step's tokens were read (_complete)
    mask_job: MaskJob | None = None


# While the engine thread turns a step's tokens into outputs (Python work, the GIL held), a
# thread it hands work to (a step's grammar masks, a store load) starts only when CPython
# next switches threads: every 5 ms by default, as long as a decode step on an H200. And
# the other way round: every torch call lets the GIL go, and while the store's threads
# work, each call may wait a whole interval to take it back, dozens of times a step. Steps
# run asynchronously on a GPU, so the engine switches every 0.1 ms instead, process-wide
# (on an H200 with a disk tier, `kvgrid bench reuse` g3 runs 1.32x no store with 0.1 ms and
# 1.21x with 0.5 ms: docs/benchmarks.md).
GIL_SWITCH_INTERVAL_S = 0.0001


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        if config is None:
            config = EngineConfig(**overrides)
        elif overrides:
            raise TypeError("pass either an EngineConfig or keyword overrides, not both")
        self.config = config
        self.spec = resolve_model(config.model, config.load_format, config.seed)
        self.model_config = self.spec.config
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_model_len,
            self.model_config.max_model_len,
        )
        self.tokenizer = load_tokenizer(self.spec)
        self.runner = ModelRunner(config, self.spec, self.max_model_len)
        self.device = self.runner.device
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.block_manager)
        self.checker = RequestChecker(
            self.tokenizer,
            self.model_config.vocab_size,
            self.max_model_len,
            config.max_logprobs,
            self.block_manager,
        )
        self.scope = keys.KVScope(
            self.spec.fingerprint, str(self.runner.dtype).removeprefix("torch.")
        )
        self.eos_ids = frozenset(
            self.model_config.eos_token_ids
            or (self.tokenizer.eos_token_ids if self.tokenizer else ())
        )
        self.seqs: dict[str, Sequence] = {}  # request id -> its first choice
        self.guided = None  # kvgrid.engine.guided.GuidedDecoder, built at the first grammar
        self._guided_lock = threading.Lock()
        self._async = (
            config.async_scheduling
            if config.async_scheduling is not None
            else self.device.type == "cuda"
        )
        self._in_flight: _Step | None = None
        if self._async and sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._scope_digests: dict[bytes, bytes] = {}
        self.counters = {
            "prompt_tokens": 0,
            "generation_tokens": 0,
            "prefix_cache_queries": 0,  # prompt tokens looked up
            "prefix_cache_hits": 0,  # of those, served from cache
            "requests_finished": 0,
            "steps": 0,  # forward passes completed
            "computed_prompt_tokens": 0,  # prompt tokens the GPU computed (not loaded)
        }
        self.prefill_tokens_per_s: float | None = None  # EWMA, from steps that prefill
        if config.kv_store is not None:
            self.attach_store(self._build_store(config.kv_store))

    def _build_store(self, store_config) -> StoreConnector:
        from kvgrid.store import ContextStore, StoreConnector

        # the store's objects name the model and dtype they came from: a store directory
        # shared by two models never hands one the other's blocks
        if not store_config.model_fingerprint:
            store_config = dataclasses.replace(
                store_config, model_fingerprint=self.spec.fingerprint
            )
        store = ContextStore(store_config)
        return StoreConnector(store, self.runner.kv_cache, self.config.block_size)

    @property
    def connector(self) -> StoreConnector | None:
        return self.scheduler.connector

    def attach_store(self, connector: StoreConnector) -> None:
        """Put a context store below G1: evicted blocks are written back, misses look there."""
        self.scheduler.connector = connector
        self.scheduler.loader = KVLoader(connector, self.device)
        # each forward waits only for the write-backs of the blocks it overwrites
        connector.writers_fence()
        # write-through: blocks go to the store as soon as prefill names them
        bm = self.block_manager
        bm.record_commits = connector.resolve_write_through(bm.num_free_blocks)

    def detach_store(self) -> StoreConnector | None:
        """Take the context store away (G1 alone from now on) after handing it the blocks G1
        evicted so far; returns its connector, still open (the caller closes it)."""
        sched = self.scheduler
        conn = sched.connector
        if conn is None:
            return None
        sched._flush_evictions()
        if sched.loader is not None:
            sched.loader.close()
        sched.connector = sched.loader = None
        self.block_manager.record_commits = False
        return conn

    def warm_thread(self) -> None:
        """Warm what the device keeps per thread, on a thread that will step this engine
        before it serves (done anyway at its first step there, delaying that request)."""
        self.runner.warm_thread()

    def close(self) -> None:
        """Write G1's cached blocks to the context store, then stop its background I/O once
        the queued writes have landed: a restarted engine finds the context again."""
        if self._in_flight is not None:
            step, self._in_flight = self._in_flight, None
            self._complete(step)
        if self.connector is not None:
            self.scheduler.offload_cached()
            self.connector.store.flush()
            self.connector.close()

    # ---- requests ------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        tenant: bytes = keys.PUBLIC_TENANT,
        shared_prefix_tokens: int = 0,
        resume_output: list[int] | None = None,
        emitted_text_len: int | None = None,
    ) -> None:
        """Queue a request. ``shared_prefix_tokens``: leading prompt tokens of a prefix the
        server shares across tenants (kvgrid.server.tenants); their blocks are keyed in the
        public scope. ``resume_output``: tokens the request already generated on another
        engine (one that died mid-request); it continues after them exactly as if it had
        generated them here: ``max_tokens`` and ``min_tokens`` count from its start, stop
        strings see the whole text, a seeded generator is advanced past them (the same
        tokens as an uninterrupted run on the same kind of device), and outputs carry only
        what follows, the first ``emitted_text_len`` characters of text being delivered
        already (default: all the text of ``resume_output``)."""
        params = params or SamplingParams()
        if request_id in self.seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        text, prompt, max_tokens = self.check_request(prompt, params)
        room = self.max_model_len - len(prompt)
        resumed = self.checker.check_resume(resume_output, params, max_tokens, room)
        matcher = self.guided_matcher(params)
        for t in (tenant, keys.PUBLIC_TENANT):
            if t not in self._scope_digests:
                self._scope_digests[t] = self.scope.with_tenant(t).digest
        shared = min(max(0, int(shared_prefix_tokens)), len(prompt))
        group: list[Sequence] = []
        for _ in range(params.n):
            seq = Sequence(
                request_id,
                prompt,
                params,
                self._scope_digests[tenant],
                self.config.block_size,
                max_tokens,
                prompt=text,
                tenant=tenant,
                shared_tokens=shared,
                shared_digest=self._scope_digests[keys.PUBLIC_TENANT] if shared else None,
            )
            self._add_choice(group, seq, matcher)
        if resumed:
            self._resume(group[0], resumed, emitted_text_len)
        self._enqueue(group)

    def _add_choice(self, group: list[Sequence], seq: Sequence, matcher) -> None:
        """Give ``seq``, the next choice of its request, its seed, detokenizer and grammar."""
        i, params = len(group), seq.params
        seq.index, seq.group = i, group
        if i:
            seq.prompt_logprobs = None  # the first choice scores the prompt
        if params.seed is not None:
            seed = choices.choice_seed(params.seed, i)
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        if self.tokenizer is not None:
            from kvgrid.models.tokenizer import IncrementalDetokenizer

            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer, params.skip_special_tokens, prompt_ids=seq.prompt_token_ids
            )
        if matcher is not None:
            seq.matcher = matcher if i == 0 else matcher.deep_copy()
        seq.completion = choices.new_completion(seq)
        group.append(seq)

    def _enqueue(self, group: list[Sequence]) -> None:
        leader = group[0]
        self.seqs[leader.request_id] = leader
        self.scheduler.add(leader)
        # siblings wait until the first choice's prompt blocks are in the prefix cache, then
        # take them from there (only the last, partial block is computed again)
        if (
            self.block_manager.enable_prefix_caching
            and leader.num_prompt_tokens > self.config.block_size
        ):
            leader.held = group[1:]
        else:
            for seq in group[1:]:
                self.scheduler.add(seq)

    def check_request(
        self, prompt: str | list[int], params: SamplingParams
    ) -> tuple[str | None, list[int], int]:
        """Validate a request without adding it (thread-safe: reads configuration only):
        (prompt text or None, prompt token ids, max tokens). Raises RequestError. A grammar
        is checked by ``guided_matcher``, which compiles it."""
        return self.checker.check(prompt, params)

    def _resume(self, seq: Sequence, output: list[int], emitted_text_len: int | None) -> None:
        """Make ``seq`` look as it would after generating ``output`` itself."""
        for t in output:
            seq.append_token(t)
        seq.emitted_token_count = len(output)
        if seq.detokenizer is not None:
            seq.text = seq.detokenizer.push(output)
            n = len(seq.text) if emitted_text_len is None else int(emitted_text_len)
            seq.emitted_text_len = max(0, min(n, len(seq.text)))
        if seq.generator is not None and seq.params.temperature != 0:
            # the sampler draws one row of noise per sampled token (sampler.sample_on_device)
            noise = torch.empty(
                self.model_config.vocab_size, dtype=torch.float32, device=self.device
            )
            for _ in output:
                noise.exponential_(generator=seq.generator)
        if seq.matcher is not None:  # the grammar continues after what was generated
            for t in output:
                self.guided.accept(seq, t)

    def guided_matcher(self, params: SamplingParams):
        """A grammar matcher for ``params.guided`` (None without one); compiled grammars are
        cached, so calling this ahead of add_request (from any thread) moves the compile
        off the thread that steps."""
        if params.guided is None:
            return None
        with self._guided_lock:
            if self.guided is None:
                if self.tokenizer is None:
                    raise RequestError("guided decoding needs the model's tokenizer")
                from kvgrid.engine.guided import GuidedDecoder

                self.guided = GuidedDecoder(
                    self.tokenizer,
                    self.model_config.vocab_size,
                    self.eos_ids,
                    self.device,
                    self.config.max_num_seqs,
                    self.config.guided_mask_threads,
                )
        return self.guided.matcher(params.guided)

    def abort_request(self, request_id: str) -> bool:
        leader = self.seqs.pop(request_id, None)
        if leader is None:
            return False
        held = leader.held
        leader.held = []
        for seq in leader.group:
            if seq.is_finished:
                continue
            seq.finish_reason = "abort"
            if seq in held:
                seq.status = SequenceStatus.FINISHED
            else:
                self.scheduler.finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        if self.scheduler.has_unfinished():
            return True
        # a step still in flight whose requests have all been aborted owes nobody output:
        # the next step (or close) completes it
        step = self._in_flight
        return step is not None and any(not s.is_finished for s in step.sampled)

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step; return the outputs of the steps that finished.

        With asynchronous scheduling (CUDA), a step's sampled tokens stay on the device:
        the next step is scheduled and launched first (its inputs taken from the device),
        and only then are this step's tokens read back and checked for stops, so the host
        work of one step overlaps the GPU work of the next. A request that stops on a token
        was already scheduled one step further; that step's token for it is dropped.
        """
        prev, self._in_flight = self._in_flight, None
        sched = self.scheduler.schedule()
        loader = self.scheduler.loader
        if sched.empty:
            if loader is not None:
                loader.step_launched()
            if prev is not None:
                return self._complete(prev)
            # only store loads are pending: wait for one (briefly) rather than let the caller
            # spin, which would keep the loader threads from the GIL between their copies
            self.scheduler.wait_for_loads(0.002)
            return []
        step, early = self._launch(sched, prev)
        if loader is not None:  # loads planned with this step start now (kv_loader)
            loader.step_launched()
        if early is not None:
            outputs = early
        else:
            outputs = self._complete(prev) if prev is not None else []
        if step.deferred:
            self._in_flight = step
            return outputs
        return outputs + self._complete(step)

    def _launch(
        self, sched: SchedulerOutput, prev: _Step | None
    ) -> tuple[_Step, list[RequestOutput] | None]:
        """Launch ``sched``; the outputs of ``prev`` too when this step's sampling needed
        its tokens first (None when ``prev`` is left for the caller to complete)."""
        t0 = time.perf_counter()
        timed = self._async and self.device.type == "cuda"
        start = end = None
        if timed:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        prev_tokens = prev.tokens if prev is not None else None
        conn = self.scheduler.connector
        if conn is not None and conn.writers_fenced:
            conn.fence_writes(sched.written_blocks(self.config.block_size))
        rows, targets = choices.prompt_rows(sched.scheduled)
        if rows:
            logits, _ = self.runner.execute(sched.scheduled, prev_tokens, extra_rows=rows)
        else:
            logits, _ = self.runner.execute(sched.scheduled, prev_tokens)
        sampled = [
            s.seq
            for s in sched.scheduled
            if s.seq.num_computed_tokens + s.num_tokens == s.seq.num_tokens
        ]
        for item in sched.scheduled:
            item.seq.num_computed_tokens += item.num_tokens
        early = job = None
        guided = self.guided is not None and any(s.matcher is not None for s in sampled)
        if prev is not None and any(s.params.needs_history for s in sampled):
            # grammars and penalties read every earlier token: take the last step's now,
            # while the device runs this step's forward pass; this step's grammar masks are
            # built from them meanwhile
            early = self._complete(prev, sampled if guided else None)
            job = prev.mask_job
        tokens = logprobs_all = None
        if sampled:
            masks = None
            if guided:
                masks = self.guided.finish_masks(job) if job else self.guided.masks(sampled)
            tokens, logprobs_all = sample_on_device(logits, sampled, self.eos_ids, masks)
        for row, seq in enumerate(sampled):
            if not seq.is_finished:  # (stopped on the token ``early`` just read)
                seq.push_pending(row)
        step = _Step(sched, sampled, tokens, logprobs_all, t0)
        if targets:
            step.prompt_hidden, step.prompt_targets = self.runner.extra_hidden, targets
        # logprobs are read on the host against the chosen token: such steps complete now
        step.deferred = self._async and logprobs_all is None
        if timed and step.deferred:
            if tokens is not None:
                step.host_tokens = self.runner.staging_out.from_device(tokens)
            end.record()
            step.events = (start, end)
        return step, early

    def _complete(
        self, step: _Step, masks_for: list[Sequence] | None = None
    ) -> list[RequestOutput]:
        """Read back ``step``'s tokens (waiting for its GPU work only), then do its host
        work: name its full blocks, append tokens, check stops, build outputs. With
        ``masks_for``, the grammars take the tokens first and the masks of ``masks_for``
        (the next step's sampled sequences) are built while the rest of the work runs
        (``step.mask_job``)."""
        token_list, seconds = self._read_back(step)
        grammar_done = {} if masks_for is None else self._grammars_take(step, token_list, masks_for)
        result = sampler_output(token_list, step.logprobs_all, step.sampled)
        if step.prompt_targets:
            live = [(s, p) for s, p in step.prompt_targets if not s.is_finished]
            if live:
                choices.record_prompt_logprobs(self.runner.model, step.prompt_hidden, live)
        self._record_speed(step.sched, seconds)
        # CPU step times are too noisy to steer batching by
        self.scheduler.observe_step(step.sched, seconds, steer=self.device.type == "cuda")
        now = time.monotonic()
        self._commit_blocks(step.sched, now)
        outputs = []
        for i, seq in enumerate(step.sampled):
            if seq.is_finished:
                continue  # stopped (or aborted) on an earlier token while this step ran
            if seq.first_token_time is None:
                self._first_token(seq, now)
            self._accept_token(seq, token_list[i], result.logprobs[i], grammar_done.get(i))
            if seq.is_finished:
                self.scheduler.finish(seq)
                if all(s.is_finished for s in seq.group):
                    self.seqs.pop(seq.request_id, None)
                    self.counters["requests_finished"] += 1
            outputs.append(choices.make_output(seq))
        return outputs

    def _read_back(self, step: _Step) -> tuple[list[int], float]:
        """``step``'s sampled tokens on the host, and the seconds the step took."""
        if step.events is not None:
            step.events[1].synchronize()
            seconds = step.events[0].elapsed_time(step.events[1]) / 1e3
            host = step.host_tokens
        else:
            host = step.tokens
            if self.device.type == "cuda":
                # this stream only: store loads copying on the loader's stream must not hold
                # up the step (a forward over their blocks has waited for them on this stream)
                torch.cuda.current_stream().synchronize()
            seconds = time.perf_counter() - step.t0
        return (host.tolist() if host is not None else []), seconds

    def _grammars_take(
        self, step: _Step, token_list: list[int], masks_for: list[Sequence]
    ) -> dict[int, bool]:
        """Hand ``step``'s tokens to their grammars, then start the masks of ``masks_for``;
        returns, per row of ``step.sampled`` with a grammar, whether it is complete."""
        grammar_done: dict[int, bool] = {}
        for i, seq in enumerate(step.sampled):
            if seq.matcher is not None and not seq.is_finished:
                self.guided.accept(seq, token_list[i])
                grammar_done[i] = self.guided.done(seq)
        # no matcher is touched from here until the job is finished
        step.mask_job = self.guided.start_masks(masks_for)
        self.guided.overlapped_steps += step.mask_job is not None
        return grammar_done

    def _commit_blocks(self, sched: SchedulerOutput, now: float) -> None:
        """Name the blocks this step filled (and bound loads whose recompute has run)."""
        bs = self.config.block_size
        for item in sched.scheduled:
            seq = item.seq
            if seq.is_finished:
                continue
            if seq.load_future is not None and seq.num_computed_tokens >= seq.load_start_block * bs:
                self.scheduler.bound_late_load(seq, now)  # its recomputed part has now run
            # only blocks whose tokens are all known can be named
            full = min(seq.num_computed_tokens, seq.num_known_tokens) // bs
            self.block_manager.commit_full_blocks(seq, seq.block_keys(full))

    def _first_token(self, seq: Sequence, now: float) -> None:
        """Count ``seq``'s prompt, and let its held siblings in: its prompt's blocks are named."""
        seq.first_token_time = now
        self.counters["prompt_tokens"] += seq.num_prompt_tokens
        self.counters["prefix_cache_queries"] += seq.num_prompt_tokens
        self.counters["prefix_cache_hits"] += seq.num_cached_tokens or 0
        for sibling in seq.held:
            self.scheduler.add(sibling)
        seq.held = []

    def _accept_token(
        self, seq: Sequence, token: int, lp, grammar_done: bool | None = None
    ) -> None:
        """Append ``token`` to ``seq`` and check its stops. ``grammar_done``: its matcher
        has taken the token already, and this is whether the grammar is complete."""
        seq.resolve_pending(token)
        self.counters["generation_tokens"] += 1
        if lp is not None:
            seq.cumulative_logprob += lp[0]
            seq.logprobs.append(lp[1])
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.push([token])
        if seq.matcher is not None and grammar_done is None:
            self.guided.accept(seq, token)
            grammar_done = self.guided.done(seq)
        check_stops(seq, token, self.eos_ids, self.max_model_len, grammar_done)

    def _record_speed(self, sched: SchedulerOutput, seconds: float) -> None:
        """Count a completed step and its prompt tokens; a step with enough of them
        measures the prefill speed."""
        prefill = sched.num_prompt_tokens
        self.counters["steps"] += 1
        self.counters["computed_prompt_tokens"] += prefill
        if prefill >= 256:
            self.prefill_tokens_per_s = ewma(self.prefill_tokens_per_s, prefill / seconds, 0.2)
            if self.connector is not None:
                self.connector.prefill_tokens_per_s = self.prefill_tokens_per_s

    @property
    def decode_step_s(self) -> float | None:
        """Time of a decode-only step (the scheduler's estimate, EWMA), None until one ran."""
        return self.scheduler.decode_step.value

    # ---- introspection -------------------------------------------------------------------

    def drain_kv_events(self) -> list[KVEvent]:
        events = self.block_manager.drain_events()
        if self.connector is not None:
            events += self.connector.drain_events()
        return events

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_parked": len(self.scheduler.running) - len(self.scheduler.active()),
            "num_waiting": len(self.scheduler.waiting),
            "kv_usage": bm.usage(),
            "num_kv_blocks": bm.num_blocks,
            "block_size": bm.block_size,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_room_waits": self.scheduler.num_room_waits,
            "store_engine_s": dict(self.connector.engine_time.seconds)
            if self.connector is not None
            else {},
            "store_loaded_tokens": self.scheduler.store_loaded_tokens,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_step_s": self.decode_step_s,
            "mixed_prefill_tokens": self.scheduler._mixed_prefill_budget(),
            "waiting_prefill_tokens": self.scheduler.queued_prompt_tokens()
            + sum(s.num_tokens - s.num_computed_tokens - 1 for s in self.scheduler.running),
            **self.counters,
            **(self.guided.stats() if self.guided is not None else {}),
        }
