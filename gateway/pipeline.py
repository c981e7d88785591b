"""One request's path: tokenize -> prefill -> decode stream -> detokenize stream, with stop strings, deadlines,
cancellation and the per-phase timings; with n > 1, one engine sequence per completion, their chunks merged.
Both front doors (through gateway/front_door.py) iterate `Pipeline.generate`."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.disaggregation import PREFILL_UNAVAILABLE
from common.logs import kv
from common.security import TlsFiles, aio_channel
from gateway import metrics
from gateway.channels import CHANNEL_OPTIONS, SPREAD_OPTIONS, SPREAD_STREAMS, spreads, wait_ready
from gateway.detokenize import SharedDetokenizer
from gateway.errors import GatewayError, deadline_expired, from_rpc_error
from gateway.failover import is_engine_lost, replay
from gateway.router import EngineEndpoint, EngineRouter, RouterSettings
from gateway.stops import StopMatcher
from gateway.text_stream import TextPiece, TextStream
from gateway.token_text_cache import TokenTextCache
from gateway.validation import ValidRequest, fit_max_tokens
from splitserve.v1 import common_pb2, engine_pb2, tokenizer_pb2, tokenizer_pb2_grpc

TOKENIZER_SERVICE = "splitserve.v1.Tokenizer"

log = logging.getLogger("splitserve.gateway.pipeline")

Remaining = Callable[[], float | None]   # seconds left before the request's deadline; raises once it passed


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0                                  # which completion, 0..n-1
    # One per token id when sampling.logprobs is set, with the token texts filled in; token_bytes holds the raw
    # bytes of every id they name (OpenAI's `bytes`).
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    token_bytes: dict[int, bytes] = field(default_factory=dict)


@dataclass
class Timings:
    """Seconds per phase for one request, observed into the histograms once it ends. With n completions, the
    engine phases are the slowest completion's and detokenize the sum."""
    received: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(metrics.PHASES, 0.0))
    first_chunk: float | None = None

    def slowest(self, phase: str, seconds: float) -> None:
        self.phases[phase] = max(self.phases.get(phase, 0.0), seconds)

    def observe(self) -> None:
        for phase, seconds in self.phases.items():
            metrics.PHASE_SECONDS.labels(phase=phase).observe(seconds)


@dataclass
class Completion:
    """One engine sequence: the whole request when n = 1, else one of its n completions."""
    index: int
    request_id: str                            # the engine's id: the request's, or "<request_id>/<index>"
    sampling: common_pb2.SamplingParams
    engine: EngineEndpoint | None = None       # the engine the router chose for it
    running: bool = False                      # the engine holds the sequence: abort it if we stop early
    last_token: float | None = None            # when the last tokens arrived (the first: when prefill answered)
    tokens_received: int = 0

    def tokens_arrived(self, count: int) -> float:
        """Observes the inter-token latency of tokens that arrive together (the gap since the last ones, spread
        over them; the first token's gap is the TTFT's business) and counts them. Returns the time now."""
        now = time.perf_counter()
        if self.tokens_received:
            gap = (now - (self.last_token or now)) / max(1, count)
            for _ in range(count):
                metrics.INTER_TOKEN_LATENCY.observe(gap)
        self.last_token = now
        self.tokens_received += count
        metrics.GENERATION_TOKENS.inc(count)
        return now


def completions_of(request: ValidRequest) -> list[Completion]:
    """n = 1: the request itself. n > 1: ids "<id>/<i>", and seed + i so that seeded completions differ but are
    reproducible (the engine shares the prompt's KV cache between them through its prefix cache)."""
    if request.n == 1:
        return [Completion(0, request.request_id, request.sampling)]
    completions = []
    for index in range(request.n):
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        if sampling.HasField("seed"):
            sampling.seed = (sampling.seed + index + 2**63) % 2**64 - 2**63   # wraps within int64
        completions.append(Completion(index, f"{request.request_id}/{index}", sampling))
    return completions


def _remaining(deadline: float | None) -> Remaining:
    def remaining() -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise deadline_expired()
        return left
    return remaining


