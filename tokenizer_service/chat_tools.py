"""Tools in a chat prompt: OpenAI's function definitions and tool calls turned into what chat templates read, and
what to do when a model's template has no tool support.

Templates read transformers' form: `tools` as OpenAI's `{"type": "function", "function": {...}}` objects, and an
assistant message's `tool_calls` as `{"id", "type", "function": {"name", "arguments"}}` with `arguments` a
*mapping* (templates apply `tojson` to it; vLLM parses the JSON text the same way before rendering).

Whether a template renders tools is found by rendering a probe tool and looking for its name (as llama.cpp's
server does); the call format the model then writes is read from the template (`<tool_call>`: Hermes, Qwen,
SmolLM3). A template without tool support still gets the conversation: the tools are described in a system
message, calls are written into the assistant's content as the JSON a forced call produces
(`[{"name": ..., "arguments": {...}}]`), and tool results keep their role.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

Message = dict[str, Any]
PROBE_TOOL_NAME = "splitserve_probe_tool_7f3a"
HERMES = "hermes"


@dataclass(frozen=True)
class ToolDefinition:
    name: str
    description: str
    parameters: str           # JSON Schema text; "" = no parameters


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str            # JSON text


def _json_or_text(text: str) -> Any:
    """Arguments and parameters arrive as JSON text; templates want the value (the text itself if it is not JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def openai_tools(tools: Sequence[ToolDefinition]) -> list[dict[str, Any]]:
    rendered = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        function["parameters"] = _json_or_text(tool.parameters) if tool.parameters else \
            {"type": "object", "properties": {}}
        rendered.append({"type": "function", "function": function})
    return rendered


def template_message(role: str, content: str, tool_calls: Sequence[ToolCall] = (), tool_call_id: str = "",
                     name: str = "") -> Message:
    """One message as templates read it (transformers' keys; empty fields left out)."""
    message: Message = {"role": role, "content": content}
    if tool_calls:
        message["tool_calls"] = [{"id": call.id, "type": "function",
                                  "function": {"name": call.name, "arguments": _json_or_text(call.arguments)}}
                                 for call in tool_calls]
    if tool_call_id:
        message["tool_call_id"] = tool_call_id
    if name:
        message["name"] = name
    return message


def renders_tools(render: Callable[..., str]) -> bool:
    """Whether `render(messages, tools=...)` puts the tools into the prompt."""
    probe = [{"type": "function", "function": {"name": PROBE_TOOL_NAME, "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    try:
        return PROBE_TOOL_NAME in render([{"role": "user", "content": "hi"}], tools=probe)
    except jinja2.TemplateError:
        return False


def call_format(source: str) -> str:
    """The format the model writes calls in when free to; "" when splitserve does not know it."""
    return HERMES if "<tool_call>" in source else ""


def without_template_support(messages: list[Message], tools: list[dict[str, Any]]) -> list[Message]:
    """The conversation for a template that renders no tools: the tools described in a system message (the first
    system message keeps its text after the description), calls written into the assistant's content."""
    rewritten = []
    for message in messages:
        message = dict(message)
        calls = message.pop("tool_calls", None)
        if calls:
            written = json.dumps([{"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
                                  for call in calls], ensure_ascii=False)
            message["content"] = f"{message['content']}\n{written}" if message["content"] else written
        message.pop("tool_call_id", None)
        message.pop("name", None)
        rewritten.append(message)
    if not tools:
        return rewritten
    description = ("You can call these functions (JSON Schemas of their arguments):\n"
                   + "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
                   + '\nA call is written as JSON: [{"name": <function name>, "arguments": <arguments object>}].')
    if rewritten and rewritten[0]["role"] == "system":
        rewritten[0]["content"] = f"{description}\n\n{rewritten[0]['content']}"
        return rewritten
    return [{"role": "system", "content": description}, *rewritten]
