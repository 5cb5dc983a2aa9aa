"""Tool-call formats without a server: each parser reads its format (and leaves text that is
not a call alone), streams it with the call held back, and its grammar accepts a call in
that format and nothing else; chat templates receive tools, or tools as text."""

import json

import llguidance as llg
import pytest

from kvgrid.server.chat_prompt import chat_text
from kvgrid.server.protocol import ChatMessage, Tool
from kvgrid.server.tool_parsers import ToolCallStream, get_parser

WEATHER = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}

# (parser, text with calls, content before them, the calls as (name, arguments))
CASES = [
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me check.",
        [("get_weather", {"city": "Oslo"}), ("get_time", {})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
        '{"name": "get_time", "parameters": {}}',
        None,
        [("get_weather", {"city": "Oslo"}), ("get_time", {})],
    ),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
        None,
        [("get_weather", {"city": "Oslo"})],
    ),
    (  # the marker is a special token: skipped in the text, the array stands alone
        "mistral",
        '[{"name": "get_time", "arguments": "{}"}]',
        None,
        [("get_time", {})],
    ),
]


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_parsers_read_their_format(name, text, content, calls):
    got_content, got = get_parser(name).extract(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert all(c.id.startswith("call_") for c in got) and len({c.id for c in got}) == len(got)


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral"])
def test_text_that_is_not_a_call_stays_content(name):
    p = get_parser(name)
    for text in ("The weather is fine.", '{"answer": 42}', "<tool_call>\n{broken json"):
        content, calls = p.extract(text)
        assert calls == [] and content == text


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_streamed_text_holds_back_the_calls(name, text, content, calls):
    stream = ToolCallStream(get_parser(name))
    sent = "".join(stream.feed(text[i : i + 3]) for i in range(0, len(text), 3))
    rest, got = stream.finish()
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert (sent + rest).strip() == (content or "")  # the call's text never went out
    plain = ToolCallStream(get_parser(name))
    text = "It is sunny. { not a call"
    assert "".join(plain.feed(ch) for ch in text) + plain.finish()[0] == text


@pytest.fixture(scope="module")
def llt(default_model_dir):
    from kvgrid.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(default_model_dir)
    return tok, llg.LLTokenizer(tok.backend_json(), n_vocab=tok.vocab_size, eos_token=[2])


@pytest.mark.parametrize(
    "name, parallel", [("hermes", True), ("llama3_json", True), ("mistral", False)]
)
def test_grammars_accept_a_call_and_nothing_else(llt, name, parallel):
    tok, lltok = llt
    p = get_parser(name)
    grammar = llg.LLMatcher.grammar_from_lark(p.grammar([WEATHER, TIME], parallel))
    good = p.render_calls([{"name": "get_weather", "arguments": {"city": "Oslo"}}])
    good = good.removeprefix("[TOOL_CALLS] ")  # a special token: forced calls go without
    bad = [
        p.render_calls([{"name": "get_weather", "arguments": {"town": "Oslo"}}]),  # schema
        p.render_calls([{"name": "get_news", "arguments": {}}]),  # no such tool
        "Sure, here is the weather.",
    ]
    m = llg.LLMatcher(lltok, grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    assert m.consume_tokens(tok.encode(good, add_special_tokens=False)) and m.is_accepting()
    _, calls = p.extract(good)
    assert [c.name for c in calls] == ["get_weather"]
    for text in bad:
        m = llg.LLMatcher(lltok, grammar, log_level=0)
        ids = tok.encode(text, add_special_tokens=False)
        assert not (m.consume_tokens(ids) and m.is_accepting()), text


def test_auto_detection_from_the_vocabulary():
    class Vocab:
        def __init__(self, *tokens):
            self.tokens = tokens

        def token_id(self, t):
            return 7 if t in self.tokens else None

    assert get_parser("auto", Vocab("<|python_tag|>")).name == "llama3_json"
    assert get_parser("auto", Vocab("[TOOL_CALLS]")).name == "mistral"
    assert get_parser("auto", Vocab()).name == "hermes"
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_parser("xml")


class TemplateTok:
    """A tokenizer stand-in that renders with a given chat template."""

    def __init__(self, template: str):
        from kvgrid.models.tokenizer import _jinja_env

        self.chat_template = template
        self._t = _jinja_env().from_string(template)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kw):
        return self._t.render(messages=messages, add_generation_prompt=add_generation_prompt, **kw)


HISTORY = [
    ChatMessage(role="user", content="Weather in Oslo?"),
    ChatMessage.model_validate(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        }
    ),
    ChatMessage(role="tool", tool_call_id="call_1", content="12 C"),
]
TOOLS = [Tool.model_validate({"type": "function", "function": WEATHER})]


def test_a_template_that_knows_tools_receives_them():
    tmpl = (
        "{% for t in tools %}TOOL {{ t.function.name }};{% endfor %}"
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} "
        "{{ c.function.arguments.city }}{% endfor %}"
        "{% if m.role == 'tool' %}({{ m.tool_call_id }}){% endif %}{% endfor %}"
    )
    text = chat_text(TemplateTok(tmpl), HISTORY, TOOLS, get_parser("hermes"))
    # arguments arrive as an object, the tool message with its call id
    assert text == "TOOL get_weather;[user]Weather in Oslo?[assistant]CALL get_weather Oslo" \
        "[tool]12 C(call_1)"  # fmt: skip


def test_a_template_that_knows_no_tools_gets_them_as_text():
    tmpl = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    text = chat_text(TemplateTok(tmpl), HISTORY, TOOLS, get_parser("hermes"))
    assert text.startswith("<system>") and '"name": "get_weather"' in text
    assert '<assistant><tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text
    assert text.endswith("<user><tool_response>\n12 C\n</tool_response>")
