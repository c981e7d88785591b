"""The front door both protocol servers (gRPC: grpc_server.py; OpenAI's HTTP API: openai/server.py) hand each
request to: validation, duplicate ids, admission (concurrency limits, shutdown), the deadline, the pipeline, and
the per-request metrics — once, for both."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from common.logs import kv
from gateway import metrics
from gateway.admission import Admission
from gateway.client_limit import ClientLimit
from gateway.errors import GatewayError
from gateway.pipeline import Chunk, Pipeline
from gateway.validation import Limits, validate
from splitserve.v1 import common_pb2, gateway_pb2, tokenizer_pb2

log = logging.getLogger("splitserve.gateway")


class FrontDoor:
    def __init__(self, pipeline: Pipeline, limits: Limits, admission: Admission,
                 request_timeout: float | None = None, client_limit: ClientLimit | None = None) -> None:
        self.pipeline = pipeline
        self.limits = limits
        self.admission = admission
        self.client_limit = client_limit or ClientLimit()
        self.request_timeout = request_timeout   # seconds; a client's own shorter deadline wins
        self.in_flight: set[str] = set()

    @property
    def draining(self) -> bool:
        return self.admission.draining

    def start_draining(self) -> None:
        """New requests are refused from now on; those in flight go on."""
        self.admission.start_draining()

    async def model_info(self) -> common_pb2.ModelInfo:
        return await self.pipeline.model_info()

    async def tokenizer_info(self) -> tokenizer_pb2.TokenizerInfo:
        return await self.pipeline.tokenizer_info()

    async def generate(self, request: gateway_pb2.GenerateRequest, deadline: float | None, client: str = ""
                       ) -> AsyncIterator[Chunk]:
        """Yields the pipeline's chunks; raises GatewayError (a bug becomes INTERNAL). `deadline`: time.monotonic();
        `client`: who sent it (client_limit.client_of), for the per-client cap."""
        if self.request_timeout:
            limit = time.monotonic() + self.request_timeout
            deadline = limit if deadline is None else min(deadline, limit)
        finish_reason, code = "", grpc.StatusCode.OK
        request_id = ""
        metrics.REQUESTS_IN_FLIGHT.inc()
        try:
            valid = validate(request, self.limits)
            if valid.request_id in self.in_flight:
                raise GatewayError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"request_id {valid.request_id!r} is already in flight")
            request_id = valid.request_id
            self.in_flight.add(request_id)
            with self.client_limit.hold(client):
                async with self.admission.slot(deadline, weight=valid.sequences):   # one slot per engine sequence
                    async with aclosing(self.pipeline.generate(valid, deadline)) as chunks:
                        async for chunk in chunks:
                            if chunk.finish_reason:
                                finish_reason = chunk.finish_reason
                            yield chunk
        except GatewayError as exc:
            code = exc.code
            log.info("request failed %s", kv(request_id=request_id, code=code.name, message=exc.message))
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code, finish_reason = grpc.StatusCode.CANCELLED, "abort"
            log.info("request cancelled %s", kv(request_id=request_id))
            raise
        except Exception as exc:  # a bug: say so, keep serving the others
            code = grpc.StatusCode.INTERNAL
            log.exception("request crashed %s", kv(request_id=request_id))
            raise GatewayError(code, f"internal error while serving request {request_id!r}; the details are in the "
                                     f"gateway's log") from exc   # never the exception's text: it may hold internals
        finally:
            self.in_flight.discard(request_id)
            metrics.REQUESTS_IN_FLIGHT.dec()
            label = finish_reason if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED) else "error"
            metrics.REQUESTS.labels(finish_reason=label, code=code.name).inc()
