"""The public Gateway gRPC servicer: protobuf in and out around the FrontDoor; GatewayError -> gRPC status."""
from __future__ import annotations

import time
from contextlib import aclosing

import grpc

from common.security import authorization_of
from gateway.client_limit import client_of
from gateway.errors import GatewayError
from gateway.front_door import FrontDoor
from gateway.writes import StalledClient, write_bounded
from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, service: FrontDoor, write_timeout: float = 30.0, keyed: bool = False) -> None:
        self.service = service
        self.write_timeout = write_timeout
        self.keyed = keyed     # API keys are required: a client is its key, not its address

    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        client = client_of(authorization_of(context.invocation_metadata()), context.peer(), self.keyed)
        try:
            async with aclosing(self.service.generate(request, deadline, client)) as chunks:
                async for chunk in chunks:
                    response = gateway_pb2.GenerateResponse(request_id=request.request_id, text=chunk.text,
                                                            token_ids=chunk.token_ids,
                                                            finish_reason=chunk.finish_reason, index=chunk.index,
                                                            logprobs=chunk.logprobs)
                    if chunk.finish_reason:
                        response.usage.prompt_tokens = chunk.prompt_tokens
                        response.usage.completion_tokens = chunk.completion_tokens
                    await write_bounded(context.write(response), self.write_timeout, request.request_id)
        except GatewayError as exc:
            await context.abort(exc.code, exc.message)
        except StalledClient as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))

    async def GetModelInfo(self, request: common_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
                           ) -> common_pb2.ModelInfo:
        try:
            return await self.service.model_info()
        except GatewayError as exc:
            await context.abort(exc.code, exc.message)
            raise  # unreachable
