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
    """Counts engine sequences, not requests: a request with n completions holds n slots (at most max_running, so
    that it can always run), taken together. Waiters are served first come, first served."""

    def __init__(self, max_running: int, max_waiting: int) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError(f"max_running must be >= 1 and max_waiting >= 0, got {max_running}, {max_waiting}")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0        # slots held
        self.requests = 0       # requests holding them
        self.draining = False
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self, deadline: float | None, weight: int = 1) -> AsyncIterator[None]:
        """Holds `weight` running slots for the body; raises GatewayError when they cannot be had."""
        weight = min(max(1, weight), self.max_running)
        await self._acquire(deadline, weight)
        self.requests += 1
        try:
            yield
        finally:
            self.requests -= 1
            self._release(weight)

    def start_draining(self) -> None:
        self.draining = True

    async def _acquire(self, deadline: float | None, weight: int) -> None:
        if self.draining:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; retry on another replica")
        if self.running + weight <= self.max_running and not self._waiters:
            self.running += weight
            return
        if len(self._waiters) >= self.max_waiting:
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the gateway is at capacity ({self.requests} requests running, {self.waiting} waiting; "
                               f"{self.running} of {self.max_running} sequence slots taken, at most "
                               f"{self.max_waiting} requests wait); retry later")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (future, weight)
        self._waiters.append(waiter)
        metrics.REQUESTS_WAITING.set(self.waiting)
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            if future.done() and not future.cancelled():
                self._release(weight)
            raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "the request's deadline expired while it waited for a free slot") from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release(weight)  # slots were handed over just as the caller left: pass them on
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self._grant()          # a large waiter that leaves may unblock smaller ones behind it
            metrics.REQUESTS_WAITING.set(self.waiting)

    def _release(self, weight: int) -> None:
        self.running -= weight
        self._grant()

    def _grant(self) -> None:
        """Hands free slots to the oldest waiters, in order, while the next one fits."""
        while self._waiters:
            future, weight = self._waiters[0]
            if future.done():          # cancelled or timed out: it removes itself
                self._waiters.popleft()
                continue
            if self.running + weight > self.max_running:
                return
            self._waiters.popleft()
            self.running += weight
            future.set_result(None)
