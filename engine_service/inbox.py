"""The step loop's inbox: requests and aborts posted by any thread, taken by the loop between steps, so that the
scheduler and the KV cache are only ever touched by the loop thread. It also bounds the waiting requests."""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from engine_service.sequence import Sequence


class EngineFullError(RuntimeError):
    """The waiting queue is full (RESOURCE_EXHAUSTED)."""


class Inbox:
    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._queue: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._pending = 0                         # requests posted but not yet taken by the loop
        self._lock = threading.Lock()

    def add(self, seq: Sequence, waiting: int) -> None:
        """Posts a new sequence, unless `waiting` (the scheduler's queue) and those posted reach max_waiting."""
        with self._lock:
            if waiting + self._pending >= self.max_waiting:
                raise EngineFullError(f"the engine's waiting queue is full ({self.max_waiting} requests)")
            self._pending += 1
        self._queue.put(("add", seq))

    def call(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        """Runs function(*args) on the loop thread between steps (work on the scheduler's or the cache's state);
        its result or exception in the future."""
        future: Future[Any] = Future()

        def run() -> None:
            try:
                future.set_result(function(*args))
            except Exception as exc:
                future.set_exception(exc)
        self._queue.put(("call", run))
        return future

    def abort(self, request_id: str) -> None:
        self._queue.put(("abort", request_id))

    def wake(self) -> None:
        self._queue.put(("wake", None))

    def take(self, block: bool) -> Iterator[tuple[str, object]]:
        """The commands posted so far; block: wait (up to 0.5 s) for the first one."""
        while True:
            try:
                command, payload = self._queue.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if command == "add":
                with self._lock:
                    self._pending -= 1
            yield command, payload
