"""Measures splitserve through its public gRPC API: per-request TTFT and time per output token, and throughput."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


@dataclass
class RequestTiming:
    start: float
    first: float
    last: float
    tokens: int

    @property
    def ttft(self) -> float:
        return self.first - self.start

    @property
    def tpot(self) -> float:
        return (self.last - self.first) / max(1, self.tokens - 1)


async def _one(stub: gateway_pb2_grpc.GatewayStub, prompt_ids: str | list[tuple[str, str]], max_tokens: int,
               constraint: common_pb2.StructuredOutput | None = None) -> RequestTiming:
    request = gateway_pb2.GenerateRequest(
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                           structured_output=constraint))
    if isinstance(prompt_ids, str):
        request.prompt = prompt_ids
    else:
        request.messages.extend(common_pb2.ChatMessage(role=r, content=c) for r, c in prompt_ids)
    start = time.perf_counter()
    first = None
    tokens = 0
    async for chunk in stub.Generate(request):
        if first is None:
            first = time.perf_counter()
        tokens += len(chunk.token_ids)
    return RequestTiming(start, first or start, time.perf_counter(), tokens)


async def _many(address: str, prompts: list, max_tokens: int, constraints: list | None
                ) -> tuple[list[RequestTiming], float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        started = time.perf_counter()
        timings = await asyncio.gather(*(_one(stub, p, max_tokens, c)
                                         for p, c in zip(prompts, constraints or [None] * len(prompts))))
        return list(timings), time.perf_counter() - started


def run_concurrent(address: str, prompts: list, max_tokens: int,
                   constraints: list[common_pb2.StructuredOutput | None] | None = None
                   ) -> tuple[list[RequestTiming], float]:
    """Sends all prompts at once (each with its structured-output constraint, if any); returns each request's
    timing and the wall time."""
    return asyncio.run(_many(address, prompts, max_tokens, constraints))
