"""The OpenAI SDK against a live `kvgrid serve` with the default model: tool calls,
structured output, n, logprobs, echo, penalties, logit_bias, seeds, /tokenize; each
streamed and not. The server is shared (conftest.api_server)."""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string"}},
            "required": ["tz"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(api_server):
    url, headers = api_server
    key = headers["Authorization"].split()[1]
    c = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)
    return c, c.models.list().data[0].id


def _check_call(call, tools):
    fn = {t["function"]["name"]: t["function"] for t in tools}[call.function.name]
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])


def _streamed(stream):
    """(content, tool calls as (name, arguments), finish reason) of a streamed choice 0."""
    content, calls, finish = "", {}, None
    for ch in stream:
        for c in ch.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, ["", ""])
                entry[0] += tc.function.name or ""
                entry[1] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    return content, [tuple(v) for _, v in sorted(calls.items())], finish


def test_tool_choice_required_named_auto_none(client):
    c, model = client
    tools = [WEATHER, TIME]
    kw = dict(model=model, messages=ASK, tools=tools, max_tokens=60, temperature=0)
    named = {"type": "function", "function": {"name": "get_time"}}
    short = dict(kw, max_tokens=20)
    asks = {  # independent requests: sent at once, the server batches them
        "required": lambda: c.chat.completions.create(tool_choice="required", **kw),
        "named": lambda: c.chat.completions.create(tool_choice=named, **kw),
        "named_stream": lambda: _streamed(
            c.chat.completions.create(tool_choice=named, stream=True, **kw)
        ),
        "parallel": lambda: c.chat.completions.create(
            tool_choice="required", parallel_tool_calls=True, **kw
        ),
        "auto": lambda: c.chat.completions.create(tool_choice="auto", **short),
        "none": lambda: c.chat.completions.create(tool_choice="none", **short),
    }
    with ThreadPoolExecutor(len(asks)) as pool:
        futures = {k: pool.submit(f) for k, f in asks.items()}
        got = {k: f.result() for k, f in futures.items()}
    ch = got["required"].choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
    _check_call(ch.message.tool_calls[0], tools)
    call = got["named"].choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    _check_call(call, tools)
    # streamed: the same call, in deltas, with finish_reason tool_calls
    content, calls, finish = got["named_stream"]
    assert finish == "tool_calls" and calls == [("get_time", call.function.arguments)]
    assert content == ""
    # several calls only when asked for
    assert got["parallel"].choices[0].finish_reason in ("tool_calls", "length")
    # auto: the model may answer or call; whatever it writes is parsed, never lost
    m = got["auto"].choices[0].message
    assert (m.tool_calls and got["auto"].choices[0].finish_reason == "tool_calls") or m.content
    m = got["none"].choices[0].message
    assert m.tool_calls is None and m.content


def test_tool_results_next_turn_and_streamed_auto(client):
    c, model = client
    first = c.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=80,
        temperature=0,
    )
    call = first.choices[0].message.tool_calls[0]
    msgs = ASK + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    # the model's own template receives the history; auto lets it answer in text
    r = c.chat.completions.create(model=model, messages=msgs, tools=[WEATHER], max_tokens=30)
    assert r.choices[0].message.content or r.choices[0].message.tool_calls
    content, _, finish = _streamed(
        c.chat.completions.create(
            model=model, messages=msgs, tools=[WEATHER], max_tokens=30, stream=True, temperature=0
        )
    )
    whole = c.chat.completions.create(
        model=model, messages=msgs, tools=[WEATHER], max_tokens=30, temperature=0
    )
    assert content == (whole.choices[0].message.content or "")
    assert finish == whole.choices[0].finish_reason


def test_response_format_and_guided_fields(client):
    c, model = client
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    rf = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": schema, "strict": True},
    }
    msgs = [{"role": "user", "content": "Invent a person."}]
    kw = dict(model=model, messages=msgs, max_tokens=120, seed=1, temperature=0.7)
    r = c.chat.completions.create(response_format=rf, **kw)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    parts = [
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(response_format=rf, stream=True, **kw)
        if ch.choices
    ]
    jsonschema.validate(json.loads("".join(parts)), schema)
    r = c.chat.completions.create(response_format={"type": "json_object"}, **kw)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = c.completions.create(
        model=model, prompt="Phone:", max_tokens=20, extra_body={"guided_regex": r"\d{3}-\d{4}"}
    )
    assert len(r.choices[0].text) == 8 and r.choices[0].text[3] == "-"
    r = c.chat.completions.create(
        model=model, messages=msgs, max_tokens=5, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert r.choices[0].message.content in ("yes", "no")


def test_n_logprobs_and_seeds(client):
    c, model = client
    kw = dict(model=model, messages=ASK, max_tokens=6, n=3, seed=5, logprobs=True, top_logprobs=2)
    r = c.chat.completions.create(**kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    for ch in r.choices:
        lps = ch.logprobs.content
        assert 1 <= len(lps) <= 6 and all(len(e.top_logprobs) == 2 for e in lps)
        assert "".join(e.token for e in lps) == ch.message.content
        assert all(e.logprob <= 0 and e.top_logprobs[0].logprob >= e.logprob for e in lps)
    assert r.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in r.choices)
    again = c.chat.completions.create(**kw)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in r.choices]
    texts = {i: "" for i in range(3)}
    for ch in c.chat.completions.create(stream=True, **kw):
        for part in ch.choices:
            texts[part.index] += part.delta.content or ""
    assert list(texts.values()) == [ch.message.content for ch in r.choices]


