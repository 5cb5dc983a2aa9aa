"""A validated request turned into what the engine runs: prompt tokens, SamplingParams, and
how the reply is written (tool calls, logprobs, echo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvgrid.engine.sampling_params import RequestError, SamplingParams
from kvgrid.server.chat_prompt import chat_text
from kvgrid.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
    check_max_tokens,
)
from kvgrid.server.responses import ChoiceState
from kvgrid.server.structured import OutputPlan, plan_output, response_grammar
from kvgrid.server.tool_parsers import ToolCallStream, ToolParser


@dataclass
class Prepared:
    tokens: list[int]
    params: SamplingParams
    plan: OutputPlan
    top_logprobs: int | None  # per token in the reply; None: none
    echo_text: str | None = None  # completions with echo: the prompt as text
    drop_output: bool = False  # echo with max_tokens 0 (prompt logprobs only)


def _tok(tokenizer: Any) -> Any:
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send the prompt as token ids")
    return tokenizer


def prompt_tokens(
    tokenizer: Any, req: ChatCompletionRequest | CompletionRequest | TokenizeRequest, parser
) -> list[int]:
    if isinstance(req, ChatCompletionRequest | TokenizeRequest) and req.messages is not None:
        tok = _tok(tokenizer)
        try:
            text = chat_text(
                tok, req.messages, req.tools, parser, req.add_generation_prompt is not False
            )
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        return tok.encode(text, add_special_tokens=False)
    p = req.prompt
    if p is None:
        raise APIError(400, "give a prompt or messages", param="prompt")
    if isinstance(p, list) and p and isinstance(p[0], str | list):
        if len(p) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt")
        p = p[0]
    if isinstance(p, str):
        add = not isinstance(req, TokenizeRequest) or req.add_special_tokens
        return _tok(tokenizer).encode(p, add_special_tokens=add)
    if not p:
        raise APIError(400, "prompt is empty", param="prompt")
    return list(p)


def prepare(
    req: ChatCompletionRequest | CompletionRequest, tokenizer: Any, parser: ToolParser
) -> Prepared:
    chat = isinstance(req, ChatCompletionRequest)
    max_tokens = req.wanted_max_tokens if chat else req.max_tokens
    name = (
        "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
    )
    drop = not chat and bool(req.echo) and max_tokens == 0
    if drop:
        max_tokens = 1  # one token is drawn (the engine always draws one) and not shown
    check_max_tokens(max_tokens, name)
    extra: dict[str, Any] = {}
    if chat:
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
        plan = plan_output(req, parser)
    else:
        top = req.logprobs
        if req.echo and top is not None:
            extra["prompt_logprobs"] = top
        plan = OutputPlan(response_grammar(req))
    if top is not None:
        extra["logprobs"] = top
    try:
        params = req.sampling_params(max_tokens, guided=plan.guided, **extra)
    except RequestError as e:
        raise APIError(400, str(e)) from None
    tokens = prompt_tokens(tokenizer, req, parser)
    echo_text = None
    if not chat and req.echo:
        p = (
            req.prompt[0]
            if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str)
            else req.prompt
        )
        echo_text = p if isinstance(p, str) else _tok(tokenizer).decode(tokens)
    return Prepared(tokens, params, plan, top, echo_text, drop)


def choice_states(prep: Prepared, chat: bool, tokenizer: Any, parser: ToolParser) -> list:
    """One ChoiceState per choice of a prepared request."""
    states = []
    for i in range(prep.params.n):
        tools = None
        if chat and prep.plan.tools is not None:
            tools = ToolCallStream(parser, whole=prep.plan.tools == "forced")
        echo = None
        if prep.echo_text is not None:
            echo = (prep.echo_text, prep.tokens, None)
        states.append(
            ChoiceState(i, chat, tokenizer, prep.top_logprobs, tools, echo, prep.drop_output)
        )
    return states
