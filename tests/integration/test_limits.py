"""Limits and backpressure on both front doors: concurrency and waiting limits answer RESOURCE_EXHAUSTED / 429 at
once, deadlines (the client's, or the gateway's request timeout) end requests, and prompt, output and message sizes
are capped. Each test runs an extra gateway process with small limits in front of the session's tokenizer and engine."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from tests.helpers import make_request, openai_client, rpc_error, start_extra_gateway, stream
from tests.integration.test_lifecycle import scrape, wait_until
from splitserve.v1 import engine_pb2, gateway_pb2_grpc

LONG = 1900
MAX_OUTPUT = 1900
MAX_PROMPT_TOKENS = 64
MAX_MESSAGE = 1024 * 1024


@pytest.fixture(scope="module")
def limited(tiny_stack, tmp_path_factory):
    extra = start_extra_gateway(tiny_stack, tmp_path_factory.mktemp("limited-gateway"), [
        "--max-concurrent-requests", "2", "--max-waiting-requests", "1", "--max-output-tokens", str(MAX_OUTPUT),
        "--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--max-message-bytes", str(MAX_MESSAGE)])
    yield extra
    extra.stop()


@pytest.fixture(scope="module")
def limited_stub(limited):
    with grpc.insecure_channel(limited.address("gateway"), options=[("grpc.max_send_message_length", -1)]) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def long_request(i: int):
    return make_request(f"story {i}:", max_tokens=LONG, ignore_eos=True)


def test_past_running_and_waiting_limits_requests_are_refused_at_once(limited, limited_stub, engine):
    running = [limited_stub.Generate(long_request(i), timeout=120) for i in range(2)]
    for call in running:
        next(call)                                    # both slots are taken
    waiting = limited_stub.Generate(long_request(2), timeout=120)   # the one waiting place
    assert wait_until(lambda: scrape(limited.ports.gateway_metrics)["splitserve_requests_waiting"] == 1, 10)

    error = rpc_error(lambda: limited_stub.Generate(make_request("one more", max_tokens=2), timeout=60))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at capacity" in error.details() and "2 requests running, 1 waiting" in error.details()
    with pytest.raises(openai.RateLimitError) as info:
        openai_client(limited).completions.create(model="", prompt="one more", max_tokens=2)
    assert info.value.status_code == 429
    assert info.value.body["type"] == "rate_limit_error" and info.value.body["code"] == "resource_exhausted"
    assert all(call.running() for call in running)    # refused at once: nothing had to finish first

    running[0].cancel()                               # a slot frees: the waiting request gets it
    assert next(waiting).token_ids
    for call in (running[1], waiting):
        call.cancel()
    assert wait_until(lambda: engine.GetStats(engine_pb2.GetStatsRequest()).running == 0, 5)
    assert stream(limited_stub, make_request("after the rush", max_tokens=3)).last.finish_reason in ("length", "stop")
    metrics = scrape(limited.ports.gateway_metrics)
    assert metrics['splitserve_requests_total{code="RESOURCE_EXHAUSTED",finish_reason="error"}'] == 2
    assert metrics["splitserve_requests_waiting"] == 0


def test_a_deadline_that_expires_while_waiting_for_a_slot(limited_stub):
    running = [limited_stub.Generate(long_request(i), timeout=120) for i in range(2)]
    for call in running:
        next(call)
    error = rpc_error(lambda: limited_stub.Generate(make_request("patient", max_tokens=2), timeout=1.0))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for call in running:
        call.cancel()


def test_output_and_prompt_token_limits(limited, limited_stub):
    error = rpc_error(lambda: limited_stub.Generate(make_request("hi", max_tokens=MAX_OUTPUT + 1), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_OUTPUT} output tokens" in error.details()
    error = rpc_error(lambda: limited_stub.Generate(make_request("word " * 100, max_tokens=2), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_PROMPT_TOKENS} prompt tokens" in error.details()
    client = openai_client(limited)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="", prompt="hi", max_tokens=MAX_OUTPUT + 1)
    assert "output tokens" in info.value.message
    # unset max_tokens: the default (256) still applies under a larger cap
    assert client.completions.create(model="", prompt="hi", temperature=0,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 256


def test_messages_larger_than_the_limit_are_refused(limited, limited_stub):
    huge = "x" * (MAX_MESSAGE + 1000)
    error = rpc_error(lambda: limited_stub.Generate(make_request(huge, max_tokens=2), timeout=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    body = json.dumps({"prompt": huge, "max_tokens": 2}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{limited.ports.gateway_http}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 413
    assert "Too Large" in json.loads(info.value.read())["error"]["message"]
    assert stream(limited_stub, make_request("small again", max_tokens=2)).last.finish_reason in ("length", "stop")


def test_the_gateways_request_timeout_ends_requests_on_both_apis(tiny_stack, tmp_path, engine):
    timed = start_extra_gateway(tiny_stack, tmp_path, ["--request-timeout-seconds", "1"])
    try:
        with grpc.insecure_channel(timed.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            chunks = []
            with pytest.raises(grpc.RpcError) as info:
                for chunk in stub.Generate(long_request(0)):     # no client deadline: the gateway's applies
                    chunks.append(chunk)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and chunks
        client = openai_client(timed)
        with pytest.raises(openai.APIStatusError) as whole:
            client.completions.create(model="", prompt="story:", max_tokens=LONG, extra_body={"ignore_eos": True})
        assert whole.value.status_code == 504 and whole.value.body["type"] == "timeout_error"
        with pytest.raises(openai.APIError) as streamed:
            for _ in client.completions.create(model="", prompt="story:", max_tokens=LONG, stream=True,
                                               extra_body={"ignore_eos": True}):
                pass
        assert "deadline" in streamed.value.message
        assert wait_until(lambda: engine.GetStats(engine_pb2.GetStatsRequest()).running == 0, 5)
    finally:
        timed.stop()
