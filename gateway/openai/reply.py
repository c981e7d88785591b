"""OpenAI's response objects for one request, built from the pipeline's chunks: the whole answer, or its streamed
chunks as server-sent events; tool calls read out of a chat choice's text (tool_calls.py) as `tool_calls` or
streamed `delta.tool_calls`, with finish_reason "tool_calls"; `n` choices (chunks of different choices interleave,
each names its index) and log-probabilities in OpenAI's two formats (chat: `logprobs.content`; completions: the legacy `tokens` /
`token_logprobs` / `top_logprobs` / `text_offset`); and errors in OpenAI's body, with the HTTP status from the
gRPC code in one table (`HTTP_STATUS`)."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web

from gateway.errors import GatewayError
from gateway.openai.tool_calls import ToolCallDelta, ToolCallParser
from gateway.pipeline import Chunk
from splitserve.v1 import common_pb2

# JSON has no -Infinity; vLLM reports impossible tokens as -9999.0 too.
MIN_LOGPROB = -9999.0


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


@dataclass
class _Choice:
    """What one choice has received so far."""
    text: list[str] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    token_bytes: dict[int, bytes] = field(default_factory=dict)
    text_offset: int = 0          # completions: where the next token's text starts
    started: bool = False         # a chat stream sent this choice's role
    last: Chunk | None = None     # the chunk with finish_reason and usage
    tools: ToolCallParser | None = None                     # reads its tool calls (chat with tools)
    unsent_logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)   # of text held back

    def finish_reason(self) -> str:
        assert self.last is not None
        called = self.tools is not None and self.tools.calls
        return "tool_calls" if called and self.last.finish_reason == "stop" else self.last.finish_reason

    def take_logprobs(self) -> list[common_pb2.TokenLogprobs]:
        logprobs, self.unsent_logprobs = self.unsent_logprobs, []
        return logprobs


class Reply:
    def __init__(self, chat: bool, response_id: str, model: str, logprobs: bool,
                 tool_parser: Callable[[], ToolCallParser] | None = None) -> None:
        self.chat = chat
        self.tool_parser = tool_parser   # chat with tools: makes each choice's reader of tool calls
        self.id = response_id
        self.model = model
        self.logprobs = logprobs      # the request asked for them
        self.created = int(time.time())
        self.choices: dict[int, _Choice] = {}

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def usage(self) -> dict[str, int]:
        """The prompt counts once; completion tokens add up over the choices (as OpenAI's API)."""
        lasts = [choice.last for choice in self.choices.values() if choice.last is not None]
        prompt = lasts[0].prompt_tokens if lasts else 0
        completion = sum(last.completion_tokens for last in lasts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, chunk: Chunk) -> _Choice:
        choice = self.choices.get(chunk.index)
        if choice is None:
            choice = self.choices[chunk.index] = _Choice(tools=self.tool_parser() if self.tool_parser else None)
        choice.token_bytes.update(chunk.token_bytes)
        if chunk.finish_reason:
            choice.last = chunk
        return choice

    # ---- log-probabilities ------------------------------------------------------------------------------------

    def _bytes(self, choice: _Choice, token_id: int) -> list[int]:
        return list(choice.token_bytes.get(token_id, b""))

    def _chat_logprobs(self, choice: _Choice, logprobs: list[common_pb2.TokenLogprobs]) -> dict[str, Any]:
        return {"content": [{
            "token": lp.token, "logprob": _logprob(lp.logprob), "bytes": self._bytes(choice, lp.token_id),
            "top_logprobs": [{"token": top.token, "logprob": _logprob(top.logprob),
                              "bytes": self._bytes(choice, top.token_id)} for top in lp.top],
        } for lp in logprobs], "refusal": None}

    def _completion_logprobs(self, choice: _Choice, logprobs: list[common_pb2.TokenLogprobs]) -> dict[str, Any]:
        # As vLLM: each position's dict holds the alternatives and the chosen token.
        offsets = []
        for lp in logprobs:
            offsets.append(choice.text_offset)
            choice.text_offset += len(lp.token)
        return {
            "tokens": [lp.token for lp in logprobs],
            "token_logprobs": [_logprob(lp.logprob) for lp in logprobs],
            "top_logprobs": [{**{top.token: _logprob(top.logprob) for top in lp.top}, lp.token: _logprob(lp.logprob)}
                             for lp in logprobs],
            "text_offset": offsets,
        }

    def _format_logprobs(self, choice: _Choice, logprobs: list[common_pb2.TokenLogprobs]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return (self._chat_logprobs if self.chat else self._completion_logprobs)(choice, logprobs)

    # ---- the whole answer -------------------------------------------------------------------------------------

    def add(self, chunk: Chunk) -> None:
        choice = self._choice(chunk)
        choice.text.append(chunk.text)
        choice.logprobs.extend(chunk.logprobs)

    def whole(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self.choices):
            choice = self.choices[index]
            assert choice.last is not None
            text = "".join(choice.text)
            answer = {"message": self._message(choice, text)} if self.chat else {"text": text}   # reads the calls
            body: dict[str, Any] = {"index": index, "logprobs": self._format_logprobs(choice, choice.logprobs),
                                    "finish_reason": choice.finish_reason(), **answer}
            choices.append(body)
        return {**self._envelope(choices, chunk=False), "usage": self.usage()}

    @staticmethod
    def _message(choice: _Choice, text: str) -> dict[str, Any]:
        if choice.tools is None:
            return {"role": "assistant", "content": text}
        content, _ = choice.tools.feed(text)
        content += choice.tools.finish()[0]
        if not choice.tools.calls:   # nothing parsed as a call: the text is the answer
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": content or None,
                "tool_calls": [call.openai() for call in choice.tools.calls]}

    # ---- streamed chunks --------------------------------------------------------------------------------------

    def deltas(self, chunk: Chunk, include_usage: bool) -> list[dict[str, Any]]:
        """The events for one chunk: a chat choice's first chunk also announces the role; the tokens' logprobs ride
        on the event with their text (or on the finish event when they have none, e.g. EOS)."""
        choice = self._choice(chunk)
        events = []

        def event(content: str | None, finish_reason: str | None, role: bool = False,
                  logprobs: list[common_pb2.TokenLogprobs] | None = None,
                  tool_calls: list[ToolCallDelta] | None = None) -> dict[str, Any]:
            body: dict[str, Any] = {"index": chunk.index,
                                    "logprobs": self._format_logprobs(choice, logprobs) if logprobs else None,
                                    "finish_reason": finish_reason}
            if self.chat:
                delta: dict[str, Any] = {} if content is None else {"content": content}
                if role:
                    delta["role"] = "assistant"
                if tool_calls:
                    delta["tool_calls"] = [call.openai() for call in tool_calls]
                body["delta"] = delta
            else:
                body["text"] = content or ""
            envelope = self._envelope([body], chunk=True)
            if include_usage:
                envelope["usage"] = None
            return envelope

        if self.chat and not choice.started:
            choice.started = True
            events.append(event("", None, role=True))
        content, calls = chunk.text, []
        if choice.tools is not None:
            content, calls = choice.tools.feed(chunk.text)
            if chunk.finish_reason:
                more_content, more_calls = choice.tools.finish()
                content, calls = content + more_content, calls + more_calls
        choice.unsent_logprobs.extend(chunk.logprobs)
        if content:
            events.append(event(content, None, logprobs=choice.take_logprobs()))
        if calls:
            events.append(event(None, None, logprobs=choice.take_logprobs(), tool_calls=calls))
        if chunk.finish_reason:
            events.append(event(None, choice.finish_reason(), logprobs=choice.take_logprobs()))
        return events

    def usage_event(self) -> dict[str, Any]:
        """With include_usage: one more chunk after every choice finished, with no choices and the usage."""
        return {**self._envelope([], chunk=True), "usage": self.usage()}


# gRPC status -> HTTP status and OpenAI error type: the one place the two front doors' errors meet.
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
INTERNAL = (500, "internal_error")


def error_body(code: grpc.StatusCode, message: str, param: str | None = None) -> tuple[int, dict[str, Any]]:
    status, kind = HTTP_STATUS.get(code, INTERNAL)
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code.name.lower()}}


def error_response(exc: GatewayError) -> web.Response:
    status, body = error_body(exc.code, exc.message, exc.param)
    return web.json_response(body, status=getattr(exc, "status", status))   # a few errors name their own status


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