class Pipeline:
    def __init__(self, tokenizer_address: str, engine_address: str,
                 router_settings: RouterSettings = RouterSettings(), tls: TlsFiles | None = None,
                 max_failovers: int = 1, prefill_engine_address: str = "") -> None:
        self.tokenizer_address = tokenizer_address
        self.max_failovers = max_failovers          # per engine sequence (gateway/failover.py)
        self.engine_address = engine_address
        spread = spreads(tokenizer_address)   # several tokenizers behind one name: calls and streams spread over them
        self._tokenizer_channel = aio_channel(tokenizer_address, tls,
                                              CHANNEL_OPTIONS + (SPREAD_OPTIONS if spread else []))
        self._tokenizer_health = health_pb2_grpc.HealthStub(self._tokenizer_channel)
        self.tokenizer = tokenizer_pb2_grpc.TokenizerStub(self._tokenizer_channel)
        self.token_texts = TokenTextCache(self.tokenizer, tokenizer_address)
        self.detokenizer = SharedDetokenizer(self.tokenizer, tokenizer_address, SPREAD_STREAMS if spread else 1)
        self.router = EngineRouter(engine_address, router_settings, tls)  # one engine or several: see router.py
        # Disaggregated serving: prompts are computed on these and their KV caches sent to the engine decoding.
        self.prefill_router = EngineRouter(prefill_engine_address, router_settings, tls) \
            if prefill_engine_address else None
        self._model_info: common_pb2.ModelInfo | None = None
        self._tokenizer_info: tokenizer_pb2.TokenizerInfo | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        self.detokenizer.close()
        await self._tokenizer_channel.close()
        await self.router.close()
        if self.prefill_router is not None:
            await self.prefill_router.close()

    async def upstreams_serving(self, timeout: float) -> tuple[bool, int]:
        """Whether the tokenizer answers SERVING, and how many engines passed their last health check."""
        await self.router.start()
        try:
            reply = await self._tokenizer_health.Check(health_pb2.HealthCheckRequest(service=TOKENIZER_SERVICE),
                                                       timeout=timeout)
            tokenizer = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            tokenizer = False
        return tokenizer, self.router.serving_engines()

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

    async def tokenizer_info(self, timeout: float | None = 10.0) -> tokenizer_pb2.TokenizerInfo:
        """The tokenizer's description (the chat template's tool support); asked once."""
        if self._tokenizer_info is None:
            try:
                await wait_ready(self._tokenizer_channel, timeout)
                self._tokenizer_info = await self.tokenizer.GetInfo(tokenizer_pb2.GetTokenizerInfoRequest(),
                                                                    timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc, "tokenizer", self.tokenizer_address) from None
        return self._tokenizer_info

    async def generate(self, request: ValidRequest, deadline: float | None) -> AsyncIterator[Chunk]:
        """Yields chunks of new text; each completion's last chunk has finish_reason and usage. Raises
        GatewayError. Closing the generator early aborts the engine sequences still running."""
        timings = Timings()
        try:
            async with aclosing(self._generate(request, _remaining(deadline), timings)) as chunks:
                async for chunk in chunks:
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
                raise deadline_expired() from exc
            raise

    async def _generate(self, request: ValidRequest, remaining: Remaining,
                        timings: Timings) -> AsyncIterator[Chunk]:
        info = await self.model_info(remaining())
        # 1. Tokenize (once, for all completions).
        started = time.perf_counter()
        tokenize = tokenizer_pb2.TokenizeRequest()
        if request.prompt is not None:
            tokenize.prompt = request.prompt
        else:
            tokenize.messages.extend(request.messages or [])
            tokenize.tools.extend(request.tools)
        try:
            await wait_ready(self._tokenizer_channel, remaining())
            prompt_ids = list((await self.tokenizer.Tokenize(tokenize, timeout=remaining())).token_ids)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "tokenizer", self.tokenizer_address) from None
        timings.phases["tokenize"] = time.perf_counter() - started
        fit_max_tokens(request, len(prompt_ids), info.max_context_length, info.vocab_size)
        metrics.PROMPT_TOKENS.inc(len(prompt_ids))

        completions = completions_of(request)
        if len(completions) == 1:
            chunks = self._complete(request, completions[0], prompt_ids, remaining, timings)
        else:
            chunks = self._fan_out(request, completions, prompt_ids, remaining, timings)
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    async def _fan_out(self, request: ValidRequest, completions: list[Completion], prompt_ids: list[int],
                       remaining: Remaining, timings: Timings) -> AsyncIterator[Chunk]:
        """Runs the n completions at once and yields their chunks as they come (interleaved, each with its index).
        The engine computes the shared prompt once: it holds the others back while the first prefills it, then
        takes its blocks from the prefix cache. A failure of one, or the request ending early, ends them all
        (their engine sequences are aborted)."""
        queue: asyncio.Queue[Chunk | Exception | None] = asyncio.Queue()   # None: one completion is done

        async def run(completion: Completion) -> None:
            try:
                async with aclosing(self._complete(request, completion, prompt_ids, remaining, timings)) as chunks:
                    async for chunk in chunks:
                        queue.put_nowait(chunk)
                queue.put_nowait(None)
            except Exception as exc:  # GatewayError, or a bug: the request fails with it
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(run(completion)) for completion in completions]
        try:
            done = 0
            while done < len(tasks):
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _complete(self, request: ValidRequest, completion: Completion, prompt_ids: list[int],
                        remaining: Remaining, timings: Timings) -> AsyncIterator[Chunk]:
        """One engine sequence: prefill, then decode -> detokenize -> stop strings, as chunks with its index."""
        try:
            # 2. Prefill: the engine admits the sequence, returns its first token and keeps decoding.
            started = time.perf_counter()
            prefill = await self._prefill(completion, prompt_ids, remaining)
            prefill_done = time.perf_counter()
            timings.slowest("queue", prefill.queue_seconds)
            timings.slowest("prefill", max(0.0, prefill_done - started - prefill.queue_seconds))
            if self.prefill_router is not None:
                timings.slowest(metrics.KV_TRANSFER, prefill.kv_transfer_seconds)
            completion.last_token = prefill_done
            completion.running = not prefill.finish_reason

            # 3 + 4. Decode stream -> detokenize stream -> stop strings -> client.
            want_logprobs = completion.sampling.HasField("logprobs")
            stream = TextStream(self.detokenizer.sequence(remaining()), StopMatcher(request.stop))
            batches = self._token_batches(prefill, completion, prompt_ids, remaining)
            try:
                async for token_ids, reason, logprobs in batches:
                    if reason:
                        completion.running = False
                    if want_logprobs and len(logprobs) != len(token_ids):
                        raise GatewayError(grpc.StatusCode.INTERNAL, f"the engine sent {len(logprobs)} logprobs for "
                                                                     f"{len(token_ids)} tokens")
                    now = completion.tokens_arrived(len(token_ids))
                    started = time.perf_counter()
                    piece = await stream.add(token_ids, logprobs, reason)
                    timings.phases["detokenize"] += time.perf_counter() - started
                    if piece is None:
                        continue
                    chunk = await self._chunk(completion, piece, remaining)
                    if piece.finish_reason:
                        timings.slowest("decode", now - prefill_done)
                        chunk.prompt_tokens, chunk.completion_tokens = len(prompt_ids), stream.kept
                    yield chunk
                    if piece.finish_reason:
                        return
            finally:
                stream.detokenize.close()
                await batches.aclose()
        finally:
            if completion.engine is not None:
                self.router.release(completion.engine)
                if completion.running:
                    self._abort_in_background(completion.request_id, completion.engine)

    async def _prefill(self, completion: Completion, prompt_ids: list[int], remaining: Remaining,
                       sampling: common_pb2.SamplingParams | None = None, replayed_tokens: int = 0,
                       exclude: list[str] | None = None) -> engine_pb2.PrefillResponse:
        """An engine that is unreachable (or full) before the first token is safe to leave for another one.
        sampling and replayed_tokens differ from the completion's for a failover's replay."""
        tried: list[str] = list(exclude or [])
        tried_prefill: list[str] = []
        while True:
            engine = await self.router.pick(prompt_ids, exclude=tried)
            completion.engine = engine
            prefill_engine = None
            try:
                if self.prefill_router is not None:
                    prefill_engine = await self.prefill_router.pick(prompt_ids, exclude=tried_prefill)
                await wait_ready(engine.channel, remaining())
                return await engine.stub.Prefill(
                    engine_pb2.PrefillRequest(request_id=completion.request_id, prompt_token_ids=prompt_ids,
                                              sampling=sampling or completion.sampling,
                                              replayed_tokens=replayed_tokens,
                                              prefill_engine_address=prefill_engine.address if prefill_engine else ""),
                    timeout=remaining())
            except grpc.aio.AioRpcError as exc:
                if prefill_engine is not None and self._prefill_engine_failed(exc, prefill_engine, tried_prefill):
                    self.router.release(engine)
                    completion.engine = None
                    continue
                retry = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    self.router.mark_unavailable(engine, "Prefill: UNAVAILABLE")
                tried.append(engine.address)
                if not retry or not self.router.candidates(exclude=tried):
                    raise from_rpc_error(exc, "engine", engine.address) from None
                self.router.release(engine)
                completion.engine = None
                log.info("prefill retried on another engine %s",
                         kv(request_id=completion.request_id, engine=engine.address, code=exc.code().name))
            finally:
                if prefill_engine is not None:
                    assert self.prefill_router is not None
                    self.prefill_router.release(prefill_engine)

    def _prefill_engine_failed(self, exc: grpc.aio.AioRpcError, prefill_engine: EngineEndpoint,
                               tried: list[str]) -> bool:
        """Whether the decode engine reports that the prefill engine failed and another one may be tried (it
        says so in trailing metadata); raises when none is left."""
        assert self.prefill_router is not None
        if not any(key == PREFILL_UNAVAILABLE for key, _ in exc.trailing_metadata() or ()):
            return False
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            self.prefill_router.mark_unavailable(prefill_engine, "TransferKV: UNAVAILABLE")
        tried.append(prefill_engine.address)
        if not self.prefill_router.candidates(exclude=tried):
            raise GatewayError(exc.code(), exc.details() or "the prefill engine failed") from None
        log.info("prefill retried on another prefill engine %s", kv(engine=prefill_engine.address,
                                                                     code=exc.code().name))
        return True

    async def _chunk(self, completion: Completion, piece: TextPiece, remaining: Remaining) -> Chunk:
        chunk = Chunk(piece.text, piece.token_ids, piece.finish_reason, index=completion.index,
                      logprobs=piece.logprobs)
        if piece.logprobs:
            chunk.token_bytes = await self.token_texts.fill(piece.logprobs, remaining)
        return chunk

    async def _token_batches(self, prefill: engine_pb2.PrefillResponse, completion: Completion,
                             prompt_ids: list[int], remaining: Remaining
                             ) -> AsyncIterator[tuple[list[int], str, list[common_pb2.TokenLogprobs]]]:
        """The completion's tokens as (token_ids, finish_reason, logprobs), from its engine and, when that engine
        is lost mid-stream, from the engines it fails over to (gateway/failover.py)."""
        generated: list[int] = []
        failovers, skip = 0, 0
        while True:
            try:
                async with aclosing(self._engine_batches(prefill, completion, remaining)) as batches:
                    async for token_ids, reason, logprobs in batches:
                        if skip:   # a restarted beam search: the client has these already
                            dropped = min(skip, len(token_ids))
                            token_ids, logprobs, skip = token_ids[dropped:], logprobs[dropped:], skip - dropped
                            if not token_ids and not reason:
                                continue
                        generated.extend(token_ids)
                        yield token_ids, reason, logprobs
                return
            except GatewayError as exc:
                lost = completion.engine
                assert lost is not None
                if (not is_engine_lost(exc) or failovers >= self.max_failovers
                        or not self.router.candidates(exclude=[lost.address])):
                    raise
            failovers += 1
            metrics.FAILOVERS.labels(reason="engine_unavailable").inc()
            log.warning("engine lost mid-stream; failing over %s", kv(
                request_id=completion.request_id, engine=lost.address, tokens=len(generated)))
            self.router.release(lost)
            completion.engine, completion.running = None, False
            plan = replay(prompt_ids, generated, completion.sampling)
            prefill = await self._prefill(completion, plan.context, remaining, plan.sampling, plan.replayed_tokens,
                                          exclude=[lost.address])
            completion.running = not prefill.finish_reason
            skip = plan.skip

    async def _engine_batches(self, prefill: engine_pb2.PrefillResponse, completion: Completion, remaining: Remaining
                              ) -> AsyncIterator[tuple[list[int], str, list[common_pb2.TokenLogprobs]]]:
        """The first token, then the sequence's outputs from the engine's Decode stream, as (token_ids,
        finish_reason, logprobs)."""
        engine = completion.engine
        assert engine is not None
        yield [prefill.token_id], prefill.finish_reason, [prefill.logprobs] if prefill.HasField("logprobs") else []
        if prefill.finish_reason:
            return
        decode = engine.decode.attach(completion.request_id, remaining())
        try:
            while True:
                output = await decode.next()
                yield list(output.token_ids), output.finish_reason, list(output.logprobs)
                if output.finish_reason:
                    return
        except GatewayError as exc:
            if exc.code == grpc.StatusCode.UNAVAILABLE:  # the engine died mid-stream: the request ends here
                self.router.mark_unavailable(engine, "Decode: UNAVAILABLE")
            raise
        finally:
            decode.close()

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
