"""The Engine gRPC servicer: protobuf in and out around the plain Engine. Prefill queues a sequence and answers its
first token; Decode streams carry many sequences each, one message per step (the buffers between the step loop
and the streams are engine_service.streams)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from common.logs import kv
from engine_service.engine import Engine, EngineFullError
from engine_service.sampling import SamplingParams
from engine_service.sequence import SequenceOutput
from engine_service.streams import DecodeOutbox, LoopPoster, OutputStream, ended_early
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

        def on_output(output: SequenceOutput) -> None:
            poster.post(stream.push, output)

        try:
            self.engine.add_request(request_id, list(request.prompt_token_ids), sampling_from_proto(request.sampling),
                                    on_output)
        except EngineFullError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:  # RequestError and parameter validation
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.streams[request_id] = stream
        try:
            first = await stream.first
        except asyncio.CancelledError:
            self._drop(stream, abort=True)
            raise
        if first.token_id is None:
            self._drop(stream, abort=False)
            await context.abort(*ended_early(request_id, first.finish_reason))
        if first.finish_reason:
            self._drop(stream, abort=False)
        else:
            stream.lease = loop.call_later(self.decode_lease_seconds, self._expire_lease, stream)
        response = engine_pb2.PrefillResponse(token_id=first.token_id, finish_reason=first.finish_reason,
                                              queue_seconds=first.queue_seconds, prefill_seconds=first.prefill_seconds)
        if first.logprobs is not None:
            response.logprobs.CopyFrom(first.logprobs)
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
        spec = self.engine.model_spec
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
