"""The public Gateway gRPC servicer: validates, runs the pipeline, maps errors to statuses in one place."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from common.logs import kv
from gateway import metrics
from gateway.errors import GatewayError
from gateway.pipeline import Pipeline
from gateway.validation import Limits, validate
from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

log = logging.getLogger("splitserve.gateway")


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, pipeline: Pipeline, limits: Limits) -> None:
        self.pipeline = pipeline
        self.limits = limits
        self.in_flight: set[str] = set()

    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        finish_reason, code = "", grpc.StatusCode.OK
        metrics.REQUESTS_IN_FLIGHT.inc()
        request_id = ""
        try:
            valid = validate(request, self.limits)
            request_id = valid.request_id
            if request_id in self.in_flight:
                raise GatewayError(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already in flight")
            self.in_flight.add(request_id)
            async for chunk in self.pipeline.generate(valid, deadline):
                response = gateway_pb2.GenerateResponse(request_id=request_id, text=chunk.text,
                                                        token_ids=chunk.token_ids, finish_reason=chunk.finish_reason)
                if chunk.finish_reason:
                    finish_reason = chunk.finish_reason
                    response.usage.prompt_tokens = chunk.prompt_tokens
                    response.usage.completion_tokens = chunk.completion_tokens
                yield response
        except GatewayError as exc:
            code = exc.code
            log.info("request failed %s", kv(request_id=request_id, code=code.name, message=exc.message))
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            code, finish_reason = grpc.StatusCode.CANCELLED, "abort"
            log.info("request cancelled %s", kv(request_id=request_id))
            raise
        except Exception as exc:  # a bug: say so, keep serving the others
            code = grpc.StatusCode.INTERNAL
            log.exception("request crashed %s", kv(request_id=request_id))
            await context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.in_flight.discard(request_id)
            metrics.REQUESTS_IN_FLIGHT.dec()
            label = finish_reason if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED) else "error"
            metrics.REQUESTS.labels(finish_reason=label, code=code.name).inc()

    async def GetModelInfo(self, request: common_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
                           ) -> common_pb2.ModelInfo:
        try:
            return await self.pipeline.model_info()
        except GatewayError as exc:
            await context.abort(exc.code, exc.message)
            raise  # unreachable
