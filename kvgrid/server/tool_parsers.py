"""Tool calls in the model's own format: parsing them out of the text, streaming them, and
the grammar that makes a model write one.

Formats (``--tool-call-parser``; ``auto`` picks from the tokenizer):
    hermes       ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen,
                 and the default for templates that know no tools)
    llama3_json  ``{"name": ..., "parameters": {...}}``, several joined by ``;``, optionally
                 after ``<|python_tag|>`` (Llama 3.1-3.3)
    mistral      ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

PARSERS = ("auto", "hermes", "llama3_json", "mistral")
# JSON inside grammars: no free whitespace (a small model must not stall on blank lines)
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call_schema(fn: dict[str, Any], args_key: str) -> dict[str, Any]:
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, args_key: params},
        "required": ["name", args_key],
        "additionalProperties": False,
    }


def _one_of(functions: list[dict[str, Any]], args_key: str) -> dict[str, Any]:
    schemas = [_call_schema(f, args_key) for f in functions]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return {**body, "x-guidance": _JSON_STYLE}


def _decode_calls(items: Any, args_keys: tuple[str, ...]) -> list[ToolCall] | None:
    """ToolCalls from decoded JSON (an object or a list of them); None if it is not that."""
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("name"), str):
            return None
        args = next((it[k] for k in args_keys if k in it), {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(it["name"], json.dumps(args, ensure_ascii=False), new_call_id()))
    return calls


class ToolParser:
    name = ""
    start = ""  # the text that opens a call (empty: the whole output is looked at)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content left over, the calls); no calls means the text is plain content."""
        raise NotImplementedError

    def grammar(self, functions: list[dict[str, Any]], parallel: bool) -> str:
        """A Lark grammar (llguidance dialect) for one call of ``functions`` (or several,
        with ``parallel``) in this format, and nothing else."""
        raise NotImplementedError

    def may_start(self, text: str) -> int:
        """Where in ``text`` a call may begin (len(text) if nowhere): streamed text is sent
        up to there and held back from there until the output is complete."""
        at = text.find(self.start)
        if at >= 0:
            return at
        # a prefix of the opening text at the very end may still become one
        for k in range(min(len(self.start) - 1, len(text)), 0, -1):
            if text.endswith(self.start[:k]):
                return len(text) - k
        return len(text)

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        """Tool instructions for a chat template that does not render tools itself."""
        raise NotImplementedError

    def render_calls(self, calls: list[dict[str, Any]]) -> str:
        """An earlier assistant turn's calls as text, for templates that know no tool_calls."""
        raise NotImplementedError

    def render_result(self, content: str) -> str:
        return content


