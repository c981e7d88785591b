"""OpenAI's structured output and tools read into the public request, tools rendered into prompts, and tool calls
read back out of generated text, whole and streamed in any pieces (the integration tests drive them end to end)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from common.models import resolve_model
from gateway.errors import GatewayError
from gateway.openai.reply import Reply
from gateway.openai.request import ParamError, generate_request
from gateway.openai.tool_calls import ToolCallParser
from gateway.pipeline import Chunk
from gateway.validation import Limits, validate
from tokenizer_service.chat_tools import ToolCall, ToolDefinition, template_message
from tokenizer_service.tokenizer import PromptTokenizer

CHAT = {"messages": [{"role": "user", "content": "weather in Paris?"}]}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]


def read(body: dict, chat: bool = True):
    return generate_request(body, chat=chat, request_id="r")


# ---- output constraints -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,kind,value,param", [
    ({"response_format": {"type": "json_object"}}, "json_object", True, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}}},
     "json_schema", WEATHER, "response_format.json_schema.schema"),
    ({"guided_json": json.dumps(WEATHER)}, "json_schema", WEATHER, "guided_json"),
    ({"guided_regex": "[0-9]+"}, "regex", "[0-9]+", "guided_regex"),
    ({"guided_choice": ["yes", "no"]}, "choice", ["yes", "no"], "guided_choice"),
    ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"', "guided_grammar"),
    ({"structured_outputs": {"json": WEATHER}}, "json_schema", WEATHER, "structured_outputs.json"),
    ({"structured_outputs": {"choice": ["a", "b"]}}, "choice", ["a", "b"], "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "a+"}}, "regex", "a+", "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": 'root ::= "x"'}}, "grammar", 'root ::= "x"', "structured_outputs.grammar"),
    ({"structured_outputs": {"json_object": True}}, "json_object", True, "structured_outputs.json_object"),
])
def test_each_way_of_asking_for_a_constraint_reaches_the_proto(body, kind, value, param):
    for chat in (True, False):
        parsed = read({**(CHAT if chat else {"prompt": "hi"}), **body}, chat=chat)
        output = parsed.generate.sampling.structured_output
        assert output.WhichOneof("kind") == kind and parsed.constraint_param == param
        got = getattr(output, kind)
        got = json.loads(got) if kind == "json_schema" else list(got.choices) if kind == "choice" else got
        assert got == value


def test_text_format_asks_for_nothing():
    assert not read({**CHAT, "response_format": {"type": "text"}}).generate.sampling.HasField("structured_output")


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"guided_choice": ["a"], "guided_json": {}}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", 3]}, "guided_choice[1]"),
    ({"guided_regex": 5}, "guided_regex"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ({"tools": {"name": "x"}}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "a string"}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": 7}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 3}}]}]},
     "messages[0].tool_calls[0].function.name"),
])
def test_bad_constraints_and_tools_name_the_field(body, param):
    with pytest.raises(ParamError) as info:
        read({**CHAT, **body})
    assert info.value.param == param


@pytest.mark.parametrize("tools,param", [
    ([{"type": "function", "function": {"name": f"f{i}"}} for i in range(4)], "tools"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}],
     "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"description": "x" * 100}}}],
     "tools[0].function.parameters"),
])
def test_tool_bounds_are_checked_with_the_request(tools, param):
    request = read({**CHAT, "tools": tools}).generate
    with pytest.raises(GatewayError) as info:
        validate(request, Limits(max_tools=3, max_tool_schema_chars=64))
    assert info.value.param == param


def test_tool_choice_modes():
    assert read(CHAT).tool_choice.mode == "none"
    auto = read({**CHAT, "tools": TOOLS})
    assert auto.tool_choice.mode == "auto" and [t.name for t in auto.generate.tools] == ["get_weather", "get_time"]
    assert not auto.generate.sampling.HasField("structured_output")
    none = read({**CHAT, "tools": TOOLS, "tool_choice": "none"})
    assert not none.generate.tools                     # the model is not shown tools it may not call
    named = read({**CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert named.tool_choice.name == "get_weather" and named.constraint_param == "tools"
    assert json.loads(named.generate.sampling.structured_output.json_schema) == WEATHER
    required = read({**CHAT, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    schema = json.loads(required.generate.sampling.structured_output.json_schema)
    assert schema["type"] == "array" and (schema["minItems"], schema["maxItems"]) == (1, 1)
    assert [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]] == [["get_weather"],
                                                                                        ["get_time"]]


def test_tool_calls_and_results_come_back_in_the_conversation():
    body = {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 3}'}], "tools": TOOLS}
    request = validate(read(body).generate, Limits())
    assistant, tool = request.messages[1], request.messages[2]
    assert [(c.id, c.name, json.loads(c.arguments)) for c in assistant.tool_calls] == [
        ("call_1", "get_weather", {"city": "Oslo"})]
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", "call_1", '{"celsius": 3}')


# ---- tools in the prompt ----------------------------------------------------------------------------------------

HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools><|im_end|>
{% endif %}{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}{%- if message.tool_calls %}{%- for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{%- endfor %}{%- endif %}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CONVERSATION = [template_message("user", "weather in Oslo?"),
                template_message("assistant", "", [ToolCall("call_1", "get_weather", '{"city": "Oslo"}')]),
                template_message("tool", '{"celsius": 3}', tool_call_id="call_1")]
DEFINITIONS = [ToolDefinition("get_weather", "Weather of a city", json.dumps(WEATHER))]


@pytest.fixture(scope="module")
def smollm2() -> PromptTokenizer:
    return PromptTokenizer(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def hermes(tmp_path_factory: pytest.TempPathFactory) -> PromptTokenizer:
    folder: Path = tmp_path_factory.mktemp("hermes")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(resolve_model("smollm2")) / name, folder / name)
    (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return PromptTokenizer(str(folder))


def test_a_template_with_tool_support_renders_tools_and_calls(hermes: PromptTokenizer):
    assert hermes.template_renders_tools and hermes.tool_call_format == "hermes"
    text = hermes.backend.decode(hermes.encode_chat(CONVERSATION, DEFINITIONS), skip_special_tokens=False)
    assert '<tools>{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert '<|im_start|>tool\n{"celsius": 3}' in text


def test_without_tool_support_tools_go_into_a_system_message(smollm2: PromptTokenizer):
    assert not smollm2.template_renders_tools and smollm2.tool_call_format == ""
    text = smollm2.backend.decode(smollm2.encode_chat(CONVERSATION, DEFINITIONS), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou can call these functions")
    assert '"name": "get_weather", "description": "Weather of a city"' in text
    assert '<|im_start|>assistant\n[{"name": "get_weather", "arguments": {"city": "Oslo"}}]<|im_end|>' in text
    assert smollm2.encode_chat([("user", "hi")]) == smollm2.encode_chat([template_message("user", "hi")], [])


# ---- tool calls read back -------------------------------------------------------------------------------------

def feed_in_pieces(parser: ToolCallParser, text: str, seed: int) -> tuple[str, list]:
    rng, content, deltas, at = random.Random(seed), "", [], 0
    while at < len(text):
        size = rng.randint(1, 6)
        piece_content, piece_deltas = parser.feed(text[at:at + size])
        content, deltas, at = content + piece_content, deltas + piece_deltas, at + size
    rest, rest_deltas = parser.finish()
    return content + rest, deltas + rest_deltas


def assembled(deltas) -> list[tuple[str, str, str]]:
    """What a client that joins streamed deltas sees: (id, name, arguments) per call index."""
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        if delta.id is not None:
            assert delta.index not in calls and delta.name
            calls[delta.index] = [delta.id, delta.name, ""]
        calls[delta.index][2] += delta.arguments
    return [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("mode,named,text,content,calls", [
    ("named", "get_weather", '{"city": "Paris", "days": 2}', "", [("get_weather", '{"city": "Paris", "days": 2}')]),
    ("json", "", '[{"name": "get_weather", "arguments": {"city": "a}]\\"b", "days": [1, {"x": 2}]}}, '
                 '{"arguments": {}, "name": "get_time"}]', "",
     [("get_weather", '{"city": "a}]\\"b", "days": [1, {"x": 2}]}'), ("get_time", "{}")]),
    ("hermes", "", 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
     "Let me check.", [("get_weather", '{"city": "Oslo"}')]),
    ("hermes", "", '<tool_call>[{"name": "a", "arguments": "{\\"k\\": 1}"}, {"name": "b"}]</tool_call> done <tool',
     " done <tool", [("a", '{"k": 1}'), ("b", "{}")]),
    ("hermes", "", "1 < 2 and <tool_call>not a call</tool_call>", "1 < 2 and <tool_call>not a call</tool_call>", []),
])
def test_tool_calls_are_read_whole_and_streamed_alike(mode, named, text, content, calls):
    whole = ToolCallParser(mode, named)
    got_content = whole.feed(text)[0] + whole.finish()[0]
    assert got_content == content and [(c.name, c.arguments) for c in whole.calls] == calls
    for seed in range(20):
        parser = ToolCallParser(mode, named)
        got_content, deltas = feed_in_pieces(parser, text, seed)
        assert got_content == content
        streamed = assembled(deltas)
        assert [(name, arguments) for _, name, arguments in streamed] == calls
        assert all(call_id.startswith("call_") and len(call_id) == 29 for call_id, _, _ in streamed)


def test_the_reply_carries_tool_calls_and_finish_reason_tool_calls():
    text = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    reply = Reply(True, "chatcmpl-1", "m", logprobs=False, tool_parser=lambda: ToolCallParser("json"))
    for piece in (text[:10], text[10:30], text[30:]):
        reply.add(Chunk(piece, [1]))
    reply.add(Chunk("", [], finish_reason="stop", prompt_tokens=3, completion_tokens=3))
    choice = reply.whole()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}

    streamed = Reply(True, "chatcmpl-2", "m", logprobs=False, tool_parser=lambda: ToolCallParser("json"))
    events = [event for piece in (text[:10], text[10:30], text[30:])
              for event in streamed.deltas(Chunk(piece, [1]), include_usage=False)]
    events += streamed.deltas(Chunk("", [], finish_reason="stop", prompt_tokens=3, completion_tokens=3), False)
    deltas = [event["choices"][0]["delta"] for event in events]
    pieces = [call for delta in deltas for call in delta.get("tool_calls", [])]
    assert pieces[0]["id"].startswith("call_") and pieces[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(piece["function"]["arguments"] for piece in pieces) == '{"city": "Oslo"}'
    assert all(piece["index"] == 0 for piece in pieces) and not any("content" in d and d["content"] for d in deltas)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
