"""KV-cache transfer between engines (disaggregated serving): a prefill engine computes a prompt and its first token
and streams the prompt's KV blocks to the decode engine that asked (`TransferKV` in engine.proto), which writes
them into blocks of its own and runs the sequence from there.

The decode engine drives it: it gives the sequence blocks (its prefix cache's for the prompt's longest cached
prefix), calls the prefill engine with its `KvLayout` and the number of leading blocks it holds, writes each
received chunk (checked by its crc32) and, with the last message, joins the sequence to its running batch. The
prefill engine refuses a layout other than its own (FAILED_PRECONDITION naming both), runs the prompt with
max_tokens 1 and a `KvExport` that hands over each chunk's full blocks as soon as its prefill step ends, so that
sending overlaps computing. Whatever ends a transfer early (the prefill engine died, a bad chunk, an abort) frees
the decode engine's blocks of it.
"""
from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import grpc
import torch

from common.security import TlsFiles, aio_channel
from common.server import GRPC_OPTIONS
from engine_service import metrics
from engine_service.engine import Engine, EngineFullError
from engine_service.intake import RequestError
from engine_service.kv_cache import KVCache
from engine_service.sampling import SamplingParams
from engine_service.sequence import Sequence, SequenceOutput, SequenceStatus, TokenLogprobs
from engine_service.streams import logprobs_to_proto
from engine_service.structured_output import CompiledGrammar
from splitserve.v1 import common_pb2, engine_pb2, engine_pb2_grpc

MAX_CHUNK_BYTES = 4 << 20          # payload per message: well under the 16 MiB message limit (common.server)


