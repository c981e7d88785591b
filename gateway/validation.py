"""Validation of the public GenerateRequest: the one place where users' parameters are checked."""
from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field

from common.chat import CHAT_ROLES
from common.logs import clip
from common.decoding import (MAX_LOGIT_BIAS, MAX_LOGPROBS, is_greedy, range_error, strategy_error,
                             structured_output_error)
from gateway.errors import invalid
from splitserve.v1 import common_pb2, gateway_pb2

DEFAULT_MAX_TOKENS = 256
MAX_REQUEST_ID_CHARS = 128
MAX_N = 16                        # completions per request
MAX_TOOL_NAME_CHARS = 64          # OpenAI's bound on a function's name
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Limits:
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_prompt_chars: int = 1_000_000
    max_prompt_tokens: int = 0          # 0: only the model's context limits the prompt
    max_output_tokens: int = 0          # 0: only the context limits max_tokens
    max_messages: int = 2048            # chat messages per request
    max_stop_token_ids: int = 128       # also keeps beam search's candidates (1 + ids) x beams below the vocabulary
    max_output_budget: int = 262_144    # n x max_tokens x (1 + logprobs): bounds what one reply holds; 0: none
    max_tools: int = 128                # functions per request (OpenAI's bound)
    max_tool_schema_chars: int = 65_536  # characters of one function's parameters schema


@dataclass
class ValidRequest:
    request_id: str
    prompt: str | None
    messages: list[common_pb2.ChatMessage] | None
    sampling: common_pb2.SamplingParams      # for the engine: max_tokens filled in once the prompt is tokenized
    stop: list[str]
    limits: Limits = Limits()
    n: int = 1                               # completions: one engine sequence each (sampling.n is cleared)
    tools: list[common_pb2.Tool] = field(default_factory=list)

    @property
    def sequences(self) -> int:
        """Engine sequences it occupies at once: its completions, or its beams (what admission counts)."""
        return max(self.n, self.sampling.num_beams)


def assign_request_id(request: gateway_pb2.GenerateRequest) -> str:
    """The request's id: the client's, else a new one, written into the request so that both front doors answer
    with it (gRPC: in each chunk; HTTP: the reply's id and X-Request-Id). The one place an id is made."""
    if not request.request_id:
        request.request_id = uuid.uuid4().hex
    return request.request_id


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
        if len(request.messages) > limits.max_messages:
            raise invalid(f"the request has {len(request.messages)} messages; at most {limits.max_messages} "
                          f"are allowed")
        messages = list(request.messages)
        for i, message in enumerate(messages):
            _check_message(i, message)
        if sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls) for m in messages) > \
                limits.max_prompt_chars:
            raise invalid(f"the messages exceed {limits.max_prompt_chars} characters")
    _check_tools(request, limits)
    request_id = assign_request_id(request)
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
    _check_decoding(params)
    _check_structured_output(params)
    if len(params.stop_token_ids) > limits.max_stop_token_ids:
        raise invalid(f"sampling.stop_token_ids has {len(params.stop_token_ids)} ids; at most "
                      f"{limits.max_stop_token_ids} are allowed")
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
    if is_greedy(engine_params.temperature):
        engine_params.temperature = 0.0
    del engine_params.stop[:]                 # stop strings are the gateway's business, never the engine's
    engine_params.ClearField("n")             # so is n: the gateway sends one sequence per completion
    return ValidRequest(request_id, request.prompt if has_prompt else None, messages, engine_params, list(params.stop),
                        limits, n=max(1, params.n), tools=list(request.tools))


