"""What the HTTP API checks before any handler runs: the API key, and that a POST body says it is JSON.

Requiring `Content-Type: application/json` on POST keeps browsers on the same network from posting cross-site
(`text/plain` and form posts need no CORS preflight; JSON does). Health routes stay open for probes; /metrics is
open unless `keyed_metrics`."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from common.security import UNAUTHORIZED_MESSAGE, ApiKeys
from gateway.errors import GatewayError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/health", "/health/live"})


def guard(keys: ApiKeys, keyed_metrics: bool = False) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    open_paths = OPEN_PATHS if keyed_metrics else OPEN_PATHS | {"/metrics"}

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in open_paths and not keys.allows(request.headers.get("Authorization")):
            raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHORIZED_MESSAGE)
        if request.method == "POST" and request.content_type != "application/json":
            raise UnsupportedMediaType()
        return await handler(request)

    return check


class UnsupportedMediaType(GatewayError):
    status = 415

    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT,
                         "the request body must be JSON, sent with 'Content-Type: application/json'")
