"""gRPC servicer: protobuf in, plain PromptTokenizer/DetokenizeStream calls, protobuf out."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterator

import grpc

from splitserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tokenizer_service.chat_tools import ToolCall, ToolDefinition, template_message
from tokenizer_service.detokenize_streams import DetokenizeStream
from tokenizer_service.metrics import DETOKENIZE_SEQUENCES, TOKENIZER_SECONDS
from tokenizer_service.tokenizer import PromptTokenizer

log = logging.getLogger("splitserve.tokenizer")

# Encoding runs at ~2 M chars/s: shorter prompts take under ~2 ms and stay on the event loop; longer ones go to a
# thread (the Rust encoder releases the GIL) so they do not stall other requests' Detokenize streams.
INLINE_PROMPT_CHARS = 4096


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, tokenizer: PromptTokenizer) -> None:
        self.tokenizer = tokenizer

    async def Tokenize(self, request: tokenizer_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> tokenizer_pb2.TokenizeResponse:
        async with _status_on_error(context):
            if bool(request.prompt) == bool(request.messages):
                raise ValueError("set exactly one of prompt or messages")
            messages = [template_message(m.role, m.content, [ToolCall(c.id, c.name, c.arguments)
                                                             for c in m.tool_calls], m.tool_call_id, m.name)
                        for m in request.messages]
            tools = [ToolDefinition(t.name, t.description, t.parameters) for t in request.tools]
            if request.prompt:
                if tools:
                    raise ValueError("tools apply to messages only")
                encode = functools.partial(self.tokenizer.encode_prompt, request.prompt)
            else:
                encode = functools.partial(self.tokenizer.encode_chat, messages, tools)
            # every message costs template work, even an empty one: count it as a few characters
            size = len(request.prompt) + sum(m.ByteSize() + 16 for m in request.messages) + \
                sum(t.ByteSize() for t in request.tools)
            with _timed("tokenize"):
                ids = encode() if size <= INLINE_PROMPT_CHARS else await asyncio.to_thread(encode)
        return tokenizer_pb2.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request_iterator: AsyncIterator[tokenizer_pb2.DetokenizeRequest],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[tokenizer_pb2.DetokenizeResponse]:
        stream = DetokenizeStream(self.tokenizer.detokenizer, DETOKENIZE_SEQUENCES.inc)
        try:
            async for request in request_iterator:
                yield tokenizer_pb2.DetokenizeResponse(results=[self._detokenize(stream, piece)
                                                                for piece in request.pieces])
        finally:
            stream.close()

    @staticmethod
    def _detokenize(stream: DetokenizeStream, piece: tokenizer_pb2.DetokenizePiece) -> tokenizer_pb2.DetokenizeResult:
        """A refused piece fails only its own sequence: the stream carries the others too."""
        with _timed("detokenize"):
            try:
                return tokenizer_pb2.DetokenizeResult(text=stream.add(piece.sequence, piece.token_ids, piece.final))
            except ValueError as exc:
                return tokenizer_pb2.DetokenizeResult(error=str(exc))
            except Exception as exc:   # a bug: this sequence fails, the stream serves the others on
                log.exception("detokenize failed")
                return tokenizer_pb2.DetokenizeResult(error=f"internal error: {type(exc).__name__}: {exc}")

    async def TokenTexts(self, request: tokenizer_pb2.TokenTextsRequest,
                         context: grpc.aio.ServicerContext) -> tokenizer_pb2.TokenTextsResponse:
        async with _status_on_error(context):
            texts = self.tokenizer.token_texts.lookup(list(request.token_ids))
        return tokenizer_pb2.TokenTextsResponse(
            texts=[tokenizer_pb2.TokenText(text=t.text, raw=t.raw) for t in texts])

    async def GetInfo(self, request: tokenizer_pb2.GetTokenizerInfoRequest,
                      context: grpc.aio.ServicerContext) -> tokenizer_pb2.TokenizerInfo:
        return tokenizer_pb2.TokenizerInfo(
            name=self.tokenizer.name, vocab_size=self.tokenizer.vocab_size,
            eos_token_ids=self.tokenizer.eos_token_ids, has_chat_template=self.tokenizer.has_chat_template,
            template_renders_tools=self.tokenizer.template_renders_tools,
            tool_call_format=self.tokenizer.tool_call_format)


@contextlib.asynccontextmanager
async def _status_on_error(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """The one place that maps exceptions to gRPC statuses."""
    try:
        yield
    except ValueError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        log.exception("tokenizer request failed")
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _timed(op: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        TOKENIZER_SECONDS.labels(op=op).observe(time.perf_counter() - start)
