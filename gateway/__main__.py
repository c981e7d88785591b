"""`python -m gateway`: serves the public Gateway gRPC API and the OpenAI-compatible HTTP API in front of the
tokenizer and engine services."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from common.logs import kv
from common.security import ApiKeys, TlsFiles, is_loopback
from common.server import run_service, run_until_signal, start_grpc_server
from gateway.admission import Admission
from gateway.client_limit import ClientLimit
from gateway.openai.server import OpenAIServer
from gateway.pipeline import Pipeline
from gateway.readiness import Readiness
from gateway.router import RouterSettings
from gateway.front_door import FrontDoor
from gateway.grpc_server import GatewayServicer
from gateway.validation import Limits
from splitserve.v1 import gateway_pb2_grpc

log = logging.getLogger("splitserve.gateway")


@dataclass
class GatewayConfig:
    host: str = field(default="0.0.0.0", metadata={"env": "GATEWAY_HOST"})
    port: int = field(default=50051, metadata={"env": "GATEWAY_PORT"})
    metrics_port: int = field(default=9100, metadata={"env": "GATEWAY_METRICS_PORT"})
    tokenizer_address: str = field(default="127.0.0.1:50052", metadata={
        "help": "the tokenizer service: host:port, or dns:///name:port (or ipv4:a:p,b:q) to spread requests over "
                "every tokenizer the name resolves to"})
    engine_address: str = field(default="127.0.0.1:50053", metadata={
        "help": "engine service(s): host:port, a comma-separated list, or dns:///name:port (one engine per address)"})
    engine_health_interval: float = field(default=1.0, metadata={"help": "seconds between engine health checks"})
    prefill_engine_address: str = field(default="", metadata={
        "help": "disaggregated serving: prefill engine(s) (--role prefill), as --engine-address; the engines of "
                "--engine-address then decode, with the prompts' KV caches sent from these"})
    max_failovers: int = field(default=1, metadata={
        "help": "times a stream moves to another engine when its engine is lost mid-stream (0: never)"})
    router_balance_slack: int = field(default=16, metadata={
        "help": "send to the engine holding the prompt's prefix while it has at most this many more requests"})
    max_stop_strings: int = field(default=16, metadata={"help": "stop strings per request at most"})
    max_stop_string_chars: int = field(default=256, metadata={"help": "characters per stop string at most"})
    http_port: int = field(default=8000, metadata={"help": "port of the OpenAI-compatible HTTP API (-1: off)"})
    served_model_name: str = field(default="", metadata={"help": "the HTTP API's model id (default: the engine's)"})
    max_concurrent_requests: int = field(default=256, metadata={
        "help": "engine sequences served at once, both APIs (a request with n completions counts n)"})
    max_waiting_requests: int = field(default=1024, metadata={
        "help": "requests queued for a slot; past that RESOURCE_EXHAUSTED / HTTP 429 at once"})
    max_requests_per_client: int = field(default=0, metadata={
        "help": "requests one client (its API key, else its address) may have open at once; 0: no cap"})
    request_timeout_seconds: float = field(default=600.0, metadata={
        "help": "deadline of every request (a gRPC client's shorter deadline wins); 0: none"})
    max_prompt_chars: int = field(default=1_000_000, metadata={"help": "characters of prompt or messages at most"})
    max_prompt_tokens: int = field(default=0, metadata={"help": "prompt tokens at most (0: the model's context)"})
    max_output_tokens: int = field(default=0, metadata={"help": "max_tokens at most (0: the model's context)"})
    max_messages: int = field(default=2048, metadata={"help": "chat messages per request at most"})
    max_stop_token_ids: int = field(default=128, metadata={"help": "stop_token_ids per request at most"})
    max_output_budget: int = field(default=262_144, metadata={
        "help": "n x max_tokens x (1 + logprobs) per request at most (bounds one reply's size); 0: no limit"})
    max_tools: int = field(default=128, metadata={"help": "tools (functions) per chat request at most (OpenAI's 128)"})
    max_tool_schema_chars: int = field(default=65_536, metadata={
        "help": "characters of one tool's parameters schema (and description) at most"})
    max_message_bytes: int = field(default=2 * 1024 * 1024, metadata={
        "help": "largest gRPC message / HTTP body accepted (as TGI's 2 MB payload limit)"})
    max_concurrent_rpcs: int = field(default=4096, metadata={
        "help": "gRPC calls open at once on the public port; beyond: RESOURCE_EXHAUSTED"})
    api_key: str = field(default="", metadata={"secret": True, "help": "clients must send 'Authorization: Bearer "
                                                                       "<key>' (gRPC metadata likewise)"})
    api_key_file: str = field(default="", metadata={"help": "a file of accepted keys, one per line"})
    keyed_metrics: bool = field(default=False, metadata={"help": "the HTTP API's /metrics needs a key too"})
    tls_cert: str = field(default="", metadata={"help": "PEM certificate: serve gRPC and HTTP over TLS"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_ca: str = field(default="", metadata={"help": "PEM CA that signs the tokenizer's and engines' certificates "
                                                     "(internal channels over TLS)"})
    tls_client_cert: str = field(default="", metadata={
        "help": "PEM certificate shown to the tokenizer and engines (mutual TLS); default: --tls-cert"})
    tls_client_key: str = field(default="", metadata={"help": "PEM private key of --tls-client-cert"})
    tls_server_name: str = field(default="", metadata={
        "help": "name expected in the upstreams' certificates when it is not their address's host"})
    stream_write_timeout_seconds: float = field(default=30.0, metadata={
        "help": "a streaming client that takes no chunk for this long loses its stream (slots and KV freed)"})
    shutdown_grace_seconds: float = field(default=20.0, metadata={
        "help": "on SIGTERM, in-flight requests get this long to finish before they are cancelled"})
    log_level: str = "INFO"


    def __post_init__(self) -> None:
        if self.max_failovers < 0:
            raise ValueError(f"max_failovers must be >= 0, got {self.max_failovers}")
        self.keys = ApiKeys.load(self.api_key, self.api_key_file)
        self.tls = TlsFiles(self.tls_cert, self.tls_key)
        # The internal channels use TLS only with a CA to check the upstreams by; the certificate shown to them is
        # the client pair when one is given, else the gateway's own pair (never one half of each).
        own_pair = (self.tls_client_cert, self.tls_client_key) if self.tls_client_cert or self.tls_client_key \
            else (self.tls_cert, self.tls_key)
        self.upstream_tls = TlsFiles(*own_pair, self.tls_ca, self.tls_server_name) if self.tls_ca else None


async def serve(config: GatewayConfig) -> None:
    if not config.keys and not is_loopback(config.host):
        log.warning("no API key: anyone who reaches %s may use this gateway (set --api-key or API_KEY)",
                    config.host)
    pipeline = Pipeline(config.tokenizer_address, config.engine_address,
                        RouterSettings(health_interval=config.engine_health_interval,
                                       balance_slack=config.router_balance_slack), config.upstream_tls,
                        config.max_failovers, config.prefill_engine_address)
    limits = Limits(max_stop_strings=config.max_stop_strings, max_stop_string_chars=config.max_stop_string_chars,
                    max_prompt_chars=config.max_prompt_chars, max_prompt_tokens=config.max_prompt_tokens,
                    max_output_tokens=config.max_output_tokens, max_messages=config.max_messages,
                    max_stop_token_ids=config.max_stop_token_ids, max_output_budget=config.max_output_budget,
                    max_tools=config.max_tools, max_tool_schema_chars=config.max_tool_schema_chars)
    gateway = FrontDoor(pipeline, limits, Admission(config.max_concurrent_requests, config.max_waiting_requests),
                        config.request_timeout_seconds or None, ClientLimit(config.max_requests_per_client))
    servicer = GatewayServicer(gateway, config.stream_write_timeout_seconds, keyed=bool(config.keys))
    service = await start_grpc_server(
        lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server),
        ["splitserve.v1.Gateway"], config.host, config.port, config.metrics_port, config.max_message_bytes,
        tls=config.tls, api_keys=config.keys, max_concurrent_rpcs=config.max_concurrent_rpcs, serving=False)
    readiness = Readiness(pipeline, config.engine_health_interval, service.set_serving)
    readiness.start()
    http = OpenAIServer(gateway, config.served_model_name, config.max_message_bytes, config.shutdown_grace_seconds,
                        api_keys=config.keys, keyed_metrics=config.keyed_metrics,
                        ssl_context=config.tls.server_ssl_context(), ready=lambda: readiness.ready,
                        write_timeout=config.stream_write_timeout_seconds)
    if config.http_port >= 0:
        http_port = await http.start(config.host, config.http_port)
        log.info("serving the OpenAI API %s", kv(http_port=http_port, tls=config.tls.serves_tls))

    async def drain() -> None:   # beside the gRPC server's own drain
        await readiness.stop()
        await service.set_serving(False)   # again: a readiness change may have landed after the first
        gateway.start_draining()
        if http.port is not None:
            await http.stop()

    await run_until_signal(service, "gateway", on_stop=pipeline.close, grace_seconds=config.shutdown_grace_seconds,
                           on_drain=drain)


def main() -> None:
    run_service(GatewayConfig, "splitserve gateway", serve, "splitserve.gateway")


if __name__ == "__main__":
    main()
