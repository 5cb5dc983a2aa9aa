"""Sequence: one request's tokens, KV blocks and progress through the engine."""

from __future__ import annotations

import time
from concurrent.futures import Future
from enum import Enum, auto

import torch

from kvgrid import keys
from kvgrid.engine.sampling_params import SamplingParams

PENDING = -1  # a token id not yet read back from the device (see Sequence.num_pending)


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        scope_digest: bytes,
        block_size: int,
        max_tokens: int,
        prompt: str | None = None,
        tenant: bytes = keys.PUBLIC_TENANT,
        shared_tokens: int = 0,
        shared_digest: bytes | None = None,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.token_ids = list(prompt_token_ids)  # prompt + output, grown in place
        # Asynchronous scheduling: tokens sampled on the device but not yet read back sit at
        # the end of token_ids as PENDING (the next step takes them from the device; the
        # host fills them in a step later). pending_rows: each one's row in its step's
        # sampled tokens. output_token_ids holds known tokens only.
        self.pending_rows: list[int] = []
        self.params = params
        self.scope_digest = scope_digest
        self.tenant = tenant
        # leading prompt tokens of a prefix shared across tenants: their blocks are keyed in
        # the public scope (shared_digest), the rest of the chain in the tenant's
        self.shared_tokens = shared_tokens if shared_digest is not None else 0
        self.shared_digest = shared_digest
        self.block_size = block_size
        self.max_tokens = max_tokens  # after capping to the context
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V sit in the cache
        self.block_table: list[int] = []
        self.num_committed_blocks = 0  # leading blocks already named in the prefix cache
        self._keys: list[bytes] = []  # keys of full blocks of all_token_ids, grown lazily
        # prompt tokens served from cache (G1 or the store) at first admission
        self.num_cached_tokens: int | None = None
        self.num_cached_tokens_g1 = 0
        # blocks [stored_from, stored_to) were found in the context store at admission: once
        # named in G1 they are known to be safe below it
        self.stored_from = self.stored_to = 0
        # reuse prospects of its blocks, for the store's write-down: 1 once it has reused a
        # cached prefix (a context that comes back, such as a conversation's history)
        self.prospect = 0.0
        # a load from the context store in flight: blocks [load_start_block, +load_count)
        self.load_future: Future | None = None
        self.load_start_block = 0
        self.load_count = 0
        self.load_deadline = None  # its LoadDeadline (kvgrid.store.load_plan), moved by the engine
        self.load_expected_end = 0.0  # time.monotonic() by which the plan expected it done
        self.parked = False  # admitted while the batch was full, loading until a slot frees
        # a layered load still landing (kvgrid.store.landing): the next forward waits on it
        self.kv_landing = None
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.generator: torch.Generator | None = None
        # choice ``index`` of ``n`` (SamplingParams.n): the siblings of one request, in order;
        # ``held`` are those not yet admitted (they wait for the first one's prompt blocks)
        self.index = 0
        self.group: list[Sequence] = [self]
        self.held: list[Sequence] = []
        self.matcher = None  # llguidance matcher when the output follows a grammar
        # per prompt position: {token: logprob} of the prompt token there (and the top ones)
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None
        )
        self.completion = None  # its CompletionOutput, updated as tokens arrive
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.detokenizer = None  # set by the engine when it has a tokenizer
        self.text = ""  # output text, stop strings applied
        self.emitted_text_len = 0  # for streaming deltas
        self.emitted_token_count = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def append_token(self, token: int) -> None:
        self.token_ids.append(token)
        self.output_token_ids.append(token)

    @property
    def num_pending(self) -> int:
        return len(self.pending_rows)

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids) - self.num_pending

    @property
    def num_output_tokens(self) -> int:
        """Output tokens sampled so far, including those not yet read back."""
        return len(self.output_token_ids) + self.num_pending

    def push_pending(self, row: int) -> None:
        """A token was sampled into row ``row`` of this step's device tensor."""
        self.token_ids.append(PENDING)
        self.pending_rows.append(row)

    def resolve_pending(self, token: int) -> None:
        """The earliest pending token is ``token``."""
        if not self.num_pending:
            raise RuntimeError(f"{self.request_id}: no pending token to resolve")
        self.token_ids[len(self.token_ids) - self.num_pending] = token
        self.output_token_ids.append(token)
        del self.pending_rows[0]

    def drop_pending(self) -> None:
        """Forget tokens sampled after the sequence finished (their step ran speculatively)."""
        if self.pending_rows:
            del self.token_ids[-self.num_pending :]
            self.pending_rows.clear()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_tokens - 1 and self.num_computed_tokens > 0

    def block_keys(self, num_blocks: int) -> list[bytes]:
        """Keys of the first `num_blocks` full blocks, extending the cached chain as needed."""
        if num_blocks > len(self._keys):
            if num_blocks * self.block_size > self.num_known_tokens:
                raise RuntimeError(f"{self.request_id}: block keys over tokens not yet known")
            tokens = self.all_token_ids
            parent = self._keys[-1] if self._keys else None
            self._keys += keys.block_keys_shared(
                tokens[: num_blocks * self.block_size],
                self.scope_digest,
                self.block_size,
                self.shared_tokens,
                self.shared_digest or b"",
                parent=parent,
                start_block=len(self._keys),
            )
        return self._keys[:num_blocks]
