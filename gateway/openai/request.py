"""OpenAI's request JSON read into the public `GenerateRequest` (the same validation as the gRPC API follows in the
front door): field types checked and named in errors (`ParamError.param`), OpenAI's defaults and names mapped.

Differences from the gRPC API: an unset `temperature` is 1.0, as in OpenAI's API (gRPC: unset = 0 = greedy),
except with a greedy-only strategy (num_beams > 1, penalty_alpha > 0, speculative "lookahead"), where it is 0.
`logit_bias` keys are strings (OpenAI's form); splitserve's decoding fields are top-level body fields (what the
SDK's extra_body sends). `best_of`, `echo`, `suffix`, tools and token-id prompts are refused with 400.
"""
from __future__ import annotations

import json
from typing import Any

import grpc

from common.decoding import greedy_only_strategy
from gateway.errors import GatewayError
from splitserve.v1 import common_pb2, gateway_pb2

OPENAI_DEFAULT_TEMPERATURE = 1.0
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


class ParamError(GatewayError):
    """A bad field of the OpenAI request: INVALID_ARGUMENT, naming the field in `param`."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)
        self.param = param


def read_body(raw: bytes) -> dict[str, Any]:
    """The request body: a JSON object."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:   # bad JSON, invalid UTF-8, absurd nesting or numbers
        raise ParamError(None, f"the request body is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise ParamError(None, f"the request body must be a JSON object, got {_type_name(body)}")
    return body


def requested_model(body: dict[str, Any]) -> str | None:
    """The `model` asked for; None when unset or empty (the served model)."""
    model = body.get("model")
    return None if model is None or model == "" else _text(model, "model")


def stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ParamError("stream_options", "stream_options must be an object")
    return bool(_bool(body, "stream")), bool(_bool(options, "include_usage"))


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ParamError(param, f"{param} must be a string, got {_type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ParamError(param, f"{param} is not valid Unicode (it holds a lone surrogate)") from None
    return value


def _int(body: dict[str, Any], name: str, bounds: tuple[int, int] = INT32) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"{name} must be an integer, got {_type_name(value)}")
    if not bounds[0] <= value <= bounds[1]:
        raise ParamError(name, f"{name} must be between {bounds[0]} and {bounds[1]}, got {value}")
    return value


def _float(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(name, f"{name} must be a number, got {_type_name(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ParamError(name, f"{name} must be a finite number") from None


def _bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ParamError(name, f"{name} must be a boolean, got {_type_name(value)}")
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        return [_text(value, "stop")]
    if not isinstance(value, list):
        raise ParamError("stop", f"stop must be a string or an array of strings, got {_type_name(value)}")
    return [_text(item, f"stop[{i}]") for i, item in enumerate(value)]


def _refuse_unsupported(body: dict[str, Any]) -> None:
    best_of = _int(body, "best_of")
    if best_of is not None and best_of != 1:
        raise ParamError("best_of", "best_of is not supported (n is)")
    if body.get("tools") or body.get("functions"):
        raise ParamError("tools", "tools and function calling are not supported")
    if _bool(body, "echo"):
        raise ParamError("echo", "echo is not supported")
    if body.get("suffix"):
        raise ParamError("suffix", "suffix is not supported")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise ParamError("response_format", 'only response_format {"type": "text"} is supported')


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """Chat: `logprobs: true` and `top_logprobs` (alternatives); completions: `logprobs: <alternatives>`."""
    if not chat:
        return _int(body, "logprobs")
    top = _int(body, "top_logprobs")
    if not _bool(body, "logprobs"):
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
        raise ParamError("logit_bias", f"logit_bias must be an object of token id -> bias, got {_type_name(value)}")
    bias = {}
    for key, item in value.items():
        try:
            token = int(key)
        except ValueError:
            raise ParamError("logit_bias", f"logit_bias keys must be token ids (integers), got {key!r}") from None
        if not INT32[0] <= token <= INT32[1]:
            raise ParamError("logit_bias", f"logit_bias key {key} is not a token id")
        number = _float({f"logit_bias[{key}]": item}, f"logit_bias[{key}]")
        if number is None:
            raise ParamError("logit_bias", f"logit_bias[{key}] must be a number, got null")
        bias[token] = number
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
            value: Any = _int(body, name)
        elif kind == "float":
            value = _float(body, name)
        elif kind == "bool":
            value = _bool(body, name)
        else:
            value = None if body.get(name) is None else _text(body[name], name)
        if value is not None:
            setattr(params, name, value)


def sampling_from(body: dict[str, Any], chat: bool) -> common_pb2.SamplingParams:
    """OpenAI's (and vLLM's extra, and splitserve's decoding) fields -> SamplingParams; ranges and combinations
    are checked by gateway.validation."""
    params = common_pb2.SamplingParams()
    max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    if max_tokens is not None:
        params.max_tokens = max_tokens
    _extensions(body, params)
    temperature = _float(body, "temperature")
    if temperature is None:   # OpenAI's default, unless the strategy is greedy only
        temperature = 0.0 if greedy_only_strategy(params) else OPENAI_DEFAULT_TEMPERATURE
    params.temperature = temperature
    for name in ("top_p", "repetition_penalty"):
        value = _float(body, name)
        if value is not None:
            setattr(params, name, value)
    for name in ("min_p", "presence_penalty", "frequency_penalty"):
        setattr(params, name, _float(body, name) or 0.0)
    top_k = _int(body, "top_k")
    params.top_k = 0 if top_k in (None, -1) else top_k     # vLLM's -1 = off
    seed = _int(body, "seed", INT64)
    if seed is not None:
        params.seed = seed
    params.stop.extend(_stop(body))
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None:
        if not isinstance(stop_token_ids, list):
            raise ParamError("stop_token_ids", "stop_token_ids must be an array of integers")
        for i, token in enumerate(stop_token_ids):
            name = f"stop_token_ids[{i}]"
            value = _int({name: token}, name)
            if value is None:
                raise ParamError(name, f"{name} must be an integer, got null")
            params.stop_token_ids.append(value)
    params.ignore_eos = bool(_bool(body, "ignore_eos"))
    n = _int(body, "n")
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
            texts.append(_text(part.get("text"), f"{param}[{i}].text"))
        return "".join(texts)
    return _text(value, param)


def generate_request(body: dict[str, Any], chat: bool, request_id: str) -> gateway_pb2.GenerateRequest:
    _refuse_unsupported(body)
    request = gateway_pb2.GenerateRequest(request_id=request_id, sampling=sampling_from(body, chat))
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ParamError("messages", "messages must be a non-empty array of {role, content} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ParamError(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
            role = _text(message.get("role"), f"messages[{i}].role")
            role = "system" if role == "developer" else role
            request.messages.append(common_pb2.ChatMessage(
                role=role, content=_content(message.get("content"), f"messages[{i}].content")))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list):
            raise ParamError("prompt", "prompt must be one string (batches and token-id prompts are not supported)")
        request.prompt = _text(prompt, "prompt")
        if not request.prompt:
            raise ParamError("prompt", "prompt must not be empty")
    return request
