"""OpenAI API request shapes, their translation to SamplingParams, and the error shape.

Every field a client may send is declared. A field kvgrid does not implement is refused
with a 400 that names it when its value would change the output; fields that only carry
metadata (user, metadata, store, ...) are accepted. An unknown field is refused too, as
OpenAI does: a client must never believe it got something it did not. The table of fields
is in docs/API.md.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from kvgrid.engine.sampling_params import MAX_N, SEED_MAX, SEED_MIN, RequestError, SamplingParams

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "internal_server_error",
    502: "bad_gateway",
    503: "service_unavailable",
}
MAX_JSON_DEPTH = 64  # nesting of a request body (JSON schemas included)
MAX_BODY_BYTES = 32 * 1024 * 1024


class APIError(Exception):
    """An error the API reports to the client in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _ERROR_TYPES.get(self.status, "error"),
                "param": self.param,
                "code": self.code if self.code is not None else self.status,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class _Strict(BaseModel):
    # JSON types as written: "5" is not a number, 1 is not true
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# ---- messages ------------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCallParam(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None  # an earlier answer's refusal text: metadata here

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        # a precise message rather than the union's first failure
        if isinstance(v, list):
            for i, p in enumerate(v):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind != "text":
                    raise ValueError(
                        f"part {i}: only text content parts are supported, got {kind!r}"
                    )
                if not isinstance(p.get("text"), str):
                    raise ValueError(f"part {i}: 'text' must be a string")
        return v

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content)


# ---- tools and structured output -------------------------------------------------------


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# Fields OpenAI defines that kvgrid does not implement: accepted only at a value that
# changes nothing (None, or the value given here), else refused naming the field.
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "audio": (None, "audio output is not supported"),
    "modalities": (["text"], "only text output is supported"),
    "prediction": (None, "predicted outputs are not supported"),
    "reasoning_effort": (None, "this model has no reasoning effort setting"),
    "verbosity": (None, "verbosity is not supported"),
    "web_search_options": (None, "web search is not supported"),
    "functions": (None, "'functions' is deprecated and not supported: send 'tools'"),
    "function_call": (None, "'function_call' is deprecated and not supported: send 'tool_choice'"),
    "suffix": ("", "suffix (fill-in-the-middle) is not supported"),
}


def _refused(schema: dict[str, Any], why: str) -> Any:
    """A field kvgrid refuses unless neutral: parsed as anything (so that the 400 can say
    why), documented as what is accepted."""
    return Annotated[Any, WithJsonSchema({**schema, "description": f"Not supported: {why}"})]


_NULL = {"type": "null"}
TokenId = Annotated[str, StringConstraints(pattern=r"^[0-9]+$")]
Logprobs = Annotated[int, Field(ge=0, le=20)]


class _Common(_Strict):
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=100)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: (
        Annotated[
            dict[TokenId, Annotated[float, Field(ge=-100, le=100)]],
            WithJsonSchema(
                {
                    "type": "object",
                    "patternProperties": {
                        "^[0-9]+$": {"type": "number", "minimum": -100, "maximum": 100}
                    },
                    "additionalProperties": False,
                    "description": "token id -> bias added to its logit",
                }
            ),
        ]
        | None
    ) = None
    response_format: ResponseFormat | None = None
    # metadata only: accepted, change nothing
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # OpenAI fields kvgrid refuses unless neutral (see _UNSUPPORTED)
    audio: _refused(_NULL, "audio output") = None
    modalities: _refused(
        {"anyOf": [_NULL, {"type": "array", "items": {"const": "text"}, "maxItems": 1}]},
        "output other than text",
    ) = None
    prediction: _refused(_NULL, "predicted outputs") = None
    reasoning_effort: _refused(_NULL, "reasoning effort") = None
    verbosity: _refused(_NULL, "verbosity") = None
    web_search_options: _refused(_NULL, "web search") = None

    @property
    def choices(self) -> int:
        return 1 if self.n is None else self.n

    def check_unsupported(self) -> None:
        for name, (neutral, why) in _UNSUPPORTED.items():
            if name not in type(self).model_fields:
                continue
            v = getattr(self, name)
            if v is not None and v != neutral:
                raise APIError(400, f"{name}: {why}", param=name, code="unsupported_parameter")

    def sampling_params(self, max_tokens: int | None, **extra: Any) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k in (None, 0) else self.top_k,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos),
            min_tokens=self.min_tokens or 0,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            skip_special_tokens=self.skip_special_tokens is not False,
            n=self.choices,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=dict(self.logit_bias) if self.logit_bias else None,
            **extra,
        )


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0: with echo, the prompt only (max_tokens is at least 1 otherwise)
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    echo: bool | None = None
    logprobs: Logprobs | None = None
    best_of: _refused(
        {"anyOf": [_NULL, {"type": "integer", "minimum": 1}]}, "best_of other than n"
    ) = None
    suffix: _refused({"anyOf": [_NULL, {"type": "string", "maxLength": 0}]}, "suffix") = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.best_of is not None and self.best_of != self.choices:
            raise APIError(
                400,
                "best_of: choosing the best of more candidates than n is not supported "
                "(best_of must equal n)",
                param="best_of",
                code="unsupported_parameter",
            )


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Logprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat extensions
    add_generation_prompt: bool | None = None
    # OpenAI's deprecated function calling (refused: see _UNSUPPORTED)
    functions: _refused(_NULL, "'functions': send 'tools'") = None
    function_call: _refused(_NULL, "'function_call': send 'tool_choice'") = None

    @property
    def wanted_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- parsing ---------------------------------------------------------------------------


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _depth(data: Any) -> int:
    deepest, stack = 0, [(data, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_JSON_DEPTH:
            break
        if isinstance(v, dict):
            stack += [(x, d + 1) for x in v.values()]
        elif isinstance(v, list):
            stack += [(x, d + 1) for x in v]
    return deepest


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def _loc(loc: tuple) -> str:
    """A validation error's location without pydantic's union member tags."""
    parts = []
    for x in loc:
        if isinstance(x, int):
            parts.append(str(x))
        elif (
            not any(c in x for c in "[]-(") and x.lower() not in _TYPE_TAGS and not x[:1].isupper()
        ):
            parts.append(x)
    return ".".join(parts)


def parse_request(cls: type[BaseModel], body: bytes) -> Any:
    """Parse and validate a JSON body; every failure is a 400 that says what is wrong."""
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    if _depth(data) > MAX_JSON_DEPTH:
        raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        # a lone UTF-16 surrogate ("\\ud800") parses, but is no text a tokenizer can read
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, "request body holds a lone UTF-16 surrogate escape (not valid Unicode text)"
        ) from None
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = _loc(err["loc"])
        if err["type"] == "extra_forbidden":
            raise APIError(
                400, f"unrecognized request field {loc!r}", param=loc, code="unknown_parameter"
            ) from None
        raise APIError(400, f"{loc}: {err['msg']}" if loc else err["msg"], param=loc) from None
    if hasattr(req, "check_unsupported"):
        req.check_unsupported()
    return req


def check_max_tokens(value: int | None, name: str = "max_tokens") -> None:
    if value is not None and value < 1:
        raise APIError(400, f"{name} must be at least 1, got {value}", param=name)


def sampling_error(e: RequestError) -> APIError:
    return APIError(400, str(e))
