"""A bidirectional call that many requests share (one Decode stream per engine, one Detokenize stream per
tokenizer): what they send is queued and goes out in one message per event-loop turn, responses are dispatched
back to them, and when the call breaks each of them hears why. Fewer, fuller messages: every gRPC message costs
CPU time that, on a small machine, the engine's threads would otherwise have."""
from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

import grpc

from gateway.errors import GatewayError, from_rpc_error

Item = TypeVar("Item")


class SharedCall(Generic[Item]):
    """Subclasses say how queued items make a request message (`_message`), what a response means
    (`_dispatch`) and whom a failure reaches (`_failed`)."""

    def __init__(self, call: grpc.aio.StreamStreamCall, service: str, address: str) -> None:
        self.call = call
        self.service = service
        self.address = address
        self.failure: GatewayError | None = None   # set once the call broke: sending after it raises it
        self._items: list[Item] = []
        self._wakeup = asyncio.Event()
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())

    def send(self, item: Item) -> None:
        if self.failure is not None:
            raise self.failure
        self._items.append(item)
        self._wakeup.set()

    def fail(self, failure: GatewayError) -> None:
        """Ends the call; `_failed` tells everyone still waiting on it."""
        if self.failure is not None:
            return
        self.failure = failure
        self.call.cancel()
        self._writer.cancel()
        unsent, self._items = self._items, []
        self._failed(failure, unsent)

    def _message(self, items: list[Item]) -> object:
        raise NotImplementedError

    def _dispatch(self, response: object) -> None:
        """Raises GatewayError for a response that breaks the protocol (the call then fails with it)."""
        raise NotImplementedError

    def _failed(self, failure: GatewayError, unsent: list[Item]) -> None:
        raise NotImplementedError

    async def _write(self) -> None:
        try:
            while True:
                await self._wakeup.wait()   # woken by the first send of a turn; runs after the turn's others
                self._wakeup.clear()
                items, self._items = self._items, []
                await self.call.write(self._message(items))
        except grpc.aio.AioRpcError as exc:
            self.fail(from_rpc_error(exc, self.service, self.address))
        except asyncio.InvalidStateError:   # the call already ended: the reader says why
            pass

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self._dispatch(response)
            self.fail(GatewayError(grpc.StatusCode.UNAVAILABLE,
                                   f"the {self.service} service at {self.address} ended its stream"))
        except grpc.aio.AioRpcError as exc:
            self.fail(from_rpc_error(exc, self.service, self.address))
        except GatewayError as exc:
            self.fail(exc)
