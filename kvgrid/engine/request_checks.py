"""What a request may ask of an engine: its prompt, its limits, and what a resumed request
brings along. Everything here reads configuration only, so any thread may call it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvgrid.engine.sampling_params import RequestError, SamplingParams

if TYPE_CHECKING:
    from kvgrid.engine.block_manager import BlockManager
    from kvgrid.models.tokenizer import Tokenizer


def _is_token_list(ids: object) -> bool:
    return isinstance(ids, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in ids
    )


@dataclass(frozen=True)
class RequestChecker:
    tokenizer: Tokenizer | None
    vocab_size: int
    max_model_len: int
    max_logprobs: int
    block_manager: BlockManager  # its pool size and block size only

    def check(
        self, prompt: str | list[int], params: SamplingParams
    ) -> tuple[str | None, list[int], int]:
        """(prompt text or None, prompt token ids, max tokens), or RequestError. A grammar is
        checked by ``LLMEngine.guided_matcher``, which compiles it."""
        params.validate()
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: send prompt token ids")
            text, prompt = prompt, self.tokenizer.encode(prompt)
        if not _is_token_list(prompt):
            raise RequestError("prompt must be a string or a list of token ids")
        if not prompt:
            raise RequestError("prompt is empty")
        vocab = self.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise RequestError(f"prompt has token ids outside the vocabulary [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise RequestError(
                f"prompt has {len(prompt)} tokens; this model's context is {self.max_model_len} "
                "tokens and at least one must be left to generate"
            )
        room = self.max_model_len - len(prompt)
        if params.max_tokens is not None and params.max_tokens > room:
            raise RequestError(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"this model's context of {self.max_model_len} tokens"
            )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(params, name)
            if v is not None and v > self.max_logprobs:
                raise RequestError(f"{name} must be at most {self.max_logprobs}")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise RequestError(f"logit_bias names token ids outside the vocabulary [0, {vocab})")
        max_tokens = params.max_tokens or room
        bm = self.block_manager
        need = bm.blocks_needed(len(prompt) + max_tokens)
        if need > bm.num_blocks:
            raise RequestError(f"request needs {need} KV blocks but the pool has {bm.num_blocks}")
        return text, prompt, max_tokens

    def check_resume(
        self, output: list[int] | None, params: SamplingParams, max_tokens: int, room: int
    ) -> list[int]:
        """The tokens a request generated on another engine, checked (empty: a new request)."""
        if not output:
            return []
        if not _is_token_list(output):
            raise RequestError("resume_output must be a list of token ids")
        if any(t < 0 or t >= self.vocab_size for t in output):
            raise RequestError("resume_output has token ids outside the vocabulary")
        if len(output) >= min(max_tokens, room):
            raise RequestError(
                f"resume_output has {len(output)} tokens: nothing is left to generate"
            )
        if params.logprobs is not None or params.prompt_logprobs is not None:
            raise RequestError("a request that returns logprobs cannot be resumed")
        if params.n != 1:
            raise RequestError("a request with several choices cannot be resumed")
        return list(output)
