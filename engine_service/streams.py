"""The engine's sequences on their way out, between the step loop thread and the Decode streams on the event loop.

`OutputStreams` holds every sequence from Prefill to its last output: its `OutputStream` (its tokens, held until
a Decode stream attaches it, or aborted when none does within the lease), and the open Decode streams, each a
`DecodeOutbox` (the sequences attached to it that have something to send: one message per wakeup for all of
them). `LoopPoster` hands the step loop's outputs to the event loop: one wakeup for a step's outputs of every
sequence.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from common.logs import kv
from engine_service.sequence import OutputCallback, SequenceOutput, TokenLogprobs
from splitserve.v1 import common_pb2, engine_pb2

log = logging.getLogger("splitserve.engine.streams")


def logprobs_to_proto(logprobs: TokenLogprobs) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(
        token_id=logprobs.token_id, logprob=logprobs.logprob,
        top=[common_pb2.TopLogprob(token_id=token, logprob=logprob) for token, logprob in logprobs.top])


class LoopPoster:
    """Hands calls from the step loop thread to the event loop: one wakeup for all the calls of a burst (a step's
    outputs for every sequence) instead of one per call."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable[..., None], tuple]] = []

    def post(self, function: Callable[..., None], *args: object) -> None:
        with self._lock:
            self._calls.append((function, args))
            first = len(self._calls) == 1
        if first:
            self._loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for function, args in calls:
            try:
                function(*args)
            except Exception:   # one sequence's bug must not drop the others' outputs
                log.exception("delivering an engine output failed")


class DecodeOutbox:
    """One Decode stream: the sequences attached to it and which of them have outputs to send."""

    def __init__(self) -> None:
        self.attached: set[OutputStream] = set()
        self.errors: list[engine_pb2.SequenceOutput] = []    # attach requests refused
        self._ready: dict[OutputStream, None] = {}            # insertion-ordered set
        self._wakeup = asyncio.Event()

    def mark(self, stream: OutputStream) -> None:
        self._ready[stream] = None
        self._wakeup.set()

    def refuse(self, key: int, code: grpc.StatusCode, message: str) -> None:
        self.errors.append(engine_pb2.SequenceOutput(key=key, error_code=code.value[0], error=message))
        self._wakeup.set()

    def wake(self) -> None:
        self._wakeup.set()

    async def wait(self) -> None:
        await self._wakeup.wait()
        self._wakeup.clear()

    def take(self) -> list[OutputStream]:
        ready = list(self._ready)
        self._ready.clear()
        return ready


@dataclass(frozen=True)
class FirstToken:
    """What Prefill answers: the first token, or the reason the sequence ended before it (token_id None)."""
    token_id: int | None
    finish_reason: str
    logprobs: common_pb2.TokenLogprobs | None = None
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0


@dataclass(eq=False)
class OutputStream:
    """Tokens of one sequence on their way from the step loop to a Decode stream (held until it attaches)."""
    first: asyncio.Future[FirstToken]
    request_id: str = ""
    outbox: DecodeOutbox | None = None     # the Decode stream it is attached to
    key: int = 0                           # the caller's number for it there
    finished: bool = False                 # its last output was taken for sending
    lease: asyncio.TimerHandle | None = None
    token_ids: list[int] = field(default_factory=list)    # produced, not yet sent
    reason: str = ""
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)

    def push(self, output: SequenceOutput) -> None:
        """Runs on the event loop (posted by the step loop thread)."""
        token_ids, reason = output.token_ids, output.finish_reason
        protos = [logprobs_to_proto(lp) for lp in output.logprobs]
        if not self.first.done():
            if not token_ids:  # ended before its first token (aborted, or failed)
                self.first.set_result(FirstToken(None, reason))
                return
            self.first.set_result(FirstToken(token_ids[0], "" if len(token_ids) > 1 else reason,
                                             protos[0] if protos else None, output.queue_seconds or 0.0,
                                             output.prefill_seconds or 0.0))
            token_ids, protos = token_ids[1:], protos[1:]
            if not token_ids:
                return
        self.token_ids.extend(token_ids)
        self.logprobs.extend(protos)
        self.reason = reason
        if self.outbox is not None:
            self.outbox.mark(self)

    def take(self) -> engine_pb2.SequenceOutput:
        """What is to send, coalesced since the last message."""
        output = engine_pb2.SequenceOutput(key=self.key, token_ids=self.token_ids, finish_reason=self.reason,
                                           logprobs=self.logprobs)
        if self.reason == "error":
            code, message = ended_early(self.request_id, self.reason)
            output.error_code, output.error = code.value[0], message
        self.finished = bool(self.reason)
        self.token_ids, self.logprobs = [], []
        return output


def ended_early(request_id: str, reason: str) -> tuple[grpc.StatusCode, str]:
    if reason == "error":
        return grpc.StatusCode.INTERNAL, f"the engine failed while computing request {request_id!r}; see its log"
    return grpc.StatusCode.ABORTED, f"request {request_id!r} was aborted before its first token"


