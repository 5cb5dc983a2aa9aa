"""What the engine hands back per request: vLLM's RequestOutput shape, plus deltas for streaming."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    # per generated token: {token_id: logprob}, the sampled token always included
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that matched


@dataclass
class RequestOutput:
    """One request's state after a step. While it runs, `outputs[i].token_ids` is a live view
    of choice i's growing output (copy it to keep it); `new_token_ids`/`new_text` are this
    step's delta of choice `index` (a request with n > 1 choices gives one output per choice
    that advanced). The output with `finished=True` (every choice done) is a snapshot."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from cache (any tier) instead of computed
    # what this step added, for streaming
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # arrival, first_token, finished times
    index: int = 0  # the choice this step's delta belongs to
    new_logprobs: list[dict[int, float]] | None = None  # per new token, when asked for
    # per prompt position: {token: logprob} (None at position 0), when asked for
    prompt_logprobs: list[dict[int, float] | None] | None = None
