"""The gateway's side of Decode: one stream per engine, shared by every request on it. Each engine step arrives
as one message with the new tokens of all its sequences, handed to each request's queue."""
from __future__ import annotations

import asyncio

import grpc

from gateway.errors import GatewayError, deadline_expired, from_status
from gateway.shared_call import SharedCall
from splitserve.v1 import engine_pb2, engine_pb2_grpc

STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class DecodeSequence:
    """One sequence's outputs, in order: `next` returns the following one or raises its error. `close` when the
    request ends (the pipeline aborts a sequence it leaves early: no more outputs come for it)."""

    def __init__(self, call: _DecodeCall, key: int, timeout: float | None) -> None:
        self._call = call
        self._key = key
        self._outputs: asyncio.Queue[engine_pb2.SequenceOutput | GatewayError] = asyncio.Queue()
        self._deadline = None if timeout is None else asyncio.get_running_loop().call_later(
            timeout, lambda: self.deliver(deadline_expired()))

    async def next(self) -> engine_pb2.SequenceOutput:
        output = await self._outputs.get()
        if isinstance(output, GatewayError):
            raise output
        return output

    def deliver(self, output: engine_pb2.SequenceOutput | GatewayError) -> None:
        self._outputs.put_nowait(output)

    def close(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._call.detach(self._key)


class _DecodeCall(SharedCall[engine_pb2.DecodeAttach]):
    def __init__(self, call: grpc.aio.StreamStreamCall, address: str) -> None:
        self._sequences: dict[int, DecodeSequence] = {}
        super().__init__(call, "engine", address)

    def attach(self, key: int, sequence: DecodeSequence, request_id: str) -> None:
        self.send(engine_pb2.DecodeAttach(request_id=request_id, key=key))
        self._sequences[key] = sequence

    def detach(self, key: int) -> None:
        self._sequences.pop(key, None)

    def _message(self, items: list[engine_pb2.DecodeAttach]) -> engine_pb2.DecodeRequest:
        return engine_pb2.DecodeRequest(attach=items)

    def _dispatch(self, response: engine_pb2.DecodeResponse) -> None:
        for output in response.outputs:
            sequence = self._sequences.get(output.key)
            if sequence is None:   # detached: the request ended early
                continue
            if output.error_code:
                code = STATUS_BY_NUMBER.get(output.error_code, grpc.StatusCode.UNKNOWN)
                sequence.deliver(from_status(code, output.error, self.service, self.address))
            else:
                sequence.deliver(output)
            if output.error_code or output.finish_reason:
                del self._sequences[output.key]

    def _failed(self, failure: GatewayError, unsent: list[engine_pb2.DecodeAttach]) -> None:
        sequences, self._sequences = self._sequences, {}
        for sequence in sequences.values():
            sequence.deliver(failure)


class SharedDecode:
    """Opens the engine's shared Decode stream on first use, and again after it broke or ended (a restarted or
    draining engine): sequences on the old one fail with its error."""

    def __init__(self, stub: engine_pb2_grpc.EngineStub, address: str) -> None:
        self._stub = stub
        self._address = address
        self._call: _DecodeCall | None = None
        self._last_key = 0

    def attach(self, request_id: str, timeout: float | None) -> DecodeSequence:
        """Starts streaming a prefilled sequence; `timeout` (seconds) ends the wait with DEADLINE_EXCEEDED."""
        if self._call is None or self._call.failure is not None:
            self._call = _DecodeCall(self._stub.Decode(), self._address)
        self._last_key += 1
        sequence = DecodeSequence(self._call, self._last_key, timeout)
        self._call.attach(self._last_key, sequence, request_id)
        return sequence

    def close(self) -> None:
        if self._call is not None:
            self._call.fail(GatewayError(grpc.StatusCode.UNAVAILABLE,
                                         f"the gateway closed its connection to the engine at {self._address}"))
