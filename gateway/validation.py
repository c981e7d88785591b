"""Validation of the public GenerateRequest: the one place where users' parameters are checked."""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from common.chat import CHAT_ROLES
from gateway.errors import invalid
from splitserve.v1 import common_pb2, gateway_pb2

DEFAULT_MAX_TOKENS = 256
GREEDY_BELOW_TEMPERATURE = 1e-5   # as vLLM: smaller temperatures are greedy (1e-40 would overflow the logits)
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class Limits:
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_prompt_chars: int = 1_000_000
    max_prompt_tokens: int = 0          # 0: only the model's context limits the prompt
    max_output_tokens: int = 0          # 0: only the context limits max_tokens


@dataclass
class ValidRequest:
    request_id: str
    prompt: str | None
    messages: list[tuple[str, str]] | None
    sampling: common_pb2.SamplingParams      # for the engine: max_tokens filled in once the prompt is tokenized
    stop: list[str]
    limits: Limits = Limits()


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise invalid(f"{name} must be a finite number, got {value}")


def validate(request: gateway_pb2.GenerateRequest, limits: Limits) -> ValidRequest:
    has_prompt, has_messages = bool(request.prompt), bool(request.messages)
    if has_prompt == has_messages:
        raise invalid("set exactly one of prompt or messages" +
                      (" (both were given)" if has_prompt else " (neither was given)"))
    if has_prompt and len(request.prompt) > limits.max_prompt_chars:
        raise invalid(f"the prompt has {len(request.prompt)} characters; the limit is {limits.max_prompt_chars}")
    messages = None
    if has_messages:
        messages = []
        for i, message in enumerate(request.messages):
            if message.role not in CHAT_ROLES:
                raise invalid(f"messages[{i}].role is {message.role!r}; expected one of {', '.join(CHAT_ROLES)}")
            messages.append((message.role, message.content))
        if sum(len(content) for _, content in messages) > limits.max_prompt_chars:
            raise invalid(f"the messages exceed {limits.max_prompt_chars} characters")
    request_id = request.request_id or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise invalid(f"request_id must be printable and at most {MAX_REQUEST_ID_CHARS} characters")

    params = request.sampling
    if params.HasField("max_tokens") and params.max_tokens < 1:
        raise invalid(f"sampling.max_tokens must be at least 1 (or unset for the default), got {params.max_tokens}")
    if limits.max_output_tokens and params.max_tokens > limits.max_output_tokens:
        raise invalid(f"sampling.max_tokens is {params.max_tokens}; this server allows at most "
                      f"{limits.max_output_tokens} output tokens per request")
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        _finite(f"sampling.{name}", getattr(params, name))
    if params.temperature < 0:
        raise invalid(f"sampling.temperature must be >= 0 (0 = greedy), got {params.temperature}")
    if params.HasField("top_p") and not 0 < params.top_p <= 1:
        raise invalid(f"sampling.top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise invalid(f"sampling.top_k must be >= 0 (0 = off), got {params.top_k}")
    if not 0 <= params.min_p <= 1:
        raise invalid(f"sampling.min_p must be in [0, 1], got {params.min_p}")
    if params.HasField("repetition_penalty") and params.repetition_penalty <= 0:
        raise invalid(f"sampling.repetition_penalty must be > 0 (1 = off), got {params.repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(params, name) <= 2:
            raise invalid(f"sampling.{name} must be in [-2, 2], got {getattr(params, name)}")
    if params.logprobs:
        raise invalid("sampling.logprobs is not supported yet; leave it at 0")
    if any(token < 0 for token in params.stop_token_ids):
        raise invalid("sampling.stop_token_ids must be non-negative token ids")
    if len(params.stop) > limits.max_stop_strings:
        raise invalid(f"sampling.stop has {len(params.stop)} strings; at most {limits.max_stop_strings} are allowed")
    for i, stop in enumerate(params.stop):
        if not stop:
            raise invalid(f"sampling.stop[{i}] is empty")
        if len(stop) > limits.max_stop_string_chars:
            raise invalid(f"sampling.stop[{i}] is longer than {limits.max_stop_string_chars} characters")
    engine_params = common_pb2.SamplingParams()
    engine_params.CopyFrom(params)
    if engine_params.temperature < GREEDY_BELOW_TEMPERATURE:
        engine_params.temperature = 0.0
    del engine_params.stop[:]                 # stop strings are the gateway's business, never the engine's
    return ValidRequest(request_id, request.prompt if has_prompt else None, messages, engine_params, list(params.stop),
                        limits)


def fit_max_tokens(valid: ValidRequest, prompt_tokens: int, context: int, vocab_size: int) -> None:
    """Checks the prompt against the context and fills in max_tokens (default: 256, capped by the context)."""
    room = context - prompt_tokens
    if room <= 0:
        raise invalid(f"the prompt has {prompt_tokens} tokens; this model's context is {context} tokens, "
                      f"which leaves no room for output")
    if valid.limits.max_prompt_tokens and prompt_tokens > valid.limits.max_prompt_tokens:
        raise invalid(f"the prompt has {prompt_tokens} tokens; this server allows at most "
                      f"{valid.limits.max_prompt_tokens} prompt tokens per request")
    params = valid.sampling
    if not params.HasField("max_tokens"):
        params.max_tokens = min(DEFAULT_MAX_TOKENS, room, valid.limits.max_output_tokens or room)
    elif params.max_tokens > room:
        raise invalid(f"max_tokens {params.max_tokens} plus the prompt's {prompt_tokens} tokens exceed this model's "
                      f"context of {context} tokens (at most {room} output tokens fit)")
    if any(token >= vocab_size for token in params.stop_token_ids):
        raise invalid(f"sampling.stop_token_ids must be below the vocabulary size {vocab_size}")
