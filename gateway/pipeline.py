"""One request's path: tokenize -> prefill -> decode stream -> detokenize stream, with stop strings, deadlines,
cancellation and the per-phase timings. Front doors (gRPC now, HTTP later) iterate `Pipeline.generate`."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from common.logs import kv
from common.server import GRPC_OPTIONS
from gateway import metrics
from gateway.channels import RECONNECT_OPTIONS, wait_ready
from gateway.errors import GatewayError, from_rpc_error
from gateway.router import EngineEndpoint, EngineRouter, RouterSettings
from gateway.stops import StopMatcher
from gateway.validation import ValidRequest, fit_max_tokens
from splitserve.v1 import common_pb2, engine_pb2, tokenizer_pb2, tokenizer_pb2_grpc

log = logging.getLogger("splitserve.gateway.pipeline")


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Timings:
    """Seconds per phase for one request, observed into the histograms once it ends."""
    received: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(metrics.PHASES, 0.0))
    first_chunk: float | None = None
    last_token: float | None = None
    engine_running: bool = False      # the engine holds a sequence for this request: abort it if we stop early
    engine: EngineEndpoint | None = None  # the engine the router chose for this request

    def observe(self) -> None:
        for phase, seconds in self.phases.items():
            metrics.PHASE_SECONDS.labels(phase=phase).observe(seconds)


class Pipeline:
    def __init__(self, tokenizer_address: str, engine_address: str,
                 router_settings: RouterSettings = RouterSettings()) -> None:
        self.tokenizer_address = tokenizer_address
        self.engine_address = engine_address
        self._tokenizer_channel = grpc.aio.insecure_channel(tokenizer_address,
                                                            options=[*GRPC_OPTIONS, *RECONNECT_OPTIONS])
        self.tokenizer = tokenizer_pb2_grpc.TokenizerStub(self._tokenizer_channel)
        self.router = EngineRouter(engine_address, router_settings)  # one engine or several: see router.py
        self._model_info: common_pb2.ModelInfo | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        await self._tokenizer_channel.close()
        await self.router.close()

    async def model_info(self, timeout: float | None = 10.0) -> common_pb2.ModelInfo:
        if self._model_info is None:
            await self.router.start()
            candidates = self.router.candidates()
            for endpoint in candidates:  # any engine will do: they all serve the same model
                try:
                    self._model_info = await endpoint.stub.GetModelInfo(common_pb2.GetModelInfoRequest(),
                                                                        timeout=timeout)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or endpoint is candidates[-1]:
                        raise from_rpc_error(exc, "engine", endpoint.address) from None
                    self.router.mark_unavailable(endpoint, "GetModelInfo: UNAVAILABLE")
        assert self._model_info is not None
        return self._model_info

    async def generate(self, request: ValidRequest, deadline: float | None) -> AsyncIterator[Chunk]:
        """Yields chunks of new text; the last has finish_reason and usage. Raises GatewayError."""
        timings = Timings()
        try:
            async for chunk in self._generate(request, deadline, timings):
                if timings.first_chunk is None:
                    timings.first_chunk = time.perf_counter()
                    metrics.TIME_TO_FIRST_TOKEN.observe(timings.first_chunk - timings.received)
                yield chunk
            metrics.E2E_LATENCY.observe(time.perf_counter() - timings.received)
            timings.observe()
        except GatewayError as exc:
            # Once the deadline has passed, a downstream call may fail in any way (a stream cut mid-write reports
            # INTERNAL): the cause is the deadline.
            if deadline is not None and time.monotonic() >= deadline and exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline expired") from exc
            raise
        finally:
            if timings.engine is not None:
                self.router.release(timings.engine)
                if timings.engine_running:
                    self._abort_in_background(request.request_id, timings.engine)

    async def _generate(self, request: ValidRequest, deadline: float | None,
                        timings: Timings) -> AsyncIterator[Chunk]:
        def remaining() -> float | None:
            if deadline is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline expired")
            return left

        info = await self.model_info(remaining())
        # 1. Tokenize.
        started = time.perf_counter()
        tokenize = tokenizer_pb2.TokenizeRequest()
        if request.prompt is not None:
            tokenize.prompt = request.prompt
        else:
            tokenize.messages.extend(common_pb2.ChatMessage(role=r, content=c) for r, c in request.messages or [])
        try:
            await wait_ready(self._tokenizer_channel, remaining())
            prompt_ids = list((await self.tokenizer.Tokenize(tokenize, timeout=remaining())).token_ids)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "tokenizer", self.tokenizer_address) from None
        timings.phases["tokenize"] = time.perf_counter() - started
        fit_max_tokens(request, len(prompt_ids), info.max_context_length, info.vocab_size)
        metrics.PROMPT_TOKENS.inc(len(prompt_ids))

        # 2. Prefill: the engine admits the sequence, returns its first token and keeps decoding.
        #    An engine that is unreachable (or full) before the first token is safe to leave for another one.
        started = time.perf_counter()
        tried: list[str] = []
        while True:
            engine = await self.router.pick(prompt_ids, exclude=tried)
            timings.engine = engine
            try:
                await wait_ready(engine.channel, remaining())
                prefill = await engine.stub.Prefill(
                    engine_pb2.PrefillRequest(request_id=request.request_id, prompt_token_ids=prompt_ids,
                                              sampling=request.sampling), timeout=remaining())
                break
            except grpc.aio.AioRpcError as exc:
                retry = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    self.router.mark_unavailable(engine, "Prefill: UNAVAILABLE")
                tried.append(engine.address)
                if not retry or not self.router.candidates(exclude=tried):
                    raise from_rpc_error(exc, "engine", engine.address) from None
                self.router.release(engine)
                timings.engine = None
                log.info("prefill retried on another engine %s",
                         kv(request_id=request.request_id, engine=engine.address, code=exc.code().name))
        prefill_done = time.perf_counter()
        timings.phases["queue"] = prefill.queue_seconds
        timings.phases["prefill"] = max(0.0, prefill_done - started - prefill.queue_seconds)
        timings.last_token = prefill_done
        timings.engine_running = not prefill.finish_reason

        # 3 + 4. Decode stream -> detokenize stream -> stop strings -> client.
        stops = StopMatcher(request.stop)
        completion: list[int] = []
        pending_ids: list[int] = []
        detokenize = self.tokenizer.Detokenize(timeout=remaining())
        batches = self._token_batches(prefill, request.request_id, remaining, engine)
        try:
            async for token_ids, reason in batches:
                if reason:
                    timings.engine_running = False
                now = time.perf_counter()
                if completion:
                    gap = (now - (timings.last_token or now)) / max(1, len(token_ids))
                    for _ in token_ids:
                        metrics.INTER_TOKEN_LATENCY.observe(gap)
                timings.last_token = now
                completion.extend(token_ids)
                metrics.GENERATION_TOKENS.inc(len(token_ids))
                started = time.perf_counter()
                try:
                    await detokenize.write(tokenizer_pb2.DetokenizeRequest(token_ids=token_ids, final=bool(reason)))
                    delta = await detokenize.read()
                except grpc.aio.AioRpcError as exc:
                    raise from_rpc_error(exc, "tokenizer", self.tokenizer_address) from None
                if delta is grpc.aio.EOF:
                    raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the tokenizer closed the detokenize stream")
                timings.phases["detokenize"] += time.perf_counter() - started
                text = stops.feed(delta.text, final=bool(reason))
                pending_ids.extend(token_ids)
                if stops.stopped:
                    reason = "stop"
                if reason:
                    timings.phases["decode"] = now - prefill_done
                    yield Chunk(text, pending_ids, reason, len(prompt_ids), len(completion))
                    return
                if text:
                    yield Chunk(text, pending_ids)
                    pending_ids = []
        finally:
            detokenize.cancel()
            await batches.aclose()

    async def _token_batches(self, prefill: engine_pb2.PrefillResponse, request_id: str,
                             remaining, engine: EngineEndpoint) -> AsyncIterator[tuple[list[int], str]]:
        """The first token, then the engine's decode stream, as (token_ids, finish_reason) pairs."""
        yield [prefill.token_id], prefill.finish_reason
        if prefill.finish_reason:
            return
        decode = engine.stub.Decode(engine_pb2.DecodeRequest(request_id=request_id), timeout=remaining())
        try:
            async for message in decode:
                yield list(message.token_ids), message.finish_reason
                if message.finish_reason:
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:  # the engine died mid-stream: the request ends here
                self.router.mark_unavailable(engine, "Decode: UNAVAILABLE")
            raise from_rpc_error(exc, "engine", engine.address) from None
        finally:
            decode.cancel()
        raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the engine ended the decode stream without a finish reason")

    def _abort_in_background(self, request_id: str, engine: EngineEndpoint) -> None:
        """Tells the engine to free the sequence; runs even while the request's own task is being cancelled."""
        async def abort() -> None:
            try:
                await engine.stub.Abort(engine_pb2.AbortRequest(request_id=request_id), timeout=5)
            except grpc.aio.AioRpcError as exc:
                log.warning("abort failed %s", kv(request_id=request_id, code=str(exc.code())))

        task = asyncio.get_running_loop().create_task(abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
