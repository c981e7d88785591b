"""The gateway's client channels to its upstreams: found again quickly once a restarted service listens.

gRPC's default reconnect backoff grows to two minutes, and while a channel waits it fails every call at once. So
every channel of the gateway (tokenizer and engines: CHANNEL_OPTIONS) retries at least once a second, and a
request whose upstream is not connected waits a moment for the channel (`wait_ready`) before its first call: the
first request after a restart succeeds, and while a service is down requests still fail within a few seconds
with UNAVAILABLE. One second, not more: the router's health checks run every second too, and a retry a second
costs one TCP connect per down upstream; a longer backoff only made restarted engines come back later.
"""
from __future__ import annotations

import asyncio

import grpc

from common.server import GRPC_OPTIONS

CHANNEL_OPTIONS = [
    *GRPC_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# A target that names several servers (dns:///name:port resolving to several addresses, as a Kubernetes headless
# Service does, or an ipv4:a:p,b:q list) gets gRPC's round_robin policy: unary calls go to each server in turn,
# and each new stream to the next one (the tokenizer's: several Detokenize streams, gateway/detokenize.py).
SPREAD_OPTIONS = [("grpc.lb_policy_name", "round_robin")]
SPREAD_STREAMS = 4


def spreads(target: str) -> bool:
    return target.startswith(("dns:", "ipv4:", "ipv6:"))


CONNECT_WAIT_SECONDS = 2.5   # over two reconnect periods, jitter (±20 %) included


async def wait_ready(channel: grpc.aio.Channel, remaining: float | None) -> None:
    """Waits until the channel is connected, at most CONNECT_WAIT_SECONDS (or what is left of the deadline);
    the call that follows reports a channel still down as UNAVAILABLE."""
    if channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
        return
    timeout = CONNECT_WAIT_SECONDS if remaining is None else min(CONNECT_WAIT_SECONDS, remaining)
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except asyncio.TimeoutError:
        pass
