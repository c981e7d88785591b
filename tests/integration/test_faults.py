"""A service dies (kill -9 of the real process) under running streams: every in-flight stream ends within 5 s with
UNAVAILABLE (gRPC) or an error event (HTTP SSE), new requests fail fast while it is down, and once it is back the
next request succeeds, with no restart of the gateway. Runs its own stack: it kills and restarts its services."""
from __future__ import annotations

import threading
import time

import grpc
import openai
import pytest

from tests.conftest import start_stack
from tests.helpers import make_request, openai_client, rpc_error, stream
from splitserve.v1 import gateway_pb2_grpc

LONG = 1900
ENDS_WITHIN = 5.0   # seconds, the bound
GRPC_STREAMS, HTTP_STREAMS = 4, 2


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    stack = start_stack(tiny_model_dir, tmp_path_factory.mktemp("fault-stack-logs"))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.address("gateway")) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


class Outcome:
    """How one running stream ended, seen from a thread that drains it."""

    def __init__(self) -> None:
        self.ended_at: float | None = None
        self.error: str = ""
        self.code: grpc.StatusCode | None = None


def drain_grpc(call, outcome: Outcome) -> None:
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        outcome.code, outcome.error = exc.code(), exc.details()
    outcome.ended_at = time.monotonic()


def drain_sse(chunks, outcome: Outcome) -> None:
    try:
        for _ in chunks:
            pass
    except openai.APIError as exc:
        outcome.error = exc.message
    outcome.ended_at = time.monotonic()


def start_streams(stack, stub) -> tuple[list[Outcome], list[threading.Thread]]:
    """GRPC_STREAMS + HTTP_STREAMS long streams, each past its first chunk, drained by threads."""
    client = openai_client(stack)
    outcomes, threads = [], []
    for i in range(GRPC_STREAMS):
        call = stub.Generate(make_request(f"grpc story {i}:", max_tokens=LONG, ignore_eos=True), timeout=120)
        next(call)
        outcomes.append(Outcome())
        threads.append(threading.Thread(target=drain_grpc, args=(call, outcomes[-1])))
    for i in range(HTTP_STREAMS):
        chunks = client.completions.create(model="", prompt=f"http story {i}:", max_tokens=LONG, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(chunks))
        outcomes.append(Outcome())
        threads.append(threading.Thread(target=drain_sse, args=(chunks, outcomes[-1])))
    for thread in threads:
        thread.start()
    return outcomes, threads


@pytest.mark.parametrize("victim", ["engine", "tokenizer"])
def test_killed_service_ends_streams_fails_fast_and_is_found_again(stack, stub, victim):
    outcomes, threads = start_streams(stack, stub)
    assert all(outcome.ended_at is None for outcome in outcomes)   # still streaming (1900 tokens take seconds)
    stack.services[victim].process.kill()                          # kill -9
    killed_at = time.monotonic()
    for thread in threads:
        thread.join(timeout=30)
    for outcome in outcomes[:GRPC_STREAMS]:
        assert outcome.code == grpc.StatusCode.UNAVAILABLE, outcome.error
        assert f"the {victim} service" in outcome.error
        assert outcome.ended_at - killed_at < ENDS_WITHIN
    for outcome in outcomes[GRPC_STREAMS:]:
        assert f"the {victim} service" in outcome.error and "unavailable" in outcome.error
        assert outcome.ended_at - killed_at < ENDS_WITHIN

    # While it is down: new requests fail fast, on both front doors.
    for attempt in range(3):
        started = time.monotonic()
        error = rpc_error(lambda: stub.Generate(make_request("anyone there?", max_tokens=4), timeout=60))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and victim in error.details()
        assert time.monotonic() - started < ENDS_WITHIN
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        openai_client(stack).completions.create(model="", prompt="anyone there?", max_tokens=4)
    assert info.value.status_code == 503 and info.value.body["type"] == "service_unavailable_error"
    assert time.monotonic() - started < ENDS_WITHIN

    # Back again: the very next request succeeds, with the same gateway process.
    gateway_pid = stack.services["gateway"].process.pid
    stack.start_service(victim)
    assert stream(stub, make_request("hello again", max_tokens=4)).last.finish_reason in ("length", "stop")
    completion = openai_client(stack).completions.create(model="", prompt="hello again", max_tokens=4)
    assert completion.usage.completion_tokens >= 1
    assert stack.services["gateway"].process.pid == gateway_pid and stack.services["gateway"].process.poll() is None