class OutputStreams:
    """Every sequence between its Prefill and its last output, by request id, and the open Decode streams.
    Runs on the event loop; `abort` stops a sequence in the engine."""

    def __init__(self, abort: Callable[[str], None], lease_seconds: float) -> None:
        self.abort = abort
        self.lease_seconds = lease_seconds
        self.streams: dict[str, OutputStream] = {}
        self.outboxes: set[DecodeOutbox] = set()
        self.draining = False
        self._poster: LoopPoster | None = None

    def open(self, request_id: str) -> tuple[OutputStream, OutputCallback]:
        """A stream for a new sequence, and the callback the step loop hands its outputs to."""
        loop = asyncio.get_running_loop()
        if self._poster is None:
            self._poster = LoopPoster(loop)
        poster = self._poster
        stream = OutputStream(first=loop.create_future(), request_id=request_id)

        def on_output(output: SequenceOutput) -> None:
            poster.post(stream.push, output)

        return stream, on_output

    def add(self, stream: OutputStream) -> None:
        self.streams[stream.request_id] = stream

    def lease(self, stream: OutputStream) -> None:
        """The first token went out: a Decode stream must attach the sequence within the lease."""
        stream.lease = asyncio.get_running_loop().call_later(self.lease_seconds, self._expire_lease, stream)

    def drain(self) -> None:
        """Shutting down: each Decode stream ends once its sequences have (the gateways keep them open else)."""
        self.draining = True
        self._wake_if_draining()

    async def decode(self, requests: AsyncIterator[engine_pb2.DecodeRequest]
                     ) -> AsyncIterator[list[engine_pb2.SequenceOutput]]:
        """One Decode stream: attach requests come in on one task; this one yields, per wakeup, everything its
        sequences produced. It ends when no sequence is left on it and the caller stopped attaching, or the server
        drains and no prefilled sequence waits to be attached."""
        outbox = DecodeOutbox()
        self.outboxes.add(outbox)
        attaching = asyncio.create_task(self._attach_all(requests, outbox))
        try:
            while True:
                await outbox.wait()
                outputs, outbox.errors = outbox.errors, []
                for stream in outbox.take():
                    if stream.outbox is outbox:   # not dropped (aborted) since it was marked
                        outputs.append(stream.take())
                        if stream.finished:
                            self.drop(stream, abort=False)
                if outputs:
                    yield outputs
                if not outbox.attached and (attaching.done() or self.draining and self._nothing_to_attach()):
                    return
        finally:
            if attaching.done() and not attaching.cancelled():
                attaching.exception()   # retrieved: the call itself reports how it ended
            attaching.cancel()
            self.outboxes.discard(outbox)
            for stream in list(outbox.attached):
                self.drop(stream, abort=True)

    def drop(self, stream: OutputStream, abort: bool) -> None:
        """Forgets the sequence: its outputs stop here (`abort` also stops it in the engine)."""
        if self.streams.get(stream.request_id) is stream:
            del self.streams[stream.request_id]
        if stream.lease is not None:
            stream.lease.cancel()
        if stream.outbox is not None:
            stream.outbox.attached.discard(stream)
            stream.outbox.wake()
            stream.outbox = None
        if abort:
            self.abort(stream.request_id)
        self._wake_if_draining()

    async def _attach_all(self, requests: AsyncIterator[engine_pb2.DecodeRequest], outbox: DecodeOutbox) -> None:
        try:
            async for request in requests:
                for attach in request.attach:
                    self._attach(attach, outbox)
        finally:
            outbox.wake()

    def _attach(self, attach: engine_pb2.DecodeAttach, outbox: DecodeOutbox) -> None:
        stream = self.streams.get(attach.request_id)
        if stream is None:
            outbox.refuse(attach.key, grpc.StatusCode.NOT_FOUND, f"no running sequence {attach.request_id!r}: "
                                                                 f"call Prefill first (or it already ended)")
        elif stream.outbox is not None:
            outbox.refuse(attach.key, grpc.StatusCode.FAILED_PRECONDITION,
                          f"sequence {attach.request_id!r} is already attached to a Decode stream")
        else:
            if stream.lease is not None:
                stream.lease.cancel()
            stream.outbox, stream.key = outbox, attach.key
            outbox.attached.add(stream)
            if stream.token_ids or stream.reason:   # produced before it attached
                outbox.mark(stream)
            self._wake_if_draining()

    def _expire_lease(self, stream: OutputStream) -> None:
        if stream.outbox is None and self.streams.get(stream.request_id) is stream:
            log.warning("no Decode stream attached in time; aborting %s",
                        kv(request_id=stream.request_id, lease_seconds=self.lease_seconds))
            self.drop(stream, abort=True)

    def _wake_if_draining(self) -> None:
        if self.draining:
            for outbox in self.outboxes:
                outbox.wake()

    def _nothing_to_attach(self) -> bool:
        return all(stream.outbox is not None for stream in self.streams.values())
