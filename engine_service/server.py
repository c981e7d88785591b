"""The Engine gRPC servicer: protobuf in and out around the plain Engine, and the buffers between its step loop
and the Decode streams (each carries many sequences, one message per step)."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from common.logs import kv
from engine_service.engine import Engine, EngineFullError
from engine_service.sampling import SamplingParams
from engine_service.sequence import Sequence, TokenLogprobs
from splitserve.v1 import common_pb2, engine_pb2, engine_pb2_grpc

log = logging.getLogger("splitserve.engine.server")


def sampling_from_proto(params: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty if params.HasField("repetition_penalty") else 1.0,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        seed=params.seed if params.HasField("seed") else None,
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs if params.HasField("logprobs") else None,
        logit_bias=tuple(sorted(params.logit_bias.items())),
        num_beams=max(1, params.num_beams),   # 0 (unset) = 1: no beam search
        length_penalty=params.length_penalty if params.HasField("length_penalty") else 1.0,
        early_stopping=params.early_stopping,
        penalty_alpha=params.penalty_alpha,
        speculative=params.speculative,
        num_speculative_tokens=params.num_speculative_tokens,
        prompt_lookup_max_ngram=params.prompt_lookup_max_ngram,
        lookahead_window=params.lookahead_window,
        lookahead_ngram=params.lookahead_ngram,
    )   # n is the gateway's: it sends one sequence per completion


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


@dataclass(eq=False)
class OutputStream:
    """Tokens of one sequence on their way from the step loop to a Decode stream (held until it attaches)."""
    first: asyncio.Future[tuple[int | None, str, common_pb2.TokenLogprobs | None]]
    request_id: str = ""
    seq: Sequence | None = None
    outbox: DecodeOutbox | None = None     # the Decode stream it is attached to
    key: int = 0                           # the caller's number for it there
    finished: bool = False                 # its last output was taken for sending
    lease: asyncio.TimerHandle | None = None
    token_ids: list[int] = field(default_factory=list)    # produced, not yet sent
    reason: str = ""
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)

    def push(self, token_ids: list[int], reason: str, logprobs: list[TokenLogprobs]) -> None:
        """Runs on the event loop (posted by the step loop thread)."""
        protos = [logprobs_to_proto(lp) for lp in logprobs]
        if not self.first.done():
            if not token_ids:  # ended before its first token (aborted, or failed)
                self.first.set_result((None, reason, None))
                return
            self.first.set_result((token_ids[0], "" if len(token_ids) > 1 else reason, protos[0] if protos else None))
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
            code, message = _ended_early(self.request_id, self.reason)
            output.error_code, output.error = code.value[0], message
        self.finished = bool(self.reason)
        self.token_ids, self.logprobs = [], []
        return output


def _ended_early(request_id: str, reason: str) -> tuple[grpc.StatusCode, str]:
    if reason == "error":
        return grpc.StatusCode.INTERNAL, f"the engine failed while computing request {request_id!r}; see its log"
    return grpc.StatusCode.ABORTED, f"request {request_id!r} was aborted before its first token"


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(self, engine: Engine, decode_lease_seconds: float) -> None:
        self.engine = engine
        self.decode_lease_seconds = decode_lease_seconds
        self.streams: dict[str, OutputStream] = {}
        self.outboxes: set[DecodeOutbox] = set()
        self.draining = False
        self._poster: LoopPoster | None = None

    async def drain(self) -> None:
        """Shutting down: each Decode stream ends once its sequences have (the gateways keep them open else)."""
        self.draining = True
        self._wake_if_draining()

    def _wake_if_draining(self) -> None:
        if self.draining:
            for outbox in self.outboxes:
                outbox.wake()

    def _nothing_to_attach(self) -> bool:
        return all(stream.outbox is not None for stream in self.streams.values())

    async def Prefill(self, request: engine_pb2.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> engine_pb2.PrefillResponse:
        request_id = request.request_id
        if not request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        if request_id in self.streams:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r} is already running")
        loop = asyncio.get_running_loop()
        if self._poster is None:
            self._poster = LoopPoster(loop)
        poster = self._poster
        stream = OutputStream(first=loop.create_future(), request_id=request_id)

        def on_output(token_ids: list[int], reason: str, logprobs: list[TokenLogprobs]) -> None:
            poster.post(stream.push, token_ids, reason, logprobs)

        try:
            stream.seq = self.engine.add_request(request_id, list(request.prompt_token_ids),
                                                 sampling_from_proto(request.sampling), on_output)
        except EngineFullError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:  # RequestError and parameter validation
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.streams[request_id] = stream
        try:
            token, reason, logprobs = await stream.first
        except asyncio.CancelledError:
            self._drop(stream, abort=True)
            raise
        if token is None:
            self._drop(stream, abort=False)
            await context.abort(*_ended_early(request_id, reason))
        if reason:
            self._drop(stream, abort=False)
        else:
            stream.lease = loop.call_later(self.decode_lease_seconds, self._expire_lease, stream)
        seq = stream.seq
        assert seq is not None and seq.first_scheduled_time is not None and seq.first_token_time is not None
        response = engine_pb2.PrefillResponse(
            token_id=token, finish_reason=reason,
            queue_seconds=seq.first_scheduled_time - seq.arrival_time,
            prefill_seconds=seq.first_token_time - seq.first_scheduled_time)
        if logprobs is not None:
            response.logprobs.CopyFrom(logprobs)
        return response

    async def Decode(self, request_iterator: AsyncIterator[engine_pb2.DecodeRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[engine_pb2.DecodeResponse]:
        """Attach requests come in on one task; this one sends, per wakeup, everything its sequences produced.
        It ends when no sequence is left on it and the caller stopped attaching, or the server drains and no
        prefilled sequence waits to be attached."""
        outbox = DecodeOutbox()
        self.outboxes.add(outbox)
        attaching = asyncio.create_task(self._attach_all(request_iterator, outbox))
        try:
            while True:
                await outbox.wait()
                outputs, outbox.errors = outbox.errors, []
                for stream in outbox.take():
                    if stream.outbox is outbox:   # not dropped (aborted) since it was marked
                        outputs.append(stream.take())
                        if stream.finished:
                            self._drop(stream, abort=False)
                if outputs:
                    yield engine_pb2.DecodeResponse(outputs=outputs)
                if not outbox.attached and (attaching.done() or self.draining and self._nothing_to_attach()):
                    return
        finally:
            if attaching.done() and not attaching.cancelled():
                attaching.exception()   # retrieved: the call itself reports how it ended
            attaching.cancel()
            self.outboxes.discard(outbox)
            for stream in list(outbox.attached):
                self._drop(stream, abort=True)

    async def _attach_all(self, request_iterator: AsyncIterator[engine_pb2.DecodeRequest],
                          outbox: DecodeOutbox) -> None:
        try:
            async for request in request_iterator:
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

    async def Abort(self, request: engine_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> engine_pb2.AbortResponse:
        stream = self.streams.get(request.request_id)
        if stream is not None and stream.first.done():   # a Prefill still waiting ends on its own (ABORTED)
            self._drop(stream, abort=False)
        self.engine.abort(request.request_id)
        return engine_pb2.AbortResponse(found=stream is not None)

    async def GetModelInfo(self, request: common_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
                           ) -> common_pb2.ModelInfo:
        spec = self.engine.spec
        return common_pb2.ModelInfo(model=spec.name, max_context_length=spec.max_context_length,
                                    vocab_size=spec.vocab_size, eos_token_ids=list(spec.eos_token_ids),
                                    device=spec.device, dtype=spec.dtype)

    async def GetStats(self, request: engine_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
                       ) -> engine_pb2.EngineStats:
        stats = self.engine.stats()
        return engine_pb2.EngineStats(running=stats.running, waiting=stats.waiting,
                                      kv_blocks_total=stats.kv_blocks_total, kv_blocks_used=stats.kv_blocks_used)

    def _expire_lease(self, stream: OutputStream) -> None:
        if stream.outbox is None and self.streams.get(stream.request_id) is stream:
            log.warning("no Decode stream attached in time; aborting %s",
                        kv(request_id=stream.request_id, lease_seconds=self.decode_lease_seconds))
            self._drop(stream, abort=True)

    def _drop(self, stream: OutputStream, abort: bool) -> None:
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
            self.engine.abort(stream.request_id)
        self._wake_if_draining()
