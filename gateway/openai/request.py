"""OpenAI's request JSON read into the public `GenerateRequest` (the same validation as the gRPC API follows in the
front door): field types checked and named in errors (`ParamError.param`), OpenAI's defaults and names mapped.

Differences from the gRPC API: an unset `temperature` is 1.0, as in OpenAI's API (gRPC: unset = 0 = greedy),
except with a greedy-only strategy (num_beams > 1, penalty_alpha > 0, speculative "lookahead"), where it is 0.
`logit_bias` keys are strings (OpenAI's form); splitserve's decoding fields are top-level body fields (what the
SDK's extra_body sends). Output constraints are read by constraints.py, tools by tools.py. `best_of`, `echo`,
`suffix` and token-id prompts are refused with 400.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from common.decoding import greedy_only_strategy
from gateway.openai.constraints import Constraint, constraint_from
from gateway.openai.params import INT32, INT64, ParamError, boolean, integer, number, text, type_name
from gateway.openai.tools import ToolChoice, forced_call_schema, read_tool_choice, read_tools, tool_calls_of
from splitserve.v1 import common_pb2, gateway_pb2

OPENAI_DEFAULT_TEMPERATURE = 1.0


def read_body(raw: bytes) -> dict[str, Any]:
    """The request body: a JSON object."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:   # bad JSON, invalid UTF-8, absurd nesting or numbers
        raise ParamError(None, f"the request body is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise ParamError(None, f"the request body must be a JSON object, got {type_name(body)}")
    return body


def requested_model(body: dict[str, Any]) -> str | None:
    """The `model` asked for; None when unset or empty (the served model)."""
    model = body.get("model")
    return None if model is None or model == "" else text(model, "model")


def stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ParamError("stream_options", "stream_options must be an object")
    return bool(boolean(body, "stream")), bool(boolean(options, "include_usage"))


def _stop(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        return [text(value, "stop")]
    if not isinstance(value, list):
        raise ParamError("stop", f"stop must be a string or an array of strings, got {type_name(value)}")
    return [text(item, f"stop[{i}]") for i, item in enumerate(value)]


def _refuse_unsupported(body: dict[str, Any]) -> None:
    best_of = integer(body, "best_of")
    if best_of is not None and best_of != 1:
        raise ParamError("best_of", "best_of is not supported (n is)")
    if boolean(body, "echo"):
        raise ParamError("echo", "echo is not supported")
    if body.get("suffix"):
        raise ParamError("suffix", "suffix is not supported")


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """Chat: `logprobs: true` and `top_logprobs` (alternatives); completions: `logprobs: <alternatives>`."""
    if not chat:
        return integer(body, "logprobs")
    top = integer(body, "top_logprobs")
    if not boolean(body, "logprobs"):
        if top is not None:
            raise ParamError("top_logprobs", "top_logprobs needs logprobs: true")
        return None
    return top or 0


def _logit_bias(body: dict[str, Any]) -> dict[int, float]:
    """OpenAI's {"<token id>": bias} -> {id: bias}; ranges are checked by gateway.validation."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ParamError("logit_bias", f"logit_bias must be an object of token id -> bias, got {type_name(value)}")
    bias = {}
    for key, item in value.items():
        try:
            token = int(key)
        except ValueError:
            raise ParamError("logit_bias", f"logit_bias keys must be token ids (integers), got {key!r}") from None
        if not INT32[0] <= token <= INT32[1]:
            raise ParamError("logit_bias", f"logit_bias key {key} is not a token id")
        amount = number({f"logit_bias[{key}]": item}, f"logit_bias[{key}]")
        if amount is None:
            raise ParamError("logit_bias", f"logit_bias[{key}] must be a number, got null")
        bias[token] = amount
    return bias


# splitserve's decoding strategies, as top-level body fields (the SDK's extra_body), and their JSON types.
EXTENSION_FIELDS: dict[str, str] = {
    "num_beams": "int", "length_penalty": "float", "early_stopping": "bool", "penalty_alpha": "float",
    "speculative": "str", "num_speculative_tokens": "int", "prompt_lookup_max_ngram": "int",
    "lookahead_window": "int", "lookahead_ngram": "int",
}


def _extensions(body: dict[str, Any], params: common_pb2.SamplingParams) -> None:
    for name, kind in EXTENSION_FIELDS.items():
        if kind == "int":
            value: Any = integer(body, name)
        elif kind == "float":
            value = number(body, name)
        elif kind == "bool":
            value = boolean(body, name)
        else:
            value = None if body.get(name) is None else text(body[name], name)
        if value is not None:
            setattr(params, name, value)


def sampling_from(body: dict[str, Any], chat: bool) -> common_pb2.SamplingParams:
    """OpenAI's (and vLLM's extra, and splitserve's decoding) fields -> SamplingParams; ranges and combinations
    are checked by gateway.validation."""
    params = common_pb2.SamplingParams()
    max_tokens = integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens")
    if max_tokens is not None:
        params.max_tokens = max_tokens
    _extensions(body, params)
    temperature = number(body, "temperature")
    if temperature is None:   # OpenAI's default, unless the strategy is greedy only
        temperature = 0.0 if greedy_only_strategy(params) else OPENAI_DEFAULT_TEMPERATURE
    params.temperature = temperature
    for name in ("top_p", "repetition_penalty"):
        value = number(body, name)
        if value is not None:
            setattr(params, name, value)
    for name in ("min_p", "presence_penalty", "frequency_penalty"):
        setattr(params, name, number(body, name) or 0.0)
    top_k = integer(body, "top_k")
    params.top_k = 0 if top_k in (None, -1) else top_k     # vLLM's -1 = off
    seed = integer(body, "seed", INT64)
    if seed is not None:
        params.seed = seed
    params.stop.extend(_stop(body))
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None:
        if not isinstance(stop_token_ids, list):
            raise ParamError("stop_token_ids", "stop_token_ids must be an array of integers")
        for i, token in enumerate(stop_token_ids):
            name = f"stop_token_ids[{i}]"
            value = integer({name: token}, name)
            if value is None:
                raise ParamError(name, f"{name} must be an integer, got null")
            params.stop_token_ids.append(value)
    params.ignore_eos = bool(boolean(body, "ignore_eos"))
    n = integer(body, "n")
    if n is not None:
        params.n = n
    logprobs = _logprobs(body, chat)
    if logprobs is not None:
        params.logprobs = logprobs
    params.logit_bias.update(_logit_bias(body))
    return params


def _content(value: Any, param: str) -> str:
    """A message's content: a string, null, or an array of text parts."""
    if value is None:
        return ""
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ParamError(f"{param}[{i}]", f"{param}[{i}] must be a text part "
                                                  '({"type": "text", "text": ...}); other parts are not supported')
            texts.append(text(part.get("text"), f"{param}[{i}].text"))
        return "".join(texts)
    return text(value, param)


@dataclass
class OpenAIRequest:
    """The public request, and what the OpenAI layer itself needs to answer it."""
    generate: gateway_pb2.GenerateRequest
    constraint_param: str | None = None     # the field the output constraint came from (named in its errors)
    tool_choice: ToolChoice = field(default_factory=lambda: ToolChoice("none"))


def _messages(body: dict[str, Any], request: gateway_pb2.GenerateRequest) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ParamError("messages", "messages must be a non-empty array of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ParamError(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
        role = text(message.get("role"), f"messages[{i}].role")
        role = "system" if role == "developer" else role
        request.messages.append(common_pb2.ChatMessage(
            role=role, content=_content(message.get("content"), f"messages[{i}].content"),
            tool_calls=tool_calls_of(message, f"messages[{i}]"),
            tool_call_id=text(message.get("tool_call_id") or "", f"messages[{i}].tool_call_id"),
            name=text(message.get("name") or "", f"messages[{i}].name")))


def _tools(body: dict[str, Any], request: gateway_pb2.GenerateRequest, constraint: Constraint | None) -> ToolChoice:
    """Tools and tool_choice; a forced call becomes the request's constraint."""
    tools, schemas = read_tools(body)
    choice = read_tool_choice(body, set(schemas))
    if choice.mode == "none":
        return choice
    request.tools.extend(tools)
    if choice.forced:
        if constraint is not None:
            raise ParamError("tool_choice", f'tool_choice "{choice.mode}" forces a call: it cannot be combined '
                                            f"with {constraint.param.split('.')[0]}")
        request.sampling.structured_output.json_schema = forced_call_schema(choice, schemas)
    return choice


def generate_request(body: dict[str, Any], chat: bool, request_id: str) -> OpenAIRequest:
    _refuse_unsupported(body)
    request = gateway_pb2.GenerateRequest(request_id=request_id, sampling=sampling_from(body, chat))
    constraint = constraint_from(body)
    if constraint is not None:
        request.sampling.structured_output.CopyFrom(constraint.output)
    if not chat:
        if body.get("tools") is not None or body.get("tool_choice") is not None:
            raise ParamError("tools", "tools apply to chat completions only")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list):
            raise ParamError("prompt", "prompt must be one string (batches and token-id prompts are not supported)")
        request.prompt = text(prompt, "prompt")
        if not request.prompt:
            raise ParamError("prompt", "prompt must not be empty")
        return OpenAIRequest(request, constraint and constraint.param)
    _messages(body, request)
    choice = _tools(body, request, constraint)
    param = "tools" if choice.forced else constraint and constraint.param
    return OpenAIRequest(request, param, choice)
