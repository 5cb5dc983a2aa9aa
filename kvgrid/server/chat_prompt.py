"""Chat messages (tools, earlier tool calls and their results included) to prompt text,
through the model's own chat template.

The template receives ``tools``, ``tool_calls`` and ``tool`` messages the way transformers
hands them over (arguments as objects). A template that renders none of them (it never
mentions them) gets them as text instead, in the tool parser's format: the tool list in the
system message, earlier calls in the assistant's text, results as user turns.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kvgrid.server.protocol import ChatMessage, Tool
from kvgrid.server.tool_parsers import ToolParser

_TOOL_ROLE = re.compile(r"""['"]tool['"]""")


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # as the client sent it: the template shows it verbatim


def chat_text(
    tokenizer: Any,
    messages: list[ChatMessage],
    tools: list[Tool] | None,
    parser: ToolParser,
    add_generation_prompt: bool = True,
) -> str:
    template = tokenizer.chat_template or ""
    knows_tools = "tools" in template
    knows_calls = "tool_calls" in template
    knows_tool_role = bool(_TOOL_ROLE.search(template))
    msgs: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        d["content"] = m.text()
        if m.name is not None:
            d["name"] = m.name
        if m.role == "assistant" and m.tool_calls:
            calls = [
                {"name": c.function.name, "arguments": _arguments(c.function.arguments)}
                for c in m.tool_calls
            ]
            if knows_calls:
                d["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": call}
                    for c, call in zip(m.tool_calls, calls)
                ]
            else:
                text = parser.render_calls(calls)
                d["content"] = f"{d['content']}\n{text}" if d["content"] else text
        if m.role == "tool":
            if knows_tool_role:
                if m.tool_call_id is not None:
                    d["tool_call_id"] = m.tool_call_id
            else:
                d = {"role": "user", "content": parser.render_result(m.text())}
        msgs.append(d)
    kw: dict[str, Any] = {}
    if tools:
        specs = [t.model_dump(exclude_none=True) for t in tools]
        if knows_tools:
            kw["tools"] = specs
        else:
            intro = parser.system_prompt(specs)
            if msgs and msgs[0]["role"] == "system":
                msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{intro}".strip()}
            else:
                msgs.insert(0, {"role": "system", "content": intro})
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, **kw)
