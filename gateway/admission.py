"""Admission control: at most `max_running` requests served at once and `max_waiting` queued for a slot; past
that a request is refused at once (RESOURCE_EXHAUSTED / HTTP 429) instead of queueing forever. While the
gateway drains for shutdown, new requests are refused with UNAVAILABLE."""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from gateway import metrics
from gateway.errors import GatewayError


class Admission:
    def __init__(self, max_running: int, max_waiting: int) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError(f"max_running must be >= 1 and max_waiting >= 0, got {max_running}, {max_waiting}")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self.draining = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self, deadline: float | None) -> AsyncIterator[None]:
        """Holds one running slot for the body; raises GatewayError when none can be had."""
        await self._acquire(deadline)
        try:
            yield
        finally:
            self._release()

    def start_draining(self) -> None:
        self.draining = True

    async def _acquire(self, deadline: float | None) -> None:
        if self.draining:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; retry on another replica")
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the gateway is at capacity ({self.running} requests running, {self.waiting} waiting; "
                               f"limits {self.max_running} and {self.max_waiting}); retry later")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        metrics.REQUESTS_WAITING.set(self.waiting)
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            if future.done() and not future.cancelled():
                self._release()
            raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "the request's deadline expired while it waited for a free slot") from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # a slot was handed over just as the caller left: pass it on
            raise
        finally:
            if future in self._waiters:
                self._waiters.remove(future)
            metrics.REQUESTS_WAITING.set(self.waiting)

    def _release(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)  # the slot passes straight to the oldest waiter
                return
        self.running -= 1
