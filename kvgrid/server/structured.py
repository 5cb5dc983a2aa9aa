"""What a request's output must look like: response_format, vLLM's guided_* fields and
tool_choice, turned into one grammar for the engine and a tool-call mode for the reply.

    tool_choice "required" / a named function: the output is tool calls in the model's own
        format, enforced by the grammar, so even a small model returns a valid call
    "auto": the output is free (or follows response_format's JSON, or is a tool call)
        and calls are parsed out of it
    "none": tools are shown to the model but nothing is parsed
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kvgrid.engine.sampling_params import GuidedDecoding
from kvgrid.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from kvgrid.server.tool_parsers import _JSON_STYLE, ToolParser

_GUIDED_FIELDS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


@dataclass(frozen=True)
class OutputPlan:
    guided: GuidedDecoding | None = None
    tools: str | None = None  # None: no tool calls; "auto": parsed if present; "forced"


def _schema_text(schema: Any, field: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise APIError(400, f"{field} is not valid JSON: {e}", param=field) from None
    if not isinstance(schema, dict):
        raise APIError(400, f"{field} must be a JSON schema object", param=field)
    return json.dumps(schema)


def response_grammar(req: ChatCompletionRequest | CompletionRequest) -> GuidedDecoding | None:
    """The grammar that response_format or a guided_* field asks for (at most one)."""
    given = [
        f
        for f in _GUIDED_FIELDS
        if getattr(req, f) is not None
        and not (f == "response_format" and req.response_format.type == "text")
    ]
    if len(given) > 1:
        raise APIError(400, f"give only one of {', '.join(given)}", param=given[1])
    if not given:
        return None
    field = given[0]
    if field == "response_format":
        rf = req.response_format
        if rf.type == "json_object":
            return GuidedDecoding("json_schema", json.dumps({"type": "object"}))
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(
                400,
                "response_format.json_schema.schema is required for type json_schema",
                param="response_format",
            )
        return GuidedDecoding(
            "json_schema", _schema_text(rf.json_schema.schema_, "response_format.json_schema")
        )
    if field == "guided_json":
        return GuidedDecoding("json_schema", _schema_text(req.guided_json, "guided_json"))
    if field == "guided_regex":
        if not req.guided_regex:
            raise APIError(400, "guided_regex must not be empty", param="guided_regex")
        return GuidedDecoding("regex", req.guided_regex)
    if field == "guided_choice":
        if not req.guided_choice:
            raise APIError(400, "guided_choice must list at least one string", param=field)
        return GuidedDecoding("choice", json.dumps(req.guided_choice))
    if not req.guided_grammar:
        raise APIError(400, "guided_grammar must not be empty", param="guided_grammar")
    return GuidedDecoding("grammar", req.guided_grammar)


def plan_output(req: ChatCompletionRequest, parser: ToolParser) -> OutputPlan:
    answer = response_grammar(req)
    tools = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return OutputPlan(answer)
    names = [t["name"] for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", param="tools")
    # a grammar that allows more calls lets a small model repeat its call until max_tokens:
    # several only when the client asks for them
    parallel = req.parallel_tool_calls is True
    if choice == "none":
        return OutputPlan(answer)
    if choice == "required" or not isinstance(choice, str | None):
        if answer is not None:
            raise APIError(
                400,
                "response_format (or guided_*) cannot apply when tool_choice forces a call",
                param="tool_choice",
            )
        if choice != "required":
            name = choice.function.name
            if name not in names:
                raise APIError(
                    400,
                    f"tool_choice names function {name!r}, which is not in tools",
                    param="tool_choice",
                )
            tools, parallel = [t for t in tools if t["name"] == name], False
        return OutputPlan(GuidedDecoding("grammar", parser.grammar(tools, parallel)), "forced")
    # auto: free text with calls parsed out, or, with a JSON answer asked for, either
    if answer is None:
        return OutputPlan(None, "auto")
    if answer.kind != "json_schema":
        raise APIError(
            400,
            "with tools in auto mode, only a JSON response_format can apply "
            "(send tool_choice 'none' to use this guided field)",
            param="tool_choice",
        )
    schema = {**json.loads(answer.spec), "x-guidance": _JSON_STYLE}
    calls = parser.grammar(tools, parallel).replace("start:", "tool_calls:", 1)
    lark = f"start: tool_calls | answer\n{calls}answer: %json {json.dumps(schema)}\n"
    return OutputPlan(GuidedDecoding("grammar", lark), "auto")
