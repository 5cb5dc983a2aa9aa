"""``/openapi.json``: the public API as it is, for clients and schema-driven tools.

The request bodies are the models the server parses with (kvgrid.server.protocol), so the
schema cannot drift from what is accepted; every public route lists the error responses it
gives. Internal, admin and debug routes are left out.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from kvgrid.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
)

# ---- response shapes (documentation: the frontend writes these bodies directly) ---------


class CachedTokens(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class Tokenized(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]


class Detokenized(BaseModel):
    prompt: str


_BODIES: dict[str, tuple[type[BaseModel], type[BaseModel], bool]] = {
    # path: (request, response, streams)
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletion, True),
    "/v1/completions": (CompletionRequest, Completion, True),
    "/tokenize": (TokenizeRequest, Tokenized, False),
    "/detokenize": (DetokenizeRequest, Detokenized, False),
}
_GETS = ("/v1/models", "/health", "/metrics")
_ERRORS = {
    "400": "Malformed request, or a field that is not supported (the message names it)",
    "401": "Missing or unknown API key",
    "404": "Unknown model",
    "413": "Request body too large",
    "429": "The tenant's queue is full",
    "500": "Internal error",
    "502": "The worker serving the request failed",
    "503": "No worker available",
}


# one server-sent event (OpenAPI describes a stream by its events)
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {
            "type": "string",
            "description": "a chunk (JSON: chat.completion.chunk or text_completion), an error "
            "({'error': {...}}), or [DONE] last",
        },
        "event": {"type": "string"},
    },
    "required": ["data"],
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def build_schema(app: FastAPI) -> dict[str, Any]:
    public = set(_BODIES) | set(_GETS)
    routes = [r for r in app.routes if getattr(r, "path", None) in public]
    schema = get_openapi(
        title="kvgrid",
        version=app.version,
        description="OpenAI-compatible API; see docs/API.md for every field.",
        routes=routes,
    )
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    models = [ErrorResponse] + [m for req, resp, _ in _BODIES.values() for m in (req, resp)]
    for model in models:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
        comps.update(js.pop("$defs", {}))
        comps[model.__name__] = js
    errors = {
        code: {
            "description": text,
            "content": {"application/json": {"schema": _ref("ErrorResponse")}},
        }
        for code, text in _ERRORS.items()
    }
    schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, (req, resp, streams) in _BODIES.items():
        op = schema["paths"][path]["post"]
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(req.__name__)}},
        }
        ok: dict[str, Any] = {"application/json": {"schema": _ref(resp.__name__)}}
        if streams:  # with "stream": true, server-sent events of chunks
            ok["text/event-stream"] = {"schema": _SSE_EVENT}
        op["responses"] = {"200": {"description": "OK", "content": ok}, **errors}
        op["security"] = [{"bearer": []}]
    for path in _GETS:
        op = schema["paths"][path]["get"]
        op["responses"] = {
            "200": op["responses"]["200"],
            **{c: errors[c] for c in (("401", "500") if path == "/v1/models" else ("500",))},
        }
        if path == "/health":
            op["responses"]["503"] = {
                "description": "No worker is up",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
    return schema


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app)
        return app.openapi_schema

    app.openapi = openapi
