"""Graceful shutdown: on SIGTERM the gateway stops accepting, lets in-flight streams (gRPC and HTTP) finish within
its grace period, cancels what is left after it (freeing the engine's sequences), and exits 0."""
from __future__ import annotations

import signal
import threading
import time

import grpc
import openai
import pytest

from tests.helpers import make_request, openai_client, start_extra_gateway
from tests.integration.test_lifecycle import wait_until
from splitserve.v1 import engine_pb2, gateway_pb2_grpc

STREAMS = 8
TOKENS = 200


def run_streams(gateway_stack, max_tokens: int) -> tuple[list[dict], list[threading.Thread]]:
    """STREAMS streams (half gRPC, half HTTP SSE), each past its first chunk, then drained by threads."""
    channel = grpc.insecure_channel(gateway_stack.address("gateway"))
    stub = gateway_pb2_grpc.GatewayStub(channel)
    client = openai_client(gateway_stack)
    results: list[dict] = [{} for _ in range(STREAMS)]

    def drain_grpc(call, first, result: dict) -> None:
        tokens, last = len(first.token_ids), first
        try:
            for chunk in call:
                tokens, last = tokens + len(chunk.token_ids), chunk
            result.update(tokens=tokens, finish_reason=last.finish_reason, usage=last.usage.completion_tokens)
        except grpc.RpcError as exc:
            result.update(error=exc.code().name)

    def drain_sse(chunks, result: dict) -> None:
        try:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].finish_reason:
                    result["finish_reason"] = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    result["usage"] = chunk.usage.completion_tokens
        except Exception as exc:  # the connection is cut when the grace period ends
            result["error"] = type(exc).__name__

    threads = []
    for i in range(STREAMS):
        if i % 2 == 0:
            call = stub.Generate(make_request(f"stream {i}:", max_tokens=max_tokens, ignore_eos=True), timeout=120)
            first = next(call)
            threads.append(threading.Thread(target=drain_grpc, args=(call, first, results[i])))
        else:
            chunks = iter(client.completions.create(model="", prompt=f"stream {i}:", max_tokens=max_tokens,
                                                    stream=True, stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True}))
            next(chunks)
            threads.append(threading.Thread(target=drain_sse, args=(chunks, results[i])))
    for thread in threads:
        thread.start()
    return results, threads


def test_sigterm_lets_running_streams_finish_and_exits_zero(tiny_stack, tmp_path):
    gateway_stack = start_extra_gateway(tiny_stack, tmp_path, ["--shutdown-grace-seconds", "60"])
    process = gateway_stack.services["gateway"].process
    try:
        results, threads = run_streams(gateway_stack, TOKENS)
        process.send_signal(signal.SIGTERM)
        # No new requests once draining: the listeners are closed.
        with grpc.insecure_channel(gateway_stack.address("gateway")) as channel:
            assert wait_until(lambda: _refused(channel), timeout=10)
        with pytest.raises(openai.APIConnectionError):
            openai_client(gateway_stack).completions.create(model="", prompt="late", max_tokens=2)
        for thread in threads:
            thread.join(timeout=120)
        assert process.wait(timeout=60) == 0
        for result in results:
            assert result.get("finish_reason") == "length" and result.get("usage") == TOKENS, result
    finally:
        gateway_stack.stop()


def test_streams_past_the_grace_period_are_cancelled_and_freed(tiny_stack, tmp_path, engine):
    gateway_stack = start_extra_gateway(tiny_stack, tmp_path, ["--shutdown-grace-seconds", "1"])
    process = gateway_stack.services["gateway"].process
    try:
        results, threads = run_streams(gateway_stack, 1900)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 20      # the grace (1 s), not the streams' length, bounds it
        for thread in threads:
            thread.join(timeout=30)
        assert all("error" in result for result in results), results
        assert wait_until(lambda: engine.GetStats(engine_pb2.GetStatsRequest()).running == 0, timeout=5)
    finally:
        gateway_stack.stop()


def _refused(channel: grpc.Channel) -> bool:
    try:
        list(gateway_pb2_grpc.GatewayStub(channel).Generate(make_request("late", max_tokens=2), timeout=5))
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAVAILABLE
    return False
