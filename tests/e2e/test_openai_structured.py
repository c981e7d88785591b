"""Structured output and tools through OpenAI's API on SmolLM2, driven by the official `openai` SDK and LangChain,
as applications use them: `chat.completions.parse(response_format=<pydantic model>)` on 20 schemas, streamed and
not, greedy and sampled with 5 seeds, every output valid against its schema; regex, choice and grammar
constraints; forced tool calls (`required`, a named function) whose arguments validate against the function's
parameters; a whole tool round trip (call -> tool result -> answer); LangChain's `bind_tools`. Requests are sent
concurrently: the engine batches them."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Annotated, Literal, Optional

import jsonschema
import openai
import pytest
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field

from common.stack import Stack
from tests.conftest import start_stack
from tests.helpers import openai_client

pytestmark = pytest.mark.e2e

MAX_TOKENS = 160
SEEDS = range(5)


# ---- 20 schemas: nested objects, arrays, enums, bounded numbers, optional fields, strings with patterns ---------

class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class City(BaseModel):
    name: str = Field(max_length=12)
    population: int = Field(ge=0, le=10_000_000)


class Point(BaseModel):
    x: float = Field(ge=-100, le=100)
    y: float = Field(ge=-100, le=100)


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


class Switch(BaseModel):
    enabled: bool


class Tags(BaseModel):
    tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=3)


class Address(BaseModel):
    street: str = Field(max_length=12)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=10)
    address: Address


class Palette(BaseModel):
    favourite: Colour
    others: list[Colour] = Field(max_length=2)


class Rating(BaseModel):
    stars: int = Field(ge=1, le=5)
    comment: Optional[str] = Field(default=None, max_length=10)


class Product(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{3}$")
    price: float = Field(ge=0, le=1000)


class Grid(BaseModel):
    rows: list[Annotated[list[Annotated[int, Field(ge=0, le=9)]], Field(max_length=3)]] = Field(max_length=2)


class Date(BaseModel):
    day: int = Field(ge=1, le=31)
    month: Literal["jan", "feb", "mar", "apr"]
    year: int = Field(ge=1900, le=2100)


class Member(BaseModel):
    name: str = Field(max_length=8)
    role: Literal["lead", "dev"]


class Team(BaseModel):
    members: list[Member] = Field(max_length=2)


class Email(BaseModel):
    address: str = Field(pattern=r"^[a-z]{1,8}@[a-z]{1,8}\.com$")


class Temperature(BaseModel):
    celsius: float = Field(ge=-50, le=60)
    unit: Literal["C"]


class Book(BaseModel):
    title: str = Field(max_length=12)
    year: int = Field(ge=1500, le=2025)
    isbn: str = Field(pattern=r"^[0-9]{3}-[0-9]{4}$")


class Item(BaseModel):
    name: str = Field(max_length=8)
    count: int = Field(ge=0, le=99)


class Inventory(BaseModel):
    items: list[Item] = Field(max_length=2)
    total: int = Field(ge=0, le=999)


class Verdict(BaseModel):
    yes: bool
    confidence: float = Field(ge=0, le=1)


class Settings(BaseModel):
    mode: Literal["fast", "slow"]
    retries: Optional[int] = Field(default=None, ge=0, le=5)
    verbose: bool


class Leaf(BaseModel):
    label: str = Field(max_length=6)


class Tree(BaseModel):
    label: str = Field(max_length=6)
    children: list[Leaf] = Field(max_length=2)


class Version(BaseModel):
    major: int = Field(ge=0, le=99)
    minor: int = Field(ge=0, le=99)
    tag: Optional[Literal["alpha", "beta"]] = None


SCHEMAS: list[type[BaseModel]] = [City, Point, Pet, Switch, Tags, Person, Palette, Rating, Product, Grid, Date, Team,
                                  Email, Temperature, Book, Inventory, Verdict, Settings, Tree, Version]
# Greedy, then sampled at temperature 1 with 5 seeds.
SETTINGS = [{"temperature": 0.0}] + [{"temperature": 1.0, "seed": seed} for seed in SEEDS]


@pytest.fixture(scope="module")
def smollm2_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack("smollm2", tmp_path_factory.mktemp("smollm2-structured-logs"))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def client(smollm2_stack: Stack) -> openai.OpenAI:
    return openai_client(smollm2_stack)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def concurrently(calls: list, workers: int = 48) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda call: call(), calls))


def ask(schema: type[BaseModel]) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Give an example {schema.__name__} as JSON."}]


@pytest.mark.slow
def test_parse_returns_valid_objects_for_20_schemas_streamed_and_not(client: openai.OpenAI, model: str):
    def parsed(schema: type[BaseModel], settings: dict, streamed: bool):
        def call() -> tuple[BaseModel | None, str]:
            if streamed:
                with client.chat.completions.stream(model=model, messages=ask(schema), response_format=schema,
                                                    max_tokens=MAX_TOKENS, **settings) as stream:
                    completion = stream.get_final_completion()
            else:
                completion = client.chat.completions.parse(model=model, messages=ask(schema), response_format=schema,
                                                           max_tokens=MAX_TOKENS, **settings)
            message = completion.choices[0].message
            return message.parsed, message.content
        return call

    cases = [(schema, settings, streamed) for schema in SCHEMAS for settings in SETTINGS for streamed in (False, True)]
    results = concurrently([parsed(*case) for case in cases])
    for (schema, settings, streamed), (value, content) in zip(cases, results):
        assert isinstance(value, schema), (schema.__name__, settings, streamed, content)
        jsonschema.validate(json.loads(content), to_strict_json_schema(schema))
    # Sampling really sampled: the seeds do not all give the same objects.
    sampled = [content for (_, settings, _), (_, content) in zip(cases, results) if "seed" in settings]
    assert len(set(sampled)) > len(SCHEMAS)


REGEX = r"[A-Z][a-z]{2,7} [0-9]{1,3}"
CHOICES = ["yes", "no", "maybe 🙂"]
ARITHMETIC = """root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= num | "(" num ("*" num){0,2} ")"
num ::= [1-9] [0-9]{0,2}
"""
ARITHMETIC_TEXT = re.compile(r"(?:[1-9][0-9]{0,2}|\([1-9][0-9]{0,2}(?:\*[1-9][0-9]{0,2}){0,2}\))"
                             r"(?:[+-](?:[1-9][0-9]{0,2}|\([1-9][0-9]{0,2}(?:\*[1-9][0-9]{0,2}){0,2}\))){0,3}")


@pytest.mark.parametrize("extra,matches", [
    ({"guided_regex": REGEX}, lambda text: re.fullmatch(REGEX, text)),
    ({"structured_outputs": {"regex": REGEX}}, lambda text: re.fullmatch(REGEX, text)),
    ({"guided_choice": CHOICES}, lambda text: text in CHOICES),
    ({"structured_outputs": {"choice": CHOICES}}, lambda text: text in CHOICES),
    ({"guided_grammar": ARITHMETIC}, lambda text: ARITHMETIC_TEXT.fullmatch(text)),
    ({"response_format": {"type": "json_object"}}, lambda text: isinstance(json.loads(text), dict)),
], ids=["guided_regex", "structured_outputs.regex", "guided_choice", "structured_outputs.choice", "guided_grammar",
        "json_object"])
def test_regex_choice_grammar_and_json_object(client: openai.OpenAI, model: str, extra: dict, matches):
    """Every output that ends by itself matches. "Any JSON object" is unbounded: a sampled one may still be inside a
    string at max_tokens (finish_reason "length", as OpenAI's own), so those are only checked to be an object's
    start, and the greedy ones must finish."""
    def chat(settings: dict, streamed: bool):
        def call() -> tuple[str, str]:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Answer: what is 12 plus 7?"}],
                max_tokens=64, extra_body=extra, stream=streamed, **settings)
            if streamed:
                chunks = [chunk for chunk in reply if chunk.choices]
                return ("".join(c.choices[0].delta.content or "" for c in chunks),
                        next(c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason))
            return reply.choices[0].message.content, reply.choices[0].finish_reason
        return call

    def completion() -> tuple[str, str]:
        choice = client.completions.create(model=model, prompt="12 plus 7 is", max_tokens=64, extra_body=extra,
                                           temperature=1.0, seed=3).choices[0]
        return choice.text, choice.finish_reason

    calls = [(settings, chat(settings, streamed)) for settings in SETTINGS[:3] for streamed in (False, True)]
    calls.append(({"temperature": 1.0}, completion))
    replies = concurrently([call for _, call in calls])
    for (settings, _), (text, finish) in zip(calls, replies):
        if finish == "length" and "json_object" in str(extra) and settings["temperature"] > 0:
            assert text.startswith("{"), text
        else:
            assert matches(text), (finish, text)


# ---- tools ------------------------------------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string",
                                                     "pattern": "^[A-Z][a-z]{2,10}/[A-Z][a-z]{2,10}$"}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time in a timezone",
                                           "parameters": TIME}}]
SCHEMA_OF = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = [{"role": "user", "content": "What is the weather in Paris today?"}]


def test_forced_tool_calls_validate_against_the_parameters(client: openai.OpenAI, model: str):
    named = {"type": "function", "function": {"name": "get_weather"}}
    cases = [(choice, streamed, seed) for choice in ("required", named) for streamed in (False, True)
             for seed in range(5)]

    def call(choice, streamed: bool, seed: int):
        def run() -> tuple[list[tuple[str, str, str]], str]:
            kwargs = dict(model=model, messages=QUESTION, tools=TOOLS, tool_choice=choice, max_tokens=MAX_TOKENS,
                          temperature=1.0, seed=seed, parallel_tool_calls=False)
            if not streamed:
                choice_ = client.chat.completions.create(**kwargs).choices[0]
                return [(c.id, c.function.name, c.function.arguments) for c in choice_.message.tool_calls or []], \
                    choice_.finish_reason
            with client.chat.completions.stream(**kwargs) as stream:
                final = stream.get_final_completion().choices[0]
            return [(c.id, c.function.name, c.function.arguments) for c in final.message.tool_calls or []], \
                final.finish_reason
        return run

    results = concurrently([call(*case) for case in cases])
    for (choice, streamed, seed), (calls, finish_reason) in zip(cases, results):
        assert finish_reason == "tool_calls" and len(calls) == 1, (choice, streamed, seed, calls, finish_reason)
        call_id, name, arguments = calls[0]
        assert call_id.startswith("call_")
        if choice != "required":
            assert name == "get_weather"
        jsonschema.validate(json.loads(arguments), SCHEMA_OF[name])


def test_a_tool_round_trip_through_the_sdk(client: openai.OpenAI, model: str):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for streamed in (False, True):
        kwargs = dict(model=model, tools=TOOLS, max_tokens=MAX_TOKENS, temperature=0.0)
        if streamed:
            with client.chat.completions.stream(messages=QUESTION, tool_choice=named, **kwargs) as stream:
                message = stream.get_final_completion().choices[0].message
        else:
            message = client.chat.completions.create(messages=QUESTION, tool_choice=named, **kwargs).choices[0].message
        [call] = message.tool_calls
        arguments = json.loads(call.function.arguments)
        result = {"city": arguments["city"], "celsius": 18, "sky": "clear"}
        conversation = QUESTION + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
        if streamed:
            chunks = list(client.chat.completions.create(messages=conversation, tool_choice="none", stream=True,
                                                         **kwargs))
            answer = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
            finish_reason = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1]
        else:
            final = client.chat.completions.create(messages=conversation, tool_choice="none", **kwargs).choices[0]
            answer, finish_reason = final.message.content, final.finish_reason
        assert answer.strip() and finish_reason in ("stop", "length")


def test_langchain_bind_tools_gets_tool_calls(smollm2_stack: Stack, model: str):
    from langchain_openai import ChatOpenAI

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Current weather in a city.

        Args:
            city: the city's name
            unit: the temperature unit
        """
        return "sunny"

    llm = ChatOpenAI(model=model, base_url=f"http://127.0.0.1:{smollm2_stack.ports.gateway_http}/v1",
                     api_key="unused", temperature=0, max_tokens=MAX_TOKENS, max_retries=0)
    for choice in ("required", "get_weather"):
        bound = llm.bind_tools([get_weather], tool_choice=choice, parallel_tool_calls=False)
        reply = bound.invoke("What is the weather in Oslo?")
        [call] = reply.tool_calls
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        assert isinstance(call["args"]["city"], str) and call["args"]["unit"] in ("celsius", "fahrenheit")