def _check_message(i: int, message: common_pb2.ChatMessage) -> None:
    if message.role not in CHAT_ROLES:
        raise invalid(f"messages[{i}].role is {clip(message.role)!r}; expected one of {', '.join(CHAT_ROLES)}",
                      f"messages[{i}].role")
    if message.tool_calls and message.role != "assistant":
        raise invalid(f"messages[{i}].tool_calls: only assistant messages carry tool calls", f"messages[{i}]")
    for j, call in enumerate(message.tool_calls):
        if not call.name or len(call.name) > MAX_TOOL_NAME_CHARS:
            raise invalid(f"messages[{i}].tool_calls[{j}] needs a function name of at most {MAX_TOOL_NAME_CHARS} "
                          f"characters", f"messages[{i}].tool_calls[{j}].function.name")
        if len(call.id) > MAX_REQUEST_ID_CHARS:
            raise invalid(f"messages[{i}].tool_calls[{j}].id is longer than {MAX_REQUEST_ID_CHARS} characters",
                          f"messages[{i}].tool_calls[{j}].id")
    if message.role == "tool" and len(message.tool_call_id) > MAX_REQUEST_ID_CHARS:
        raise invalid(f"messages[{i}].tool_call_id is longer than {MAX_REQUEST_ID_CHARS} characters",
                      f"messages[{i}].tool_call_id")


def _check_tools(request: gateway_pb2.GenerateRequest, limits: Limits) -> None:
    """Tools: chat only, bounded in number and size, names as OpenAI allows them, parameters a JSON Schema object
    (the engine compiles it only when a call is forced: its deeper errors come back from there)."""
    if not request.tools:
        return
    if not request.messages:
        raise invalid("tools apply to chat messages only", "tools")
    if len(request.tools) > limits.max_tools:
        raise invalid(f"the request has {len(request.tools)} tools; this server allows at most {limits.max_tools}",
                      "tools")
    names = set()
    for i, tool in enumerate(request.tools):
        if not TOOL_NAME.fullmatch(tool.name) or len(tool.name) > MAX_TOOL_NAME_CHARS:
            raise invalid(f"tools[{i}]: the function name {clip(tool.name)!r} must be 1 to {MAX_TOOL_NAME_CHARS} "
                          f"letters, digits, underscores or dashes", f"tools[{i}].function.name")
        if tool.name in names:
            raise invalid(f"tools[{i}]: the function name {tool.name!r} is used twice", f"tools[{i}].function.name")
        names.add(tool.name)
        if len(tool.parameters) > limits.max_tool_schema_chars:
            raise invalid(f"tools[{i}]: the parameters schema has {len(tool.parameters)} characters; this server "
                          f"allows at most {limits.max_tool_schema_chars}", f"tools[{i}].function.parameters")
        if tool.parameters:
            try:
                schema = json.loads(tool.parameters)
            except (ValueError, RecursionError):
                schema = None
            if not isinstance(schema, dict):
                raise invalid(f"tools[{i}]: the parameters must be a JSON Schema object", 
                              f"tools[{i}].function.parameters")
        if len(tool.description) > limits.max_tool_schema_chars:
            raise invalid(f"tools[{i}]: the description is longer than {limits.max_tool_schema_chars} characters",
                          f"tools[{i}].function.description")


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
    budget = valid.limits.max_output_budget
    alternatives = 1 + (params.logprobs if params.HasField("logprobs") else 0)
    if budget and valid.n * params.max_tokens * alternatives > budget:
        raise invalid(f"the request asks for up to {valid.n * params.max_tokens * alternatives} tokens and "
                      f"alternatives (n {valid.n} x max_tokens {params.max_tokens} x (1 + logprobs "
                      f"{alternatives - 1})); this server allows {budget} per request: ask for fewer")
    if any(token >= vocab_size for token in params.stop_token_ids):
        raise invalid(f"sampling.stop_token_ids must be below the vocabulary size {vocab_size}")
    if any(token >= vocab_size for token in params.logit_bias):
        raise invalid(f"sampling.logit_bias keys must be token ids below the vocabulary size {vocab_size}")


def _check_range(name: str, value: int, low: int, high: int, meaning: str = "") -> None:
    if not low <= value <= high:
        raise invalid(f"sampling.{name} must be in [{low}, {high}]{meaning}, got {value}")


