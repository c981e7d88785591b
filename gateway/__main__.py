"""`python -m gateway`: serves the public Gateway gRPC API in front of the tokenizer and engine services."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from common.config import describe, load_config
from common.logs import setup_logging
from common.server import run_until_signal, start_grpc_server
from gateway.pipeline import Pipeline
from gateway.server import GatewayServicer
from gateway.validation import Limits
from splitserve.v1 import gateway_pb2_grpc

log = logging.getLogger("splitserve.gateway")


@dataclass
class GatewayConfig:
    host: str = field(default="0.0.0.0", metadata={"env": "GATEWAY_HOST"})
    port: int = field(default=50051, metadata={"env": "GATEWAY_PORT"})
    metrics_port: int = field(default=9100, metadata={"env": "GATEWAY_METRICS_PORT"})
    tokenizer_address: str = field(default="127.0.0.1:50052", metadata={"help": "host:port of the tokenizer service"})
    engine_address: str = field(default="127.0.0.1:50053", metadata={"help": "host:port of the engine service"})
    max_stop_strings: int = field(default=16, metadata={"help": "stop strings per request at most"})
    max_stop_string_chars: int = field(default=256, metadata={"help": "characters per stop string at most"})
    log_level: str = "INFO"


async def serve(config: GatewayConfig) -> None:
    pipeline = Pipeline(config.tokenizer_address, config.engine_address)
    servicer = GatewayServicer(pipeline, Limits(max_stop_strings=config.max_stop_strings,
                                                max_stop_string_chars=config.max_stop_string_chars))
    service = await start_grpc_server(
        lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server),
        ["splitserve.v1.Gateway"], config.host, config.port, config.metrics_port)
    await run_until_signal(service, "gateway", on_stop=pipeline.close)


def main() -> None:
    config = load_config(GatewayConfig, description="splitserve gateway")
    setup_logging(config.log_level)
    log.info("config %s", describe(config))
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
