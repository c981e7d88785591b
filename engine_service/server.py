"""The Engine gRPC servicer: protobuf in and out around the plain Engine. Prefill queues a sequence and answers its
first token; Decode streams carry many sequences each, one message per step (engine_service.streams holds the
sequences between the two, and the buffers between the step loop and the streams). With a prefill engine's address,
Prefill gets the prompt's KV cache from that engine instead of computing it; TransferKV is the other end of that
(engine_service.kv_transfer). --role prefill serves only TransferKV, --role decode everything else."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from common.disaggregation import PREFILL_UNAVAILABLE
from common.security import TlsFiles
from engine_service.engine import Engine, EngineFullError
from engine_service.kv_transfer import PrefillPeers, TransferError, serve_transfer
from engine_service.sampling import SamplingParams, StructuredOutput
from engine_service.streams import OutputStreams, ended_early
from engine_service.structured_output import CompiledGrammar
from splitserve.v1 import common_pb2, engine_pb2, engine_pb2_grpc

ROLES = ("both", "prefill", "decode")
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


async def _check_request_id(request_id: str, context: grpc.aio.ServicerContext) -> None:
    if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"request_id is required, at most {MAX_REQUEST_ID_CHARS} characters")


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(self, engine: Engine, decode_lease_seconds: float, role: str = "both",
                 peer_tls: TlsFiles | None = None) -> None:
        self.engine = engine
        self.role = role
        self.streams = OutputStreams(engine.abort, decode_lease_seconds)
        self.peers = PrefillPeers(engine, peer_tls)   # the prefill engines this one gets KV caches from

    async def drain(self) -> None:
        self.streams.drain()

    async def Prefill(self, request: engine_pb2.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> engine_pb2.PrefillResponse:
        request_id = request.request_id
        await self._refuse_role("prefill", context)
        await _check_request_id(request_id, context)
        params, grammar = await self._checked_params(request.sampling, context)
        if request_id in self.streams.streams:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r} is already running")
        stream, on_output = self.streams.open(request_id)
        try:
            seq = self.engine.intake.sequence(request_id, list(request.prompt_token_ids), params, on_output,
                                           request.replayed_tokens, grammar)
            remote = bool(request.prefill_engine_address) and seq.strategy.prefill_elsewhere
            if not remote:
                self.engine.add_sequence(seq)
        except EngineFullError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:  # RequestError and parameter validation
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.streams.add(stream)
        transfer_seconds = 0.0
        try:
            if remote:
                transfer_seconds = await self.peers.transfer(seq, request, context.time_remaining())
            first = await stream.first
        except asyncio.CancelledError:
            self.streams.drop(stream, abort=True)
            raise
        except (TransferError, EngineFullError, ValueError) as exc:
            self.streams.drop(stream, abort=True)
            if isinstance(exc, EngineFullError):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            if not isinstance(exc, TransferError):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if exc.prefill_address:
                context.set_trailing_metadata(((PREFILL_UNAVAILABLE, exc.prefill_address),))
            await context.abort(exc.code, exc.message)
        if first.token_id is None:
            self.streams.drop(stream, abort=False)
            await context.abort(*ended_early(request_id, first.finish_reason))
        if first.finish_reason:
            self.streams.drop(stream, abort=False)
        else:
            self.streams.lease(stream)
        response = engine_pb2.PrefillResponse(token_id=first.token_id, finish_reason=first.finish_reason,
                                              queue_seconds=first.queue_seconds, prefill_seconds=first.prefill_seconds,
                                              kv_transfer_seconds=transfer_seconds)
        if first.logprobs is not None:
            response.logprobs.CopyFrom(first.logprobs)
        return response

    async def TransferKV(self, request: engine_pb2.KvTransferRequest, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[engine_pb2.KvTransferChunk]:
        await self._refuse_role("decode", context)
        await _check_request_id(request.request_id, context)
        params, grammar = await self._checked_params(request.sampling, context)
        try:
            async for chunk in serve_transfer(self.engine, request, params, grammar, context):
                yield chunk
        except EngineFullError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _checked_params(self, sampling: common_pb2.SamplingParams, context: grpc.aio.ServicerContext
                              ) -> tuple[SamplingParams, CompiledGrammar | None]:
        """The request's sampling parameters, checked, and its constraint compiled: here, awaited off the step
        loop, so that a slow compile never stalls the running sequences. INVALID_ARGUMENT when either fails."""
        try:
            params = sampling_from_proto(sampling)
            params.validate()
            grammar = None if params.structured_output is None else \
                await self.engine.grammars.compile(params.structured_output)
        except ValueError as exc:  # parameter validation, and structured_output.ConstraintError
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises
        return params, grammar

    async def _refuse_role(self, role: str, context: grpc.aio.ServicerContext) -> None:
        if self.role == role:
            work = "computes prompts for decode engines only (TransferKV)" if role == "prefill" else \
                "does not compute prompts for other engines"
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this engine has --role {role}: it {work}")

    async def Decode(self, request_iterator: AsyncIterator[engine_pb2.DecodeRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[engine_pb2.DecodeResponse]:
        await self._refuse_role("prefill", context)
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