def _check_decoding(params: common_pb2.SamplingParams) -> None:
    """logprobs, logit_bias, n and the decoding strategies (beam search, contrastive search, speculative)."""
    greedy = is_greedy(params.temperature)
    if params.HasField("logprobs"):
        if params.logprobs < 0:
            raise invalid(f"sampling.logprobs must be >= 0 (0 = the chosen token's only), got {params.logprobs}")
        if params.logprobs > MAX_LOGPROBS:
            raise invalid(f"sampling.logprobs is too large: {params.logprobs} alternatives asked, at most "
                          f"{MAX_LOGPROBS} are returned")
    if len(params.logit_bias) > MAX_LOGIT_BIAS:
        raise invalid(f"sampling.logit_bias has {len(params.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are allowed")
    for token, bias in params.logit_bias.items():
        if token < 0:
            raise invalid(f"sampling.logit_bias keys must be non-negative token ids, got {token}")
        if not math.isfinite(bias) or not -100 <= bias <= 100:
            raise invalid(f"sampling.logit_bias[{token}] must be in [-100, 100], got {bias}")

    beams = params.num_beams > 1
    _check_range("n", params.n, 0, MAX_N, " (0 = 1)")
    if (problem := range_error(params, prefix="sampling.")) is not None:
        raise invalid(problem)
    if params.n > 1 and beams:
        raise invalid("sampling.n > 1 with num_beams > 1 is not supported: beam search returns its best hypothesis "
                      "(one completion)")
    if params.n > 1 and greedy:
        raise invalid("sampling.n > 1 needs sampling (temperature > 0): greedy completions would all be the same")
    if beams and params.HasField("logprobs"):
        raise invalid("sampling.logprobs with num_beams > 1 is not supported")
    if not beams and (params.HasField("length_penalty") or params.early_stopping):
        raise invalid("sampling.length_penalty and sampling.early_stopping apply to beam search only: "
                      "set num_beams > 1 or leave them unset")
    _finite("sampling.length_penalty", params.length_penalty)

    _finite("sampling.penalty_alpha", params.penalty_alpha)
    if not 0 <= params.penalty_alpha <= 1:
        raise invalid(f"sampling.penalty_alpha must be in [0, 1] (0 = off), got {params.penalty_alpha}")
    contrastive = params.penalty_alpha > 0
    if contrastive and params.top_k < 2:
        raise invalid(f"contrastive search (sampling.penalty_alpha > 0) needs sampling.top_k >= 2 candidates, "
                      f"got {params.top_k}")
    if (problem := strategy_error(params, prefix="sampling.")) is not None:
        raise invalid(problem)
    if params.num_speculative_tokens and not params.speculative:
        raise invalid("sampling.num_speculative_tokens applies to speculative decoding only: set speculative")
    if params.prompt_lookup_max_ngram and params.speculative != "prompt_lookup":
        raise invalid("sampling.prompt_lookup_max_ngram applies only with speculative='prompt_lookup'")
    if (params.lookahead_window or params.lookahead_ngram) and params.speculative != "lookahead":
        raise invalid("sampling.lookahead_window and sampling.lookahead_ngram apply only with "
                      "speculative='lookahead'")


def _check_structured_output(params: common_pb2.SamplingParams) -> None:
    """The constraint's shape and size; whether it compiles is the engine's answer (INVALID_ARGUMENT too)."""
    if not params.HasField("structured_output"):
        return
    constraint = params.structured_output
    kind = constraint.WhichOneof("kind")
    value = None if kind is None else constraint.choice.choices if kind == "choice" else getattr(constraint, kind)
    if (problem := structured_output_error(kind, value, prefix="sampling.")) is not None:
        raise invalid(problem)
    if params.penalty_alpha > 0 or params.speculative == "lookahead":
        raise invalid("sampling.structured_output does not combine with contrastive search or lookahead decoding")
