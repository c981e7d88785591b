"""Structured output and tools on the OpenAI API, on the tiny random model (whatever it prefers, the constraint
decides): forced tool calls come back the same whole and streamed, and validate; bad constraints and tools are 400s
whose `param` names the field (the engine's compile errors included), and the server serves the next request;
`tool_choice: "auto"` on a model whose template renders tools reads the calls in the model's own format."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from common.stack import Ports, Stack
from tests.helpers import openai_client
from tests.integration.test_lifecycle import scrape
from tests.integration.test_openai import post
from tests.unit.test_tool_calls import HERMES_TEMPLATE

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(tiny_stack) -> openai.OpenAI:
    return openai_client(tiny_stack)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_forced_calls_are_the_same_whole_and_streamed(client, model, tiny_stack, tool_choice):
    mode = "required" if tool_choice == "required" else "named"
    label = f'splitserve_tool_call_requests_total{{tool_choice="{mode}"}}'
    counted = scrape(tiny_stack.ports.gateway_http).get(label, 0)
    kwargs = dict(model=model, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, temperature=0,
                  max_tokens=96, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    [call] = whole.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert tool_choice == "required" or call.function.name == "get_weather"
    if call.function.name == "get_weather":
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    pieces, finish_reasons = [], []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        assert not delta.content
        pieces += delta.tool_calls or []
        finish_reasons.append(chunk.choices[0].finish_reason)
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == call.function.name
    assert all(piece.index == 0 and piece.id is None for piece in pieces[1:]) and len(pieces) >= 2
    assert "".join(piece.function.arguments or "" for piece in pieces) == call.function.arguments
    assert finish_reasons[-1] == "tool_calls"
    assert scrape(tiny_stack.ports.gateway_http)[label] == counted + 2


def test_tool_calls_and_results_are_accepted_back(client, model):
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": '{"city": "Oslo", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"celsius": 3}'}]
    reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=4, temperature=0)
    assert reply.choices[0].message.tool_calls is None and reply.usage.prompt_tokens > 40


BAD_TOOLS = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}]},
     "tools[0].function.parameters", "JSON Schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice",
     "not in tools"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)], "tool_choice": "required"},
     "tools", "at most 128"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}], "tool_choice": "required"},
     "tools[0].function.name", "64"),
    ({"tools": TOOLS}, "tool_choice", "no tool support"),           # auto: SmolLM2's template renders no tools
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema", "structured_output"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nope"}}}},
     "response_format.json_schema.schema", "structured_output"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "structured_output"),
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar", "structured_output"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools", "structured_output"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex", "several"),
]


@pytest.mark.parametrize("extra,param,words", BAD_TOOLS, ids=[case[1] + ":" + case[2] for case in BAD_TOOLS])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_bad_constraints_and_tools_are_400_naming_the_field(tiny_stack, extra, param, words, stream):
    status, reply = post(tiny_stack, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4,
                                                              "stream": stream, **extra})
    assert status == 400, reply
    assert reply["error"]["param"] == param and words in reply["error"]["message"], reply
    ok_status, ok = post(tiny_stack, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
    assert ok_status == 200 and ok["choices"][0]["message"]["content"] is not None


# ---- tool_choice "auto" on a model whose template renders tools (Hermes / Qwen format) ------------------------

@pytest.fixture(scope="module")
def hermes_client(tiny_stack, tiny_model_dir, tmp_path_factory) -> Iterator[openai.OpenAI]:
    """The tiny model's engine behind its own tokenizer and gateway, the tokenizer reading a Hermes-style template."""
    folder = tmp_path_factory.mktemp("hermes-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, folder / name)
    (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    stack = Stack(model=str(folder), ports=Ports.free(), log_dir=tmp_path_factory.mktemp("hermes-logs"),
                  engine_address=tiny_stack.address("engine"))
    stack.start_service("tokenizer", timeout=120)
    stack.start_service("gateway", timeout=120)
    yield openai_client(stack)
    stack.stop()


# The random model writes what the choice constraint allows: a call in the model's format, or plain text.
CALL_TEXT = 'Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_auto_reads_calls_in_the_models_own_format(hermes_client, streamed):
    model = hermes_client.models.list().data[0].id
    kwargs = dict(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=64, temperature=0)
    if streamed:
        with hermes_client.chat.completions.stream(**kwargs, extra_body={"guided_choice": [CALL_TEXT]}) as stream:
            final = stream.get_final_completion()
    else:
        final = hermes_client.chat.completions.create(**kwargs, extra_body={"guided_choice": [CALL_TEXT]})
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo", "days": 2}
    plain = hermes_client.chat.completions.create(**kwargs, extra_body={"guided_choice": ["No call needed."]})
    assert plain.choices[0].message.content == "No call needed." and plain.choices[0].message.tool_calls is None
    assert plain.choices[0].finish_reason == "stop"
    # The template rendered the tools into the prompt (tool_choice "none" leaves them out).
    without = hermes_client.chat.completions.create(**kwargs, tool_choice="none", extra_body={"guided_choice": ["x"]})
    assert plain.usage.prompt_tokens > without.usage.prompt_tokens + 20
