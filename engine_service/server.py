"""The Engine gRPC servicer: protobuf in and out around the plain Engine, and the decode streams' buffers."""
from __future__ import annotations

import asyncio
import logging
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


# What the step loop delivers for one sequence at a time: new token ids, finish reason, and their logprobs
# (one per token id when the request asked for them, else empty).
Output = tuple[list[int], str, list[common_pb2.TokenLogprobs]]


@dataclass(eq=False)
class OutputStream:
    """Tokens of one sequence on their way from the step loop to a Decode stream (buffered until it attaches)."""
    first: asyncio.Future[tuple[int | None, str, common_pb2.TokenLogprobs | None]]
    queue: asyncio.Queue[Output] = field(default_factory=asyncio.Queue)
    seq: Sequence | None = None
    attached: bool = False
    finished: bool = False
    lease: asyncio.TimerHandle | None = None

    def push(self, token_ids: list[int], reason: str, logprobs: list[TokenLogprobs]) -> None:
        """Runs on the event loop (posted by the step loop thread)."""
        protos = [logprobs_to_proto(lp) for lp in logprobs]
        if not self.first.done():
            if not token_ids:  # ended before its first token (aborted)
                self.first.set_result((None, reason, None))
                return
            rest = token_ids[1:]
            self.first.set_result((token_ids[0], "" if rest else reason, protos[0] if protos else None))
            if rest:
                self.queue.put_nowait((rest, reason, protos[1:]))
            return
        self.queue.put_nowait((token_ids, reason, protos))


def _ended_early(request_id: str, reason: str) -> tuple[grpc.StatusCode, str]:
    if reason == "error":
        return grpc.StatusCode.INTERNAL, f"the engine failed while computing request {request_id!r}; see its log"
    return grpc.StatusCode.ABORTED, f"request {request_id!r} was aborted before its first token"


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(self, engine: Engine, decode_lease_seconds: float) -> None:
        self.engine = engine
        self.decode_lease_seconds = decode_lease_seconds
        self.streams: dict[str, OutputStream] = {}

    async def Prefill(self, request: engine_pb2.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> engine_pb2.PrefillResponse:
        request_id = request.request_id
        if not request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        if request_id in self.streams:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r} is already running")
        loop = asyncio.get_running_loop()
        stream = OutputStream(first=loop.create_future())

        def on_output(token_ids: list[int], reason: str, logprobs: list[TokenLogprobs]) -> None:
            loop.call_soon_threadsafe(stream.push, token_ids, reason, logprobs)

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
            self._drop(request_id, abort=True)
            raise
        if token is None:
            self._drop(request_id, abort=False)
            await context.abort(*_ended_early(request_id, reason))
        if reason:
            self._drop(request_id, abort=False)
        else:
            stream.lease = loop.call_later(self.decode_lease_seconds, self._expire_lease, request_id)
        seq = stream.seq
        assert seq is not None and seq.first_scheduled_time is not None and seq.first_token_time is not None
        response = engine_pb2.PrefillResponse(
            token_id=token, finish_reason=reason,
            queue_seconds=seq.first_scheduled_time - seq.arrival_time,
            prefill_seconds=seq.first_token_time - seq.first_scheduled_time)
        if logprobs is not None:
            response.logprobs.CopyFrom(logprobs)
        return response

    async def Decode(self, request: engine_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        request_id = request.request_id
        stream = self.streams.get(request_id)
        if stream is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no running sequence {request_id!r}: call Prefill first (or it already ended)")
        if stream.attached:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"sequence {request_id!r} already has a Decode stream")
        stream.attached = True
        if stream.lease is not None:
            stream.lease.cancel()
        try:
            while True:
                token_ids, reason, logprobs = await stream.queue.get()
                while not reason and not stream.queue.empty():  # coalesce what piled up
                    more, reason, more_logprobs = stream.queue.get_nowait()
                    token_ids = token_ids + more
                    logprobs = logprobs + more_logprobs
                if reason:
                    stream.finished = True
                if reason == "error":
                    await context.abort(*_ended_early(request_id, reason))
                yield engine_pb2.DecodeResponse(token_ids=token_ids, finish_reason=reason, logprobs=logprobs)
                if reason:
                    return
        finally:
            self._drop(request_id, abort=not stream.finished)

    async def Abort(self, request: engine_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> engine_pb2.AbortResponse:
        found = request.request_id in self.streams
        self.engine.abort(request.request_id)
        return engine_pb2.AbortResponse(found=found)

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

    def _expire_lease(self, request_id: str) -> None:
        stream = self.streams.get(request_id)
        if stream is not None and not stream.attached:
            log.warning("no Decode stream attached in time; aborting %s",
                        kv(request_id=request_id, lease_seconds=self.decode_lease_seconds))
            self._drop(request_id, abort=True)

    def _drop(self, request_id: str, abort: bool) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is not None and stream.lease is not None:
            stream.lease.cancel()
        if abort:
            self.engine.abort(request_id)
