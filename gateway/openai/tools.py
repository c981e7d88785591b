"""OpenAI's function calling on chat completions, read from the request: `tools`, `tool_choice`,
`parallel_tool_calls`, and the assistant `tool_calls` / `tool` messages that carry calls back in the conversation.

`tool_choice` decides what the engine is asked and how the reply is read (`ToolChoice.mode`, see tool_calls.py):
- "none" (the default without tools): the tools are not shown to the model, the reply is plain content;
- "auto" (the default with tools): the model's template renders the tools and the model may call them in its own
  format; refused (400) when the template has no tool support or splitserve does not know its call format;
- "required": the output is constrained to a JSON array of `{"name": <one of the tools>, "arguments": <its
  parameters' schema>}` objects (one at most with `parallel_tool_calls: false`);
- `{"type": "function", "function": {"name": ...}}`: the output is constrained to that function's parameters
  schema: the whole output is the call's arguments.
Forced calls work on any chat model: where its template renders no tools, the tokenizer describes them in a system
message. Bounds (number of tools, schema size, name) are checked with the rest of the request (gateway/validation.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.openai.params import ParamError, boolean, text, type_name
from splitserve.v1 import common_pb2

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass
class ToolChoice:
    mode: str                 # "none", "auto", "required" or "named"
    name: str = ""            # mode "named": the function
    parallel: bool = True     # several calls allowed in one reply

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


def read_tools(body: dict[str, Any]) -> tuple[list[common_pb2.Tool], dict[str, Any]]:
    """The request's functions as the proto carries them, and their parameter schemas by name."""
    value = body.get("tools")
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise ParamError("functions", "functions and function_call are OpenAI's deprecated form: send tools and "
                                      "tool_choice")
    if value is None:
        return [], {}
    if not isinstance(value, list):
        raise ParamError("tools", f"tools must be an array of function tools, got {type_name(value)}")
    tools, schemas = [], {}
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ParamError(f"tools[{i}].type", f'tools[{i}] must be {{"type": "function", "function": {{...}}}}')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ParamError(f"tools[{i}].function", f"tools[{i}].function must be an object with a name")
        name = text(function.get("name"), f"tools[{i}].function.name")
        description = function.get("description")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ParamError(f"tools[{i}].function.parameters", f"tools[{i}].function.parameters must be a JSON "
                                                                f"Schema (an object), got {type_name(parameters)}")
        boolean({f"tools[{i}].function.strict": function.get("strict")}, f"tools[{i}].function.strict")
        schemas[name] = parameters if parameters is not None else EMPTY_PARAMETERS
        tools.append(common_pb2.Tool(
            name=name, parameters="" if parameters is None else json.dumps(parameters, ensure_ascii=False),
            description="" if description is None else text(description, f"tools[{i}].function.description")))
    return tools, schemas


def read_tool_choice(body: dict[str, Any], names: set[str]) -> ToolChoice:
    value = body.get("tool_choice")
    parallel = boolean(body, "parallel_tool_calls")
    parallel = True if parallel is None else parallel
    if value is None:
        return ToolChoice("auto" if names else "none", parallel=parallel)
    if value in ("none", "auto", "required"):
        if value != "none" and not names:
            raise ParamError("tool_choice", f'tool_choice "{value}" needs tools')
        return ToolChoice(value, parallel=parallel)
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = text(value["function"].get("name"), "tool_choice.function.name")
        if name not in names:
            raise ParamError("tool_choice", f"tool_choice names the function {name[:64]!r}, which is not in tools")
        return ToolChoice("named", name, parallel)
    raise ParamError("tool_choice", 'tool_choice must be "none", "auto", "required" or '
                                    '{"type": "function", "function": {"name": ...}}')


def forced_call_schema(choice: ToolChoice, schemas: dict[str, Any]) -> str:
    """The JSON Schema that forces the call(s) `choice` asks for, as JSON text."""
    if choice.mode == "named":
        return json.dumps(schemas[choice.name], ensure_ascii=False)
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]}, "arguments": schema},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, schema in schemas.items()]
    array: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                             "minItems": 1}
    if not choice.parallel:
        array["maxItems"] = 1
    return json.dumps(array, ensure_ascii=False)


def tool_calls_of(message: dict[str, Any], param: str) -> list[common_pb2.ToolCall]:
    """An assistant message's `tool_calls`, arguments as JSON text (OpenAI sends a string; an object is accepted)."""
    value = message.get("tool_calls")
    if value is None:
        return []
    if not isinstance(value, list):
        raise ParamError(f"{param}.tool_calls", f"{param}.tool_calls must be an array")
    calls = []
    for j, call in enumerate(value):
        where = f"{param}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise ParamError(where, f'{where} must be {{"id", "type": "function", '
                                    f'"function": {{"name", "arguments"}}}}')
        arguments = function.get("arguments")
        if isinstance(arguments, (dict, list)):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(common_pb2.ToolCall(
            id="" if call.get("id") is None else text(call["id"], f"{where}.id"),
            name=text(function.get("name"), f"{where}.function.name"),
            arguments="" if arguments is None else text(arguments, f"{where}.function.arguments")))
    return calls
