"""Writes to a streaming client, each bounded in time: a client that stops reading (or reads too slowly) must not
hold its admission slots and the engine's KV blocks. gRPC and aiohttp both wait when the client's flow-control
window or socket buffer is full, without end; past `timeout` the stream is given up, which closes the request's
generator and so aborts its engine sequences."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from common.logs import kv
from gateway import metrics

log = logging.getLogger("splitserve.gateway")


class StalledClient(Exception):
    """The client did not take a chunk within the write timeout."""


async def write_bounded(write: Awaitable[None], timeout: float, request_id: str) -> None:
    try:
        async with asyncio.timeout(timeout):   # no task per write (wait_for makes one): this runs for every chunk
            await write
    except TimeoutError:
        metrics.STALLED_CLIENTS.inc()
        log.warning("client stopped reading; stream ended %s", kv(request_id=request_id, write_timeout=timeout))
        raise StalledClient(f"the client did not read the stream for {timeout:g} s") from None
