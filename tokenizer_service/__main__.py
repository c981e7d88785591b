"""`python -m tokenizer_service`: serves the Tokenizer gRPC service (health, reflection, /metrics)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from common.logs import kv
from common.models import model_display_name, resolve_model
from common.security import TlsFiles
from common.server import run_service, run_until_signal, start_grpc_server
from splitserve.v1 import tokenizer_pb2_grpc
from tokenizer_service.server import TokenizerServicer
from tokenizer_service.tokenizer import PromptTokenizer

log = logging.getLogger("splitserve.tokenizer")

SERVICE_NAME = "splitserve.v1.Tokenizer"


@dataclass
class TokenizerConfig:
    model: str = field(default="smollm2", metadata={"env": "MODEL", "help": "model folder, hub id, .gguf or smollm2"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind (0.0.0.0 for every interface: use with --tls-ca)"})
    port: int = field(default=50052, metadata={"env": "TOKENIZER_PORT", "help": "gRPC port (0 picks a free one)"})
    metrics_port: int = field(default=9101, metadata={"env": "TOKENIZER_METRICS_PORT",
                                                      "help": "Prometheus /metrics port (-1 turns it off)"})
    tls_cert: str = field(default="", metadata={"help": "PEM certificate: serve TLS only"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_ca: str = field(default="", metadata={"help": "PEM CA: callers must show a certificate it signed (mutual TLS)"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not in 0..65535")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port {self.metrics_port} is not in -1..65535")


async def serve(config: TokenizerConfig) -> None:
    start = time.perf_counter()
    tokenizer = PromptTokenizer(resolve_model(config.model), name=model_display_name(config.model))
    log.info("tokenizer loaded %s", kv(name=tokenizer.name, vocab_size=tokenizer.vocab_size,
                                       eos_token_ids=tokenizer.eos_token_ids,
                                       seconds=round(time.perf_counter() - start, 3)))
    service = await start_grpc_server(
        lambda server: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(tokenizer), server),
        [SERVICE_NAME], config.host, config.port, config.metrics_port,
        tls=TlsFiles(config.tls_cert, config.tls_key, config.tls_ca))
    await run_until_signal(service, "tokenizer", grace_seconds=30.0)   # outlives the gateway's drain


def main() -> None:
    run_service(TokenizerConfig, "splitserve tokenizer service", serve, "splitserve.tokenizer")


if __name__ == "__main__":
    main()
