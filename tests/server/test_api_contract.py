"""What the API promises about requests, against a live `kvgrid serve`: every field it does
not implement is refused by name, metadata fields are accepted, malformed bodies get a 400
(never a 500), and /openapi.json tells the truth (schemathesis checks it against the
server). The server is shared (conftest.api_server)."""

import time

import httpx
import pytest

CHAT = "/v1/chat/completions"
DONE = "/v1/completions"
MSGS = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# (path, extra body fields, the field the 400 must name)
REFUSED = [
    (CHAT, {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    (CHAT, {"modalities": ["text", "audio"]}, "modalities"),
    (CHAT, {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    (CHAT, {"reasoning_effort": "high"}, "reasoning_effort"),
    (CHAT, {"verbosity": "low"}, "verbosity"),
    (CHAT, {"web_search_options": {}}, "web_search_options"),
    (CHAT, {"functions": [TOOL["function"]]}, "functions"),
    (CHAT, {"function_call": "auto"}, "function_call"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    (CHAT, {"frobnicate": 1}, "frobnicate"),  # unknown: refused, as OpenAI does
    (DONE, {"suffix": "end"}, "suffix"),
    (DONE, {"best_of": 3}, "best_of"),
    (DONE, {"audio": {"voice": "alloy"}}, "audio"),
    (DONE, {"temperature_x": 1}, "temperature_x"),
]
# neutral values of unsupported fields, and fields that only carry metadata
ACCEPTED = [
    (CHAT, {"modalities": ["text"], "reasoning_effort": None, "audio": None}),
    (CHAT, {"user": "u1", "metadata": {"k": "v"}, "store": True, "service_tier": "auto"}),
    (CHAT, {"prompt_cache_key": "conv-1", "safety_identifier": "s-1", "parallel_tool_calls": None}),
    (DONE, {"suffix": "", "best_of": 1, "user": "u1"}),
]


def _body(path: str, extra: dict) -> dict:
    base = {"messages": MSGS} if path == CHAT else {"prompt": "Hi"}
    return {**base, "max_tokens": 1, **extra}


@pytest.mark.parametrize("path, extra, field", REFUSED, ids=[r[2] for r in REFUSED])
def test_unimplemented_fields_are_refused_by_name(api_server, path, extra, field):
    url, h = api_server
    r = httpx.post(url + path, json=_body(path, extra), headers=h, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and err["param"] == field, err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("path, extra", ACCEPTED)
def test_metadata_and_neutral_values_are_accepted(api_server, path, extra):
    url, h = api_server
    r = httpx.post(url + path, json=_body(path, extra), headers=h, timeout=60)
    assert r.status_code == 200, r.text


def _deep(n: int) -> str:
    return "[" * n + "]" * n


# raw bodies (bytes) or JSON bodies, each a 400 whose message holds the needle
MALFORMED = [
    (
        "text part not a string",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        "string",
    ),
    (
        "image part",
        CHAT,
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        "text",
    ),
    ("lone surrogate", DONE, b'{"prompt": "ab\\ud800cd"}', "surrogate"),
    (
        "lone surrogate in chat",
        CHAT,
        b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
        "surrogate",
    ),
    (
        "deeply nested",
        DONE,
        ('{"prompt": "x", "metadata": ' + _deep(100000) + "}").encode(),
        "nest",
    ),
    ("nested 100", CHAT, ('{"messages": [], "x": ' + _deep(100) + "}").encode(), "nest"),
    ("seed above 64 bits", DONE, {"prompt": "x", "seed": 2**64}, "seed"),
    ("seed below 64 bits", DONE, {"prompt": "x", "seed": -(2**63) - 1}, "seed"),
    ("NaN", DONE, b'{"prompt": "x", "temperature": NaN}', "json"),
    ("Infinity", DONE, b'{"prompt": "x", "top_p": Infinity}', "json"),
    ("not utf-8", DONE, b'{"prompt": "\xff\xfe"}', "json"),
    ("not an object", DONE, b"[1, 2]", "object"),
    ("empty", DONE, b"", "json"),
    ("string number", DONE, {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("bool as int", DONE, {"prompt": "x", "n": True}, "n"),
    ("n 0", DONE, {"prompt": "x", "n": 0}, "n"),
    ("n 1000", DONE, {"prompt": "x", "n": 1000}, "n"),
    ("logprobs 21", DONE, {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("bad role", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ("no messages", CHAT, {"messages": []}, "messages"),
    ("two prompts", DONE, {"prompt": ["a", "b"]}, "one prompt"),
    ("token id out of vocab", DONE, {"prompt": [10**8]}, "vocabulary"),
    ("negative token id", DONE, {"prompt": [-1]}, "vocabulary"),
    ("context overflow", DONE, {"prompt": "x", "max_tokens": 10**9}, "context"),
    ("stop not strings", DONE, {"prompt": "x", "stop": [1]}, "stop"),
    ("logit_bias key", DONE, {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("logit_bias value", DONE, {"prompt": "x", "logit_bias": {"5": 500}}, "logit_bias"),
    (
        "schema missing",
        CHAT,
        {"messages": MSGS, "response_format": {"type": "json_schema"}},
        "schema",
    ),
    ("bad regex", DONE, {"prompt": "x", "guided_regex": "[0-9"}, "regex"),
    ("bad schema", DONE, {"prompt": "x", "guided_json": {"type": "objectx"}}, "objectx"),
    ("guided_json not JSON", DONE, {"prompt": "x", "guided_json": "{oops"}, "guided_json"),
    (
        "two guided fields",
        DONE,
        {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]},
        "only one",
    ),
    ("tool_choice without tools", CHAT, {"messages": MSGS, "tool_choice": "required"}, "tools"),
    (
        "named tool missing",
        CHAT,
        {
            "messages": MSGS,
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "'g'",
    ),
    ("duplicate tool names", CHAT, {"messages": MSGS, "tools": [TOOL, TOOL]}, "unique"),
    (
        "bad function name",
        CHAT,
        {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "a b"}}]},
        "name",
    ),
    ("max_tokens 0 without echo", DONE, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("temperature", DONE, {"prompt": "x", "temperature": -1}, "temperature"),
]


@pytest.mark.parametrize(
    "path, body, needle", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_bodies_are_400_and_say_why(api_server, path, body, needle):
    url, h = api_server
    if isinstance(body, dict):
        r = httpx.post(url + path, json=body, headers=h, timeout=60)
    else:
        r = httpx.post(
            url + path, content=body, headers={**h, "content-type": "application/json"}, timeout=60
        )
    assert r.status_code == 400, r.text
    assert needle.lower() in r.json()["error"]["message"].lower(), r.text


def test_openapi_documents_the_public_api_only(api_server):
    url, _ = api_server
    spec = httpx.get(f"{url}/openapi.json").json()
    public = {"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"}
    assert set(spec["paths"]) == public | {"/v1/models", "/health", "/metrics"}
    schemas = spec["components"]["schemas"]
    for path in public:
        op = spec["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[1] in schemas
        assert {"200", "400", "401", "429", "503"} <= set(op["responses"])
        err = op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert err.endswith("/ErrorResponse")
    chat = schemas["ChatCompletionRequest"]
    for field in ("tools", "tool_choice", "response_format", "n", "logprobs", "logit_bias", "seed"):
        assert field in chat["properties"], field
    assert chat.get("additionalProperties") is False  # unknown fields are refused


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(api_server):
    """Schemathesis generates bodies from /openapi.json: malformed ones (negative) must get
    a 4xx, valid ones must not crash; every answer must be documented and match its
    schema. Valid bodies are held to 2 tokens and 2 choices so that they stay quick."""
    import hypothesis
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    url, h = api_server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    seen: dict[str, set[int]] = {}
    slow: list = []
    generated: list[float] = []

    def fuzz(op, mode, examples):
        @hypothesis.settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.generate],
        )
        @hypothesis.given(op.as_strategy(generation_mode=mode))
        def run(case):
            b = case.body
            if isinstance(b, dict) and "v1" in op.path:
                # without a limit a body generates up to the context (2048 tokens); capping
                # large counts keeps a malformed body malformed (the schema has no maximum)
                for k in ("max_tokens", "max_completion_tokens"):
                    v = b.get(k)
                    if (v is None and k == "max_tokens") or (isinstance(v, int) and v > 2):
                        b[k] = 2
                if mode is GenerationMode.POSITIVE and isinstance(b.get("n"), int):
                    b["n"] = min(b["n"], 2)
                case.body = b
            t0 = time.monotonic()
            generated.append(t0)
            resp = case.call_and_validate(base_url=url, headers=h, checks=checks, timeout=300)
            seen.setdefault(f"{op.path} {mode.value}", set()).add(resp.status_code)
            if time.monotonic() - t0 > 10:
                slow.append((round(time.monotonic() - t0, 1), op.path, str(case.body)[:300]))

        run()

    for result in schema.get_all_operations():
        op = result.ok()
        if op.method.upper() == "POST":
            fuzz(op, GenerationMode.NEGATIVE, 40)
            fuzz(op, GenerationMode.POSITIVE, 15)
    print("status codes seen:", seen, "slow cases:", slow, "cases:", len(generated))
    assert all(s < 500 for codes in seen.values() for s in codes), seen
    assert any(400 in codes for codes in seen.values())
