"""API keys and TLS, written once for every server and channel.

- API keys guard the public gateway (gRPC metadata `authorization: Bearer <key>`, HTTP `Authorization: Bearer`);
  compared in constant time; the health service stays open so probes and load balancers need no key.
- TLS: a server with a certificate serves TLS; a server that also has a CA (`tls_ca`) asks every caller for a client
  certificate signed by it (mutual TLS: what the tokenizer and engine use, so only the gateway can call them). A
  client with a CA verifies the server against it and presents its own certificate when it has one.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("splitserve.security")

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)   # probes and load balancers call these without a key
BEARER = "bearer "


class ApiKeys:
    """The keys a server accepts; empty means no key is asked for."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [key.encode() for key in keys if key]

    @classmethod
    def load(cls, key: str = "", key_file: str = "") -> ApiKeys:
        """`key` (flag or env API_KEY) plus one key per line of `key_file` (blank lines and # comments skipped)."""
        keys = [key.strip()] if key.strip() else []
        if key_file:
            for line in Path(key_file).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization` value (`Bearer <key>`) names one of the keys. Every key is compared, each in
        constant time, so the answer's timing says nothing about which key or how much of it matched."""
        if not self._keys:
            return True
        token = bearer_token(authorization)
        if token is None:
            return False
        try:
            given = token.encode()
        except UnicodeError:   # a header byte that is not UTF-8 (aiohttp hands it over as a lone surrogate)
            return False
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        return matched


def bearer_token(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` value (any case of "Bearer"); None for any other value."""
    if not authorization or authorization[:len(BEARER)].lower() != BEARER:
        return None
    return authorization[len(BEARER):].strip()


def authorization_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The `authorization` value of a gRPC call's metadata (None when absent or binary)."""
    value = next((value for key, value in metadata or () if key == "authorization"), None)
    return value if isinstance(value, str) else None


UNAUTHORIZED_MESSAGE = "a valid API key is required: send it as 'authorization: Bearer <key>'"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid key with UNAUTHENTICATED, except the health service."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if self.keys.allows(authorization_of(details.invocation_metadata)):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with UNAUTHENTICATED."""
    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHORIZED_MESSAGE)

    shape = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **shape)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **shape)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **shape)
    return grpc.unary_unary_rpc_method_handler(refuse, **shape)


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files. cert/key: this process's own certificate; ca: the authority its peers' certificates must chain
    to (a server with a CA requires client certificates; a client with a CA verifies the server with it)."""
    cert: str = ""
    key: str = ""
    ca: str = ""
    server_name: str = ""   # client side: the name to expect in the server's certificate, if not the address's host

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        for path in (self.cert, self.key, self.ca):
            if path and not Path(path).is_file():
                raise ValueError(f"TLS file {path!r} does not exist")

    @property
    def serves_tls(self) -> bool:
        return bool(self.cert)

    @property
    def dials_tls(self) -> bool:
        return bool(self.ca or self.cert)

    def server_credentials(self, require_client_certificate: bool = True) -> grpc.ServerCredentials | None:
        """None: plaintext. With a CA (and require_client_certificate), callers need a certificate it signed."""
        if not self.serves_tls:
            return None
        mutual = require_client_certificate and bool(self.ca)
        return grpc.ssl_server_credentials([(_read(self.key), _read(self.cert))],
                                           root_certificates=_read(self.ca) if mutual else None,
                                           require_client_auth=mutual)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """None: plaintext. Else verify the server (with the CA, or the system's roots) and present our certificate."""
        if not self.dials_tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca), private_key=_read(self.key),
                                            certificate_chain=_read(self.cert))

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name and self.dials_tls else []

    def server_ssl_context(self) -> ssl.SSLContext | None:
        """For the HTTP API: TLS 1.2 or newer with this certificate (clients are not asked for one)."""
        if not self.serves_tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        return context


def aio_channel(address: str, tls: TlsFiles | None, options: list[tuple[str, object]] | None = None
                ) -> grpc.aio.Channel:
    """A grpc.aio channel, over TLS when `tls` says so."""
    return _channel(grpc.aio, address, tls, options)


def sync_channel(address: str, tls: TlsFiles | None = None, options: list[tuple[str, object]] | None = None
                 ) -> grpc.Channel:
    """The same, for blocking callers (health checks, the CLI client)."""
    return _channel(grpc, address, tls, options)


def _channel(kind: Any, address: str, tls: TlsFiles | None, options: list[tuple[str, object]] | None) -> Any:
    """`kind` is the grpc module or grpc.aio: both name their channel constructors alike."""
    options = [*(options or []), *(tls.channel_options() if tls else [])]
    credentials = tls.channel_credentials() if tls else None
    if credentials is None:
        return kind.insecure_channel(address, options=options)
    return kind.secure_channel(address, credentials, options=options)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
