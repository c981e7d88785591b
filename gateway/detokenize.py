"""The gateway's side of Detokenize: one stream to the tokenizer, shared by every request. The pieces of all the
sequences that are ready in one event-loop turn go out as one message, and their texts come back as one."""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

import grpc

from gateway.errors import GatewayError, deadline_expired
from gateway.shared_call import SharedCall
from splitserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc

Reply = asyncio.Future[str] | None   # None: a piece nobody waits for (the empty final piece of an early stop)


class _DetokenizeCall(SharedCall[tuple[tokenizer_pb2.DetokenizePiece, Reply]]):
    """The tokenizer answers messages in order, one result per piece: the replies of each message sent wait in
    a queue for the response that matches it."""

    def __init__(self, call: grpc.aio.StreamStreamCall, address: str) -> None:
        self._in_flight: deque[list[Reply]] = deque()
        super().__init__(call, "tokenizer", address)

    def _message(self, items: list[tuple[tokenizer_pb2.DetokenizePiece, Reply]]) -> tokenizer_pb2.DetokenizeRequest:
        self._in_flight.append([reply for _, reply in items])
        return tokenizer_pb2.DetokenizeRequest(pieces=[piece for piece, _ in items])

    def _dispatch(self, response: tokenizer_pb2.DetokenizeResponse) -> None:
        replies = self._in_flight.popleft() if self._in_flight else []
        if len(replies) != len(response.results):
            raise GatewayError(grpc.StatusCode.INTERNAL, f"the tokenizer answered {len(response.results)} "
                                                         f"detokenize pieces for {len(replies)}")
        for reply, result in zip(replies, response.results):
            if reply is None or reply.done():   # nobody waits, or the request ended meanwhile
                continue
            if result.error:
                reply.set_exception(GatewayError(grpc.StatusCode.INTERNAL,
                                                 f"the tokenizer refused generated tokens: {result.error}"))
            else:
                reply.set_result(result.text)

    def _failed(self, failure: GatewayError, unsent: list[tuple[tokenizer_pb2.DetokenizePiece, Reply]]) -> None:
        waiting = [reply for _, reply in unsent] + [reply for replies in self._in_flight for reply in replies]
        self._in_flight.clear()
        for reply in waiting:
            if reply is not None and not reply.done():
                reply.set_exception(failure)


class DetokenizeSequence:
    """One generated sequence: `add` returns the text its ids complete. `close` it when the request ends,
    finished or not, so that the tokenizer forgets it. The request's deadline is one timer, as in decode.py."""

    def __init__(self, call: _DetokenizeCall, number: int, timeout: float | None) -> None:
        self._call = call
        self._number = number
        self._finished = False
        self._expired = False
        self._waiting: asyncio.Future[str] | None = None
        self._deadline = None if timeout is None else asyncio.get_running_loop().call_later(timeout, self._expire)

    async def add(self, token_ids: Sequence[int], final: bool) -> str:
        if self._expired:
            raise deadline_expired()
        reply = asyncio.get_running_loop().create_future()
        self._call.send((tokenizer_pb2.DetokenizePiece(sequence=self._number, token_ids=token_ids, final=final),
                         reply))
        self._finished = self._finished or final
        self._waiting = reply
        try:
            return await reply
        finally:
            self._waiting = None

    def close(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if not self._finished and self._call.failure is None:
            self._finished = True
            self._call.send((tokenizer_pb2.DetokenizePiece(sequence=self._number, final=True), None))

    def _expire(self) -> None:
        self._expired = True
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_exception(deadline_expired())


class SharedDetokenizer:
    """Opens the shared stream on first use, and again after it broke (a restarted tokenizer): sequences
    started on the broken one fail with its error, later ones get the new stream. With `streams` > 1 it keeps that
    many and gives new sequences to each in turn: over a channel that spreads calls over several tokenizers
    (channels.spreads), each stream lands on another one."""

    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub, address: str, streams: int = 1) -> None:
        self._stub = stub
        self._address = address
        self._calls: list[_DetokenizeCall | None] = [None] * streams
        self._turn = 0
        self._last_number = 0   # increases across streams, as a stream requires of new sequences

    def sequence(self, timeout: float | None) -> DetokenizeSequence:
        """A new sequence; `timeout` (seconds) ends a wait for its text with DEADLINE_EXCEEDED."""
        self._turn = (self._turn + 1) % len(self._calls)
        call = self._calls[self._turn]
        if call is None or call.failure is not None:
            call = self._calls[self._turn] = _DetokenizeCall(self._stub.Detokenize(), self._address)
        self._last_number += 1
        return DetokenizeSequence(call, self._last_number, timeout)

    def close(self) -> None:
        for call in self._calls:
            if call is not None:
                call.fail(GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down"))
