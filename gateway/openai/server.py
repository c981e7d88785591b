"""The OpenAI-compatible HTTP API, served by aiohttp on the gateway's event loop beside the gRPC server.

One implementation, two front doors: each handler turns OpenAI JSON into the public `GenerateRequest`
(request.py), runs it through the same `FrontDoor.generate` as the gRPC API (same validation, limits, pipeline
and metrics), and answers in OpenAI's objects (reply.py).

Routes: POST /v1/completions, POST /v1/chat/completions (server-sent events with `"stream": true`), GET /v1/models,
GET /health (readiness), GET /health/live, GET /metrics. Every route but health (and /metrics unless keyed) needs
the API key when the gateway has one; POST bodies must be JSON (see http_guard.py). Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc
import prometheus_client
from aiohttp import web

from common.logs import clip
from common.security import ApiKeys
from gateway import metrics
from gateway.client_limit import client_of
from gateway.errors import GatewayError
from gateway.front_door import FrontDoor
from gateway.http_guard import guard
from gateway.openai.params import ParamError
from gateway.openai.reply import Reply, error_body, error_response, sse
from gateway.openai.request import OpenAIRequest, generate_request, read_body, requested_model, stream_options
from gateway.openai.tool_calls import ToolCallParser
from gateway.pipeline import Chunk
from gateway.validation import assign_request_id
from gateway.writes import StalledClient, write_bounded

log = logging.getLogger("splitserve.gateway.http")
STREAM_BUFFER_BYTES = 64 * 1024


def bound_stream_buffers(request: web.Request) -> None:
    """A client that stops reading a stream makes the gateway's writes wait after ~64 KiB, not after the kernel's
    autotuned send buffer (megabytes, thousands of events), so the write timeout notices it within seconds."""
    if request.transport is None:
        return
    request.transport.set_write_buffer_limits(high=STREAM_BUFFER_BYTES)
    sock = request.transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_BUFFER_BYTES)


class OpenAIServer:
    def __init__(self, service: FrontDoor, served_model_name: str = "", max_body_bytes: int = 2 * 1024 * 1024,
                 shutdown_grace: float = 30.0, api_keys: ApiKeys = ApiKeys([]), keyed_metrics: bool = False,
                 ssl_context: ssl.SSLContext | None = None, ready: Callable[[], bool] = lambda: True,
                 write_timeout: float = 30.0) -> None:
        self.service = service
        self.keyed = bool(api_keys)    # a client is its key when keys are required, else its address
        self.served_model_name = served_model_name
        self.created = int(time.time())
        self.ssl_context = ssl_context
        self.ready = ready
        self.write_timeout = write_timeout
        self.app = web.Application(client_max_size=max_body_bytes,
                                   middlewares=[self._errors, guard(api_keys, keyed_metrics)])
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/health/live", self.live),
            web.get("/metrics", self.metrics),
        ])
        # handler_cancellation: a client that disconnects cancels its handler, which aborts the engine sequence.
        self.runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=shutdown_grace,
                                    access_log=None)
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=self.ssl_context)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        """Stops listening, lets in-flight requests finish within the shutdown grace, then cancels them."""
        await self.runner.cleanup()

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            return await handler(request)
        except GatewayError as exc:
            return error_response(exc)
        except web.HTTPException as exc:   # unknown route, wrong method, body too large
            if exc.status < 400:
                raise
            code = grpc.StatusCode.NOT_FOUND if exc.status in (404, 405) else grpc.StatusCode.INVALID_ARGUMENT
            _, body = error_body(code, f"{request.method} {request.path}: {exc.reason}")
            return web.json_response(body, status=exc.status)
        except Exception:  # a bug: say so (in the log only), keep serving the others
            log.exception("HTTP handler crashed %s", request.path)
            _, body = error_body(grpc.StatusCode.INTERNAL, "internal error; the details are in the gateway's log")
            return web.json_response(body, status=500)

    async def _model_name(self) -> str:
        return self.served_model_name or (await self.service.model_info()).model

    async def _body(self, request: web.Request) -> dict[str, Any]:
        body = read_body(await request.read())
        model = requested_model(body)
        if model is not None:      # unset or empty: the served model
            name = await self._model_name()
            if model != name:
                raise GatewayError(grpc.StatusCode.NOT_FOUND, f"the model {clip(model)!r} does not exist; this server "
                                                              f"serves {name!r} (see GET /v1/models)")
        return body

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _tool_parser(self, parsed: OpenAIRequest) -> Callable[[], ToolCallParser] | None:
        """How the reply's tool calls are read: forced calls in the constraint's form; `auto` in the model's own
        format, refused where the template renders no tools or the format is not one splitserve reads."""
        choice = parsed.tool_choice
        if choice.mode == "none":
            return None
        metrics.TOOL_CALL_REQUESTS.labels(tool_choice=choice.mode).inc()
        if choice.forced:
            mode = "named" if choice.mode == "named" else "json"
            return lambda: ToolCallParser(mode, choice.name)
        info = await self.service.tokenizer_info()
        if not info.tool_call_format:
            why = ("has no tool support" if not info.template_renders_tools
                   else "writes tool calls in a format splitserve does not read")
            raise ParamError("tool_choice", f'tool_choice "auto" needs a model that decides to call tools itself; '
                                            f"this model's chat template {why}. tool_choice \"required\" or a named "
                                            f"function work on any model")
        return lambda: ToolCallParser(info.tool_call_format)

    async def _chunks(self, parsed: OpenAIRequest, client: str) -> AsyncIterator[Chunk]:
        """The front door's chunks; the engine's refusal of an output constraint names the field it came from."""
        try:
            async with aclosing(self.service.generate(parsed.generate, None, client)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except GatewayError as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT and exc.param is None and parsed.constraint_param \
                    and "structured_output" in exc.message:
                exc.param = parsed.constraint_param
            raise

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await self._body(request)
        parsed = generate_request(body, chat, request.headers.get("X-Request-Id", ""))
        request_id = assign_request_id(parsed.generate)
        stream, include_usage = stream_options(body)
        model = await self._model_name()
        reply = Reply(chat, f"{'chatcmpl' if chat else 'cmpl'}-{request_id}", model,
                      logprobs=parsed.generate.sampling.HasField("logprobs"),
                      tool_parser=await self._tool_parser(parsed))
        headers = {"X-Request-Id": request_id}
        client = client_of(request.headers.get("Authorization"), request.remote, self.keyed)
        async with aclosing(self._chunks(parsed, client)) as chunks:
            if not stream:
                async for chunk in chunks:
                    reply.add(chunk)
                return web.json_response(reply.whole(), headers=headers)
            first = await anext(chunks)   # errors before the first chunk get a plain HTTP status
            response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache"})
            await response.prepare(request)
            bound_stream_buffers(request)

            async def send(event: Any) -> None:
                await write_bounded(response.write(sse(event)), self.write_timeout, request_id)

            try:
                try:
                    for event in reply.deltas(first, include_usage):
                        await send(event)
                    async for chunk in chunks:
                        for event in reply.deltas(chunk, include_usage):
                            await send(event)
                    if include_usage:
                        await send(reply.usage_event())
                except GatewayError as exc:   # mid-stream: an error event, as vLLM does (the SDK raises APIError)
                    await send(error_body(exc.code, exc.message, exc.param)[1])
                await send("[DONE]")
                await response.write_eof()
            except StalledClient:   # nothing more can reach it: drop the connection (the request is aborted)
                if request.transport is not None:
                    request.transport.abort()
            return response

    async def models(self, request: web.Request) -> web.Response:
        info = await self.service.model_info()
        name = self.served_model_name or info.model
        return web.json_response({"object": "list", "data": [{
            "id": name, "object": "model", "created": self.created, "owned_by": "splitserve",
            "root": info.model, "max_model_len": info.max_context_length}]})

    async def health(self, request: web.Request) -> web.Response:
        """Readiness: 200 only while a request could succeed (see gateway/readiness.py)."""
        if self.service.draining:
            return web.json_response({"status": "draining"}, status=503)
        if not self.ready():
            return web.json_response({"status": "waiting for the tokenizer and an engine"}, status=503)
        return web.json_response({"status": "ok"})

    async def live(self, request: web.Request) -> web.Response:
        """Liveness: the process is up and its event loop answers."""
        return web.json_response({"status": "alive"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=prometheus_client.generate_latest(),
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})
