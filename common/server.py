"""Starts a grpc.aio server with health, reflection and a Prometheus /metrics port, and stops it on SIGINT/SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.logs import kv

log = logging.getLogger("splitserve.server")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class GrpcService:
    """A running gRPC server with its health servicer, so callers can flip serving status."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, port: int,
                 metrics_port: int | None, service_names: list[str]) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port
        self.metrics_port = metrics_port
        self.service_names = service_names

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)


async def start_grpc_server(
    add_servicers: Callable[[grpc.aio.Server], None],
    service_names: Iterable[str],
    host: str,
    port: int,
    metrics_port: int | None,
) -> GrpcService:
    """Binds host:port (0 picks a free port), registers health and reflection, starts /metrics when asked."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    bound_metrics = None
    if metrics_port is not None and metrics_port >= 0:
        http_server, _ = prometheus_client.start_http_server(metrics_port, addr=host)
        bound_metrics = http_server.server_port
    await server.start()
    service = GrpcService(server, health_servicer, bound, bound_metrics, names)
    await service.set_serving(True)
    return service


async def run_until_signal(service: GrpcService, name: str, on_stop: Callable[[], Awaitable[None]] | None = None,
                           grace_seconds: float = 5.0) -> None:
    """Serves until SIGINT/SIGTERM, then reports NOT_SERVING, runs on_stop and stops with a grace period."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving %s", kv(service=name, port=service.port, metrics_port=service.metrics_port))
    await stop.wait()
    log.info("stopping %s", kv(service=name))
    await service.set_serving(False)
    await service.server.stop(grace_seconds)   # in-flight RPCs get the grace period, then are cancelled
    if on_stop is not None:
        await on_stop()
    log.info("stopped %s", kv(service=name))
