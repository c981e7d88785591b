"""The buffers between the engine's step loop thread and the Decode streams on the event loop: a sequence's
outputs (`OutputStream`, held until a Decode stream attaches it), one Decode stream's ready sequences
(`DecodeOutbox`: one message per wakeup for all of them), and the hand-over between the threads (`LoopPoster`:
one wakeup for a step's outputs of every sequence)."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from engine_service.sequence import SequenceOutput, TokenLogprobs
from splitserve.v1 import common_pb2, engine_pb2

log = logging.getLogger("splitserve.engine.server")


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