class TransferError(Exception):
    """A transfer that failed: the status the decode engine answers its caller with."""

    def __init__(self, code: grpc.StatusCode, message: str, prefill_address: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.prefill_address = prefill_address   # set when the prefill engine itself is at fault (retry another)


def layout_of(engine: Engine) -> engine_pb2.KvLayout:
    cache, runner = engine.runner.cache, engine.runner
    heads, _, head_dim = cache.k[0].shape
    return engine_pb2.KvLayout(model=engine.model_spec.name, dtype=str(cache.k[0].dtype).removeprefix("torch."),
                               block_size=runner.block_size, num_layers=len(cache.k), num_kv_heads=heads,
                               head_dim=head_dim)


def describe(layout: engine_pb2.KvLayout) -> str:
    return (f"{layout.model!r} ({layout.dtype}, {layout.num_layers} layers x {layout.num_kv_heads} kv heads x "
            f"{layout.head_dim}, blocks of {layout.block_size} tokens)")


def encode(first_block: int, num_blocks: int, data: torch.Tensor) -> engine_pb2.KvTransferChunk:
    """A kv_cache.read_blocks tensor as one message, with its checksum."""
    payload = data.contiguous().view(torch.uint8).numpy().tobytes()
    return engine_pb2.KvTransferChunk(first_block=first_block, num_blocks=num_blocks, payload=payload,
                                      crc32=zlib.crc32(payload))


def decode(chunk: engine_pb2.KvTransferChunk, layout: engine_pb2.KvLayout) -> torch.Tensor:
    """The tensor a chunk carries, checked against its checksum and our layout; raises TransferError."""
    if zlib.crc32(chunk.payload) != chunk.crc32:
        raise TransferError(grpc.StatusCode.DATA_LOSS, f"KV transfer chunk at block {chunk.first_block} failed its "
                                                       f"checksum")
    dtype = getattr(torch, layout.dtype)
    per_block = (2 * layout.num_layers * layout.num_kv_heads * layout.block_size * layout.head_dim
                 * torch.tensor([], dtype=dtype).element_size())
    if chunk.num_blocks < 1 or len(chunk.payload) != chunk.num_blocks * per_block:
        raise TransferError(grpc.StatusCode.DATA_LOSS, f"KV transfer chunk at block {chunk.first_block} has "
                                                       f"{len(chunk.payload)} bytes for {chunk.num_blocks} blocks")
    data = torch.frombuffer(bytearray(chunk.payload), dtype=torch.uint8).view(dtype)
    return data.reshape(layout.num_layers, 2, layout.num_kv_heads, chunk.num_blocks * layout.block_size,
                        layout.head_dim)


def logprobs_from_proto(proto: common_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(proto.token_id, proto.logprob, tuple((t.token_id, t.logprob) for t in proto.top))


@dataclass
class KvExport:
    """The prefill side of one transfer, called by the step loop: sends the sequence's blocks from `next_block`
    on, the full ones after each step, the partly filled last one when the prompt is done (before the blocks are
    freed). `send` is thread-safe (it posts to the event loop)."""
    next_block: int
    block_size: int
    block_bytes: int
    send: Callable[[engine_pb2.KvTransferChunk], None]

    def computed(self, seq: Sequence, cache: KVCache, final: bool) -> None:
        end = -(-seq.num_computed // self.block_size) if final else seq.num_computed // self.block_size
        end = min(end, len(seq.block_table))
        per_chunk = max(1, MAX_CHUNK_BYTES // self.block_bytes)
        while self.next_block < end:
            count = min(per_chunk, end - self.next_block)
            blocks = seq.block_table[self.next_block:self.next_block + count]
            self.send(encode(self.next_block, count, cache.read_blocks(blocks, self.block_size)))
            self.next_block += count


async def serve_transfer(engine: Engine, request: engine_pb2.KvTransferRequest, params: SamplingParams,
                         grammar: CompiledGrammar | None, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[engine_pb2.KvTransferChunk]:
    """The prefill side of TransferKV: runs the prompt for its first token and yields its blocks, then the token."""
    ours = layout_of(engine)
    if request.layout != ours:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"KV layout mismatch: this prefill engine serves {describe(ours)}, the decode engine "
                            f"{describe(request.layout)}")
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[engine_pb2.KvTransferChunk | SequenceOutput] = asyncio.Queue()

    def post(item: engine_pb2.KvTransferChunk | SequenceOutput) -> None:   # from the loop thread, in order
        loop.call_soon_threadsafe(items.put_nowait, item)

    block_bytes = (2 * ours.num_layers * ours.num_kv_heads * ours.block_size * ours.head_dim
                   * engine.runner.cache.k[0].element_size())
    seq = engine.intake.sequence(request.request_id, list(request.prompt_token_ids), replace(params, max_tokens=1),
                              post, request.replayed_tokens, grammar)   # the first token obeys the constraint too
    seq.export = KvExport(max(0, request.skip_blocks), ours.block_size, block_bytes, post)
    engine.add_sequence(seq)
    started, done = time.perf_counter(), False
    try:
        while True:
            item = await items.get()
            if isinstance(item, engine_pb2.KvTransferChunk):
                metrics.KV_TRANSFER_BYTES.labels(direction="sent").inc(len(item.payload))
                metrics.KV_TRANSFER_BLOCKS.labels(direction="sent").inc(item.num_blocks)
                yield item
                continue
            if not item.token_ids:   # aborted or failed before its first token
                await context.abort(grpc.StatusCode.INTERNAL if item.finish_reason == "error" else
                                    grpc.StatusCode.ABORTED, f"the prefill of {request.request_id!r} ended early")
            done = True
            last = engine_pb2.KvTransferChunk(done=True, first_token_id=item.token_ids[0])
            if item.logprobs:
                last.first_logprobs.CopyFrom(logprobs_to_proto(item.logprobs[0]))
            metrics.KV_TRANSFER_SECONDS.labels(direction="sent").observe(time.perf_counter() - started)
            yield last
            return
    finally:
        if not done:
            engine.abort(request.request_id)


class PrefillPeers:
    """The decode side: one channel per prefill engine address, and the transfer of one sequence's prompt."""

    def __init__(self, engine: Engine, tls: TlsFiles | None) -> None:
        self.engine = engine
        self.tls = tls
        self.layout = layout_of(engine)
        self._stubs: dict[str, engine_pb2_grpc.EngineStub] = {}

    def _stub(self, address: str) -> engine_pb2_grpc.EngineStub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = engine_pb2_grpc.EngineStub(aio_channel(address, self.tls, GRPC_OPTIONS))
        return stub

    async def _in_loop(self, function: Callable[..., Any], *args: Any) -> Any:
        """function(engine, *args) on the engine's loop thread."""
        return await asyncio.wrap_future(self.engine.call_in_loop(function, self.engine, *args))

    async def transfer(self, seq: Sequence, request: engine_pb2.PrefillRequest, timeout: float | None) -> float:
        """Fills seq's KV cache from the prefill engine and joins it to the running batch; returns the seconds the
        transfer took. Raises TransferError (seq then ended and its blocks freed) or EngineFullError."""
        address = request.prefill_engine_address
        skip = await self._in_loop(start_receiving, seq)
        metrics.KV_TRANSFER_SKIPPED_BLOCKS.inc(skip)
        started, received, joined = time.perf_counter(), 0, False
        call = None
        try:
            call = self._stub(address).TransferKV(engine_pb2.KvTransferRequest(
                request_id=request.request_id, prompt_token_ids=request.prompt_token_ids, sampling=request.sampling,
                replayed_tokens=request.replayed_tokens, layout=self.layout, skip_blocks=skip), timeout=timeout)
            async for chunk in call:
                if chunk.done:
                    logprobs = logprobs_from_proto(chunk.first_logprobs) if chunk.HasField("first_logprobs") else None
                    await self._in_loop(join_received, seq, chunk.first_token_id, logprobs)
                    joined = True
                    break
                data = decode(chunk, self.layout)
                try:
                    await self._in_loop(write_received, seq, chunk.first_block, data)
                except ValueError as exc:
                    raise TransferError(grpc.StatusCode.DATA_LOSS, str(exc)) from None
                received += len(chunk.payload)
                metrics.KV_TRANSFER_BLOCKS.labels(direction="received").inc(chunk.num_blocks)
            if not joined:
                raise TransferError(grpc.StatusCode.UNAVAILABLE, f"the prefill engine at {address} ended the "
                                                                 f"transfer early", address)
        except grpc.aio.AioRpcError as exc:
            raise _transfer_error(exc, address) from None
        finally:
            if not joined:
                self.engine.abort(seq.request_id)   # frees the blocks received so far
                if call is not None:
                    call.cancel()                   # the prefill engine stops computing it
            metrics.KV_TRANSFER_BYTES.labels(direction="received").inc(received)
        seconds = time.perf_counter() - started
        metrics.KV_TRANSFER_SECONDS.labels(direction="received").observe(seconds)
        return seconds


# -- the decode side's steps, each run on the engine's loop thread (Engine.call_in_loop) -------------------------
def start_receiving(engine: Engine, seq: Sequence) -> int:
    """Gives seq blocks for its prompt: its longest cached prefix, fresh blocks for the rest. Returns the number
    of leading blocks it already holds (the prefill engine skips them); EngineFullError when there is no room."""
    if seq.request_id in engine.live:
        raise RequestError(f"request {seq.request_id!r} is already running")
    blocks = engine.scheduler.blocks
    queried = blocks.match_prefix(seq)
    if not blocks.can_allocate(seq, seq.num_tokens):
        blocks.free(seq)
        raise EngineFullError("the engine's KV cache has no room for the prompt")
    blocks.allocate(seq, seq.num_tokens)
    engine.scheduler.prefix_queried_tokens += queried
    engine.scheduler.prefix_hit_tokens += seq.num_computed
    seq.status = SequenceStatus.RECEIVING
    seq.first_scheduled_time = time.perf_counter()
    engine.live[seq.request_id] = seq       # from now on an abort frees its blocks
    return seq.num_computed // blocks.block_size


def write_received(engine: Engine, seq: Sequence, first_block: int, data: torch.Tensor) -> None:
    """Writes received blocks [first_block, first_block + n) of seq's prompt (a KVCache.read_blocks tensor)."""
    if seq.status is not SequenceStatus.RECEIVING:   # aborted: its blocks may belong to another sequence now
        return
    block_size = engine.runner.block_size
    count = data.shape[3] // block_size
    if first_block < seq.num_computed // block_size or first_block + count > len(seq.block_table):
        raise ValueError(f"blocks [{first_block}, {first_block + count}) are not this prompt's to receive")
    engine.runner.cache.write_blocks(seq.block_table[first_block:first_block + count], block_size, data)


def join_received(engine: Engine, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
    """The prompt's KV cache is complete: seq joins the running batch with its first token (computed by the
    prefill engine). A sequence aborted meanwhile stays ended."""
    if seq.status is SequenceStatus.RECEIVING:
        engine.join_running(seq, token, logprobs)


def _transfer_error(exc: grpc.aio.AioRpcError, address: str) -> TransferError:
    code, detail = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return TransferError(code, f"the prefill engine at {address} refused the transfer: {detail}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED):
        return TransferError(grpc.StatusCode.UNAVAILABLE if code != grpc.StatusCode.RESOURCE_EXHAUSTED else code,
                             f"the prefill engine at {address} is unavailable: {detail}", address)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TransferError(code, "the request's deadline expired during the KV transfer")
    return TransferError(grpc.StatusCode.INTERNAL, f"the prefill engine at {address} failed: {detail}", address)
