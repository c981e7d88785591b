"""One error type for everything the gateway answers with a status; both front doors map it in one place."""
from __future__ import annotations

import grpc


class GatewayError(Exception):
    """`param`: the OpenAI request field at fault, where one is (its error body names it)."""

    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def deadline_expired() -> GatewayError:
    return GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline expired")


def invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message, param)


def from_rpc_error(error: grpc.aio.AioRpcError, service: str, address: str) -> GatewayError:
    """Maps a downstream failure to what the client should see, naming the service that failed."""
    return from_status(error.code(), error.details() or "", service, address)


def from_status(code: grpc.StatusCode, detail: str, service: str, address: str) -> GatewayError:
    if code == grpc.StatusCode.UNAVAILABLE:
        return GatewayError(code, f"the {service} service at {address} is unavailable: {detail}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return deadline_expired()
    if code == grpc.StatusCode.CANCELLED:
        return GatewayError(code, "the request was cancelled")
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        return GatewayError(grpc.StatusCode.INTERNAL, f"the {service} service failed: {detail}")
    return GatewayError(code, detail)
