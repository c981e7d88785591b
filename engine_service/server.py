"""The Engine gRPC servicer: protobuf in and out around the plain Engine. Prefill queues a sequence and answers its
first token; Decode streams carry many sequences each, one message per step (engine_service.streams holds the
sequences between the two, and the buffers between the step loop and the streams)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from engine_service.engine import Engine, EngineFullError
from engine_service.sampling import SamplingParams, StructuredOutput
from engine_service.streams import OutputStreams, ended_early
from splitserve.v1 import common_pb2, engine_pb2, engine_pb2_grpc

MAX_REQUEST_ID_CHARS = 256   # the gateway makes ids of 128 at most (n > 1 adds a suffix)


def structured_from_proto(params: common_pb2.SamplingParams) -> StructuredOutput | None:
    if not params.HasField("structured_output"):
        return None
    kind = params.structured_output.WhichOneof("kind")
    value = getattr(params.structured_output, kind) if kind else None
    return StructuredOutput(kind or "", tuple(value.choices) if kind == "choice" else value)


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
        structured_output=structured_from_proto(params),
    )   # n is the gateway's: it sends one sequence per completion


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(self, engine: Engine, decode_lease_seconds: float) -> None:
        self.engine = engine
        self.streams = OutputStreams(engine.abort, decode_lease_seconds)

    async def drain(self) -> None:
        self.streams.drain()

    async def Prefill(self, request: engine_pb2.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> engine_pb2.PrefillResponse:
        request_id = request.request_id
        if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request_id is required, at most {MAX_REQUEST_ID_CHARS} characters")
        try:
            params = sampling_from_proto(request.sampling)
            params.validate()
            # Compiled here, awaited off the step loop: a slow compile never stalls the running sequences.
            grammar = None if params.structured_output is None else \
                await self.engine.grammars.compile(params.structured_output)
        except ValueError as exc:  # parameter validation, and structured_output.ConstraintError
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request_id in self.streams.streams:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r} is already running")
        stream, on_output = self.streams.open(request_id)
        try:
            self.engine.add_request(request_id, list(request.prompt_token_ids), params, on_output, grammar)
        except EngineFullError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:  # RequestError and parameter validation
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.streams.add(stream)
        try:
            first = await stream.first
        except asyncio.CancelledError:
            self.streams.drop(stream, abort=True)
            raise
        if first.token_id is None:
            self.streams.drop(stream, abort=False)
            await context.abort(*ended_early(request_id, first.finish_reason))
        if first.finish_reason:
            self.streams.drop(stream, abort=False)
        else:
            self.streams.lease(stream)
        response = engine_pb2.PrefillResponse(token_id=first.token_id, finish_reason=first.finish_reason,
                                              queue_seconds=first.queue_seconds, prefill_seconds=first.prefill_seconds)
        if first.logprobs is not None:
            response.logprobs.CopyFrom(first.logprobs)
        return response

    async def Decode(self, request_iterator: AsyncIterator[engine_pb2.DecodeRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[engine_pb2.DecodeResponse]:
        async for outputs in self.streams.decode(request_iterator):
            yield engine_pb2.DecodeResponse(outputs=outputs)

    async def Abort(self, request: engine_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> engine_pb2.AbortResponse:
        stream = self.streams.streams.get(request.request_id)
        if stream is not None and stream.first.done():   # a Prefill still waiting ends on its own (ABORTED)
            self.streams.drop(stream, abort=False)
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
