"""The gateway's client channels to its upstreams: found again quickly once a restarted service listens.

gRPC's default reconnect backoff grows to two minutes, and while a channel waits it fails every call at once. So
channels retry at least once a second (RECONNECT_OPTIONS), and a request whose upstream is not connected waits a
moment for the channel (`wait_ready`) before its first call: the first request after a restart succeeds, and
while a service is down requests still fail within a few seconds with UNAVAILABLE.
"""
from __future__ import annotations

import asyncio

import grpc

RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
CONNECT_WAIT_SECONDS = 2.5   # longer than the slowest reconnect backoff of the gateway's channels (router: 2 s)


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