def test_completions_echo_and_prompt_logprobs(client):
    c, model = client
    prompt = "The capital of France is"
    r = c.completions.create(model=model, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    ch = r.choices[0]
    assert ch.text == prompt and r.usage.completion_tokens == 0
    lp = ch.logprobs
    assert lp.token_logprobs[0] is None and all(v < 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == prompt and lp.text_offset[0] == 0
    r = c.completions.create(
        model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=4, temperature=0
    )
    assert r.choices[0].text.startswith(prompt) and len(r.choices[0].logprobs.tokens) > 4
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=model, prompt=prompt, echo=True, max_tokens=4, temperature=0, stream=True
        )
        if ch.choices
    )
    assert streamed == r.choices[0].text


def test_penalties_and_logit_bias_change_the_output(client, api_server):
    c, model = client
    url, h = api_server
    kw = dict(model=model, prompt="apple, apple, apple,", max_tokens=12, temperature=0)
    base = c.completions.create(**kw).choices[0].text
    pen = c.completions.create(frequency_penalty=2.0, presence_penalty=1.0, **kw).choices[0].text
    rep = c.completions.create(extra_body={"repetition_penalty": 1.5}, **kw).choices[0].text
    assert pen != base and rep != base
    assert base.count("apple") > pen.count("apple")
    tok = httpx.post(
        f"{url}/tokenize", json={"prompt": " banana", "add_special_tokens": False}, headers=h
    )
    (banana,) = tok.json()["tokens"]
    r = c.completions.create(logit_bias={str(banana): 100}, **{**kw, "max_tokens": 3})
    assert r.choices[0].text == " banana" * 3


def test_tokenize_and_detokenize(api_server):
    url, h = api_server
    r = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world"}, headers=h).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == 2048
    back = httpx.post(f"{url}/detokenize", json={"tokens": r["tokens"]}, headers=h).json()
    assert back["prompt"] == "Hello world"
    chat = httpx.post(f"{url}/tokenize", json={"messages": ASK}, headers=h).json()
    assert chat["count"] > r["count"]
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [10**7]}, headers=h)
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
    assert httpx.post(f"{url}/tokenize", json={"prompt": "x"}).status_code == 401


def _obj(props: dict, required=None) -> dict:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


# nested objects, enums, arrays, numbers; short, so that 100 answers stay quick on a CPU
SCHEMAS = {
    "person": _obj(
        {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "maxLength": 20},
        },
        required=["name", "age"],
    ),
    "order": _obj(
        {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 2,
                "items": _obj(
                    {
                        "sku": {"enum": ["A1", "B2", "C3"]},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    }
                ),
            },
            "status": {"enum": ["new", "paid", "sent"]},
        }
    ),
    "place": _obj(
        {
            "pos": _obj(
                {
                    "lat": {"type": "number", "minimum": -90, "maximum": 90},
                    "lon": {"type": "number", "minimum": -180, "maximum": 180},
                }
            ),
            "kind": {"enum": ["city", "park", "lake"]},
        }
    ),
    "review": _obj(
        {
            "ok": {"type": "boolean"},
            "score": {"type": "number", "minimum": 0, "maximum": 5},
            "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["fast", "cheap", "good"]}},
        }
    ),
}


def test_100_of_100_json_schema_answers_validate(api_server):
    """The default model under guided decoding: 4 schemas x 5 requests x n=5, sampled."""
    url, h = api_server
    key = h["Authorization"].split()[1]

    async def main():
        async with openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600
        ) as c:
            model = (await c.models.list()).data[0].id
            jobs = []
            for name, schema in SCHEMAS.items():
                rf = {
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": schema, "strict": True},
                }
                for i in range(5):
                    msgs = [{"role": "user", "content": f"Give an example {name} as JSON (#{i})."}]
                    jobs.append(
                        c.chat.completions.create(
                            model=model,
                            messages=msgs,
                            response_format=rf,
                            n=5,
                            temperature=0.8,
                            seed=100 + i,
                            max_tokens=300,
                        )
                    )
            return list(zip([n for n in SCHEMAS for _ in range(5)], await asyncio.gather(*jobs)))

    answers = asyncio.run(main())
    print("completion tokens:", sum(r.usage.completion_tokens for _, r in answers))
    checked = 0
    for name, r in answers:
        for ch in r.choices:
            assert ch.finish_reason == "stop", ch
            jsonschema.validate(json.loads(ch.message.content), SCHEMAS[name])
            checked += 1
    assert checked == 100
