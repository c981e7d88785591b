"""An optional cap on the requests one client has open at once (running or waiting for a slot), so that one API key
or one address cannot take every slot of the gateway from the others.

A client is its API key when keys are required (several machines sharing a key share its cap), else its network
address. Keys are never kept or logged: only a short digest of the key names the client."""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from common.security import bearer_token
from gateway.errors import GatewayError


def client_of(authorization: str | None, address: str | None, keyed: bool) -> str:
    """The name the cap counts under: `key:<digest>` when keys are required (the key was already checked), else
    `addr:<host>` (without the port: one machine's connections count together)."""
    token = bearer_token(authorization) if keyed else None
    if token is not None:
        return "key:" + hashlib.sha256(token.encode(errors="replace")).hexdigest()[:12]
    return "addr:" + host_of(address or "")


def host_of(peer: str) -> str:
    """The host of a gRPC peer ('ipv4:1.2.3.4:5678', 'ipv6:[::1]:5678') or an HTTP remote address ('1.2.3.4')."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        host, _, _ = rest.rpartition(":")
        return host.strip("[]")
    return peer.strip("[]") or "unknown"


class ClientLimit:
    """At most `max_per_client` requests open per client; 0 turns the cap off."""

    def __init__(self, max_per_client: int = 0) -> None:
        if max_per_client < 0:
            raise ValueError(f"max_per_client must be >= 0, got {max_per_client}")
        self.max_per_client = max_per_client
        self.open: Counter[str] = Counter()

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        if not self.max_per_client:
            yield
            return
        if self.open[client] >= self.max_per_client:
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"this client already has {self.open[client]} requests open, the most one client may "
                               f"have at once (--max-requests-per-client); retry when one finishes")
        self.open[client] += 1
        try:
            yield
        finally:
            self.open[client] -= 1
            if not self.open[client]:
                del self.open[client]
