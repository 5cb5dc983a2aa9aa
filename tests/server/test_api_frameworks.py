"""Agent frameworks no one here wrote, against a live `kvgrid serve` with the default model:
openai-agents (a tool-using agent over two steps, a structured-output agent) and
LangChain's ChatOpenAI (bind_tools, with_structured_output). The server is shared
(conftest.api_server)."""

import asyncio

import pytest
from pydantic import BaseModel


class City(BaseModel):
    name: str
    country: str
    population: int


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def model_name(api_server):
    import httpx

    url, h = api_server
    return httpx.get(f"{url}/v1/models", headers=h).json()["data"][0]["id"]


def test_openai_agents_tool_agent_and_structured_output(api_server, model_name):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    url, h = api_server
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 C in {city}."

    async def main():
        key = h["Authorization"].split()[1]
        async with AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client:
            model = OpenAIChatCompletionsModel(model=model_name, openai_client=client)
            # step 1 must call the tool (required); the agent then resets tool_choice and
            # step 2 answers from the tool's result
            tool_agent = Agent(
                name="weather",
                instructions="Answer weather questions with the get_weather tool.",
                tools=[get_weather],
                model=model,
                model_settings=ModelSettings(tool_choice="required", max_tokens=60, temperature=0),
            )
            first = await Runner.run(tool_agent, "What is the weather in Paris?", max_turns=4)
            facts = Agent(
                name="facts",
                instructions="Reply with facts about the city.",
                output_type=City,
                model=model,
                model_settings=ModelSettings(max_tokens=80, temperature=0),
            )
            second = await Runner.run(facts, "Tell me about Paris.", max_turns=2)
            return first, second

    first, second = asyncio.run(main())
    assert calls and calls[0]  # the fake tool ran, with a city
    kinds = [item.type for item in first.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"], kinds
    assert kinds[-1] == "message_output_item" and isinstance(first.final_output, str)
    assert len(first.raw_responses) == 2  # two model calls: the tool call, the answer
    assert isinstance(second.final_output, City)


def test_langchain_bind_tools_and_structured_output(api_server, model_name):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    url, h = api_server
    llm = ChatOpenAI(
        base_url=f"{url}/v1",
        api_key=h["Authorization"].split()[1],
        model=model_name,
        max_tokens=60,
        temperature=0,
        max_retries=0,
    )

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    named = llm.bind_tools([multiply], tool_choice="multiply").invoke("What is 6 times 7?")
    (call,) = named.tool_calls
    assert call["name"] == "multiply" and set(call["args"]) == {"a", "b"}
    assert named.response_metadata["finish_reason"] == "tool_calls"
    any_tool = llm.bind_tools([multiply], tool_choice="any")
    chunks = list(any_tool.stream("What is 3 times 4?"))
    whole = chunks[0]
    for c in chunks[1:]:
        whole = whole + c
    assert [c["name"] for c in whole.tool_calls] == ["multiply"]
    assert all(isinstance(v, int) for v in whole.tool_calls[0]["args"].values())
    for method in ("json_schema", "function_calling", "json_mode"):
        got = llm.with_structured_output(Person, method=method).invoke(
            "Invent a person. Reply in JSON with keys name and age."
        )
        assert isinstance(got, Person), method