class HermesParser(ToolParser):
    name = "hermes"
    start = "<tool_call>"
    _RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        at = text.find(self.start)
        if at < 0:
            return text, []
        calls: list[ToolCall] = []
        for m in self._RE.finditer(text, at):
            try:
                got = _decode_calls(json.loads(m.group(1)), ("arguments", "parameters"))
            except ValueError:
                got = None
            if got is None:
                return text, []
            calls += got
        content = text[:at].strip()
        return (content or None), calls

    def grammar(self, functions: list[dict[str, Any]], parallel: bool) -> str:
        more = ' ("\\n" call)*' if parallel else ""
        return (
            f"start: call{more}\n"
            'call: "<tool_call>\\n" body "\\n</tool_call>"\n'
            f"body: %json {json.dumps(_one_of(functions, 'arguments'))}\n"
        )

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        sigs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "You are a function calling AI model. You are given function signatures within "
            "<tools></tools> XML tags. You may call one or more functions to assist with the "
            "user query. Here are the available tools:\n<tools>\n"
            f"{sigs}\n</tools>\n"
            "For each function call, return a JSON object with the function name and "
            "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def render_calls(self, calls: list[dict[str, Any]]) -> str:
        return "\n".join(
            "<tool_call>\n"
            + json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
            + "\n</tool_call>"
            for c in calls
        )

    def render_result(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    start = "{"
    _TAG = "<|python_tag|>"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix(self._TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls: list[ToolCall] = []
        dec = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = dec.raw_decode(body, pos)
            except ValueError:
                return text, []
            got = _decode_calls(obj, ("parameters", "arguments"))
            if got is None:
                return text, []
            calls += got
            pos = end
            while pos < len(body) and body[pos] in " \n\t;":
                pos += 1
        return None, calls

    def may_start(self, text: str) -> int:
        # a call is the whole output: only output that begins like one is held back
        stripped = text.lstrip()
        if not stripped:
            return 0
        lead = len(text) - len(stripped)
        if stripped.startswith("{") or self._TAG.startswith(stripped[: len(self._TAG)]):
            return lead
        return len(text)

    def grammar(self, functions: list[dict[str, Any]], parallel: bool) -> str:
        more = ' ("; " call)*' if parallel else ""
        return f"start: call{more}\ncall: %json {json.dumps(_one_of(functions, 'parameters'))}\n"

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        sigs = "\n\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "Given the following functions, please respond with a JSON for a function call "
            "with its proper arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of '
            "argument name and its value}. Do not use variables.\n\n" + sigs
        )

    def render_calls(self, calls: list[dict[str, Any]]) -> str:
        return "; ".join(
            json.dumps({"name": c["name"], "parameters": c["arguments"]}, ensure_ascii=False)
            for c in calls
        )


class MistralParser(ToolParser):
    name = "mistral"
    start = "[TOOL_CALLS]"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        at = text.find(self.start)
        # the marker is a special token: with special tokens skipped, the array stands alone
        body = text[at + len(self.start) :] if at >= 0 else text
        content = text[:at].strip() if at >= 0 else ""
        body = body.strip()
        if not body.startswith("["):
            return text, []
        try:
            obj, _ = json.JSONDecoder().raw_decode(body)
        except ValueError:
            return text, []
        calls = _decode_calls(obj, ("arguments", "parameters"))
        if calls is None:
            return text, []
        return (content or None), calls

    def may_start(self, text: str) -> int:
        at = super().may_start(text)
        if at < len(text):
            return at
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("[") or not stripped else len(text)

    def grammar(self, functions: list[dict[str, Any]], parallel: bool) -> str:
        items = _one_of(functions, "arguments")
        items.pop("x-guidance")
        arr = {"type": "array", "items": items, "minItems": 1, "x-guidance": _JSON_STYLE}
        if not parallel:
            arr["maxItems"] = 1
        # the marker is a special token, which a grammar of text cannot ask for; the array
        # alone is read as calls all the same
        return f"start: calls\ncalls: %json {json.dumps(arr)}\n"

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        return "[AVAILABLE_TOOLS] " + json.dumps(tools, ensure_ascii=False) + "[/AVAILABLE_TOOLS]"

    def render_calls(self, calls: list[dict[str, Any]]) -> str:
        return "[TOOL_CALLS] " + json.dumps(
            [{"name": c["name"], "arguments": c["arguments"]} for c in calls], ensure_ascii=False
        )


_BY_NAME: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)
}


def get_parser(name: str, tokenizer: Any = None) -> ToolParser:
    """The parser called ``name``; ``auto`` picks by the tokens the vocabulary has."""
    if name == "auto":
        name = "hermes"
        if tokenizer is not None:
            if tokenizer.token_id("<|python_tag|>") is not None:
                name = "llama3_json"
            elif tokenizer.token_id("[TOOL_CALLS]") is not None:
                name = "mistral"
    if name not in _BY_NAME:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(PARSERS)}")
    return _BY_NAME[name]()


class ToolCallStream:
    """One choice's streamed text with tool calls taken out: text is passed on until a call
    may begin, held from there, and parsed when the output is complete."""

    def __init__(self, parser: ToolParser, whole: bool = False) -> None:
        self.parser = parser
        self.whole = whole  # the output is nothing but calls (tool_choice required or named)
        self.text = ""
        self.sent = 0  # chars of text already passed on

    def feed(self, delta: str) -> str:
        """Text that can be sent now."""
        self.text += delta
        if self.whole:
            return ""
        at = self.parser.may_start(self.text)
        out = self.text[self.sent : at] if at > self.sent else ""
        self.sent = max(self.sent, at)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(text still to send, calls) once the output is complete."""
        content, calls = self.parser.extract(self.text)
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        if not calls:
            return rest, []
        # what came before the first call has been sent already, unless nothing was
        return ((content or "") if self.whole else ""), calls
