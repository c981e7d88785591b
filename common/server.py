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

from common.config import describe, load_config
from common.logs import kv, setup_logging
from common.security import ApiKeyInterceptor, ApiKeys, TlsFiles

log = logging.getLogger("splitserve.server")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Clients ping during calls, so a peer whose machine vanished (no TCP reset) fails its streams in ~30 s;
    # servers accept those pings (the default would answer them with GOAWAY too_many_pings).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
]   # a peer pinging faster than that gets GOAWAY after grpc's default 2 strikes: no ping floods


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """GRPC_OPTIONS with another message size limit (a larger message is refused with RESOURCE_EXHAUSTED)."""
    return [(key, max_message_bytes if key.endswith("_message_length") else value) for key, value in GRPC_OPTIONS]


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
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    tls: TlsFiles | None = None,
    api_keys: ApiKeys | None = None,
    max_concurrent_rpcs: int | None = None,
    serving: bool = True,
) -> GrpcService:
    """Binds host:port (0 picks a free port), registers health and reflection, starts /metrics when asked.
    With `tls` it serves TLS only (mutual TLS when it has a CA); with `api_keys` every call but health needs a key;
    calls beyond `max_concurrent_rpcs` are refused RESOURCE_EXHAUSTED. `serving=False` starts NOT_SERVING (the
    caller flips it once it could answer a request)."""
    interceptors = [ApiKeyInterceptor(api_keys)] if api_keys else []
    server = grpc.aio.server(options=grpc_options(max_message_bytes), interceptors=interceptors,
                             maximum_concurrent_rpcs=max_concurrent_rpcs)
    add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    credentials = tls.server_credentials() if tls else None
    if credentials is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    bound_metrics = None
    if metrics_port is not None and metrics_port >= 0:
        http_server, _ = prometheus_client.start_http_server(metrics_port, addr=host)
        bound_metrics = http_server.server_port
    await server.start()
    service = GrpcService(server, health_servicer, bound, bound_metrics, names)
    await service.set_serving(serving)
    return service


async def run_until_signal(service: GrpcService, name: str, on_stop: Callable[[], Awaitable[None]] | None = None,
                           grace_seconds: float = 5.0, on_drain: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serves until SIGINT/SIGTERM, then reports NOT_SERVING and stops with a grace period: new RPCs are refused,
    those in flight get up to grace_seconds, then are cancelled. on_drain (e.g. another front door's own drain)
    runs at the same time; on_stop runs last."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving %s", kv(service=name, port=service.port, metrics_port=service.metrics_port))
    await stop.wait()
    log.info("stopping %s", kv(service=name))
    await service.set_serving(False)
    drains = [service.server.stop(grace_seconds)]   # in-flight RPCs get the grace period, then are cancelled
    if on_drain is not None:
        drains.append(on_drain())
    await asyncio.gather(*drains)
    if on_stop is not None:
        await on_stop()
    log.info("stopped %s", kv(service=name))


def run_service(config_class: type, description: str, serve: Callable[..., Awaitable[None]], logger: str) -> None:
    """A service's `main`: config from flags and environment, logging, the config printed, then serve it."""
    config = load_config(config_class, description=description)
    setup_logging(config.log_level)
    logging.getLogger(logger).info("config %s", describe(config))
    asyncio.run(serve(config))
