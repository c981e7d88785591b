"""Hostile inputs at the public gateway, each refused with a 4xx / INVALID_ARGUMENT / RESOURCE_EXHAUSTED that names
the problem (never INTERNAL, never a long echo of the input), while the server keeps serving the next request and
the streams already running."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from tests.conftest import start_stack
from tests.helpers import make_request, rpc_error, stream, stream_all
from tests.integration.test_lifecycle import scrape
from splitserve.v1 import (common_pb2, engine_pb2, engine_pb2_grpc, gateway_pb2, gateway_pb2_grpc, tokenizer_pb2,
                           tokenizer_pb2_grpc)


@pytest.fixture(scope="module")
def unlimited_stub(tiny_stack):
    """A client that would send any size (the server's own limits must refuse it)."""
    with grpc.insecure_channel(tiny_stack.address("gateway"), options=[("grpc.max_send_message_length", -1)]) as ch:
        yield gateway_pb2_grpc.GatewayStub(ch)


def post(tiny_stack, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{tiny_stack.ports.gateway_http}/v1/chat/completions",
                                     data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def still_serving(stub) -> None:
    assert stream(stub, make_request("hello", max_tokens=2)).last.finish_reason in ("stop", "length")


def chat(content: str = "hi", **sampling) -> gateway_pb2.GenerateRequest:
    return make_request([("user", content)], max_tokens=4, **sampling)


def test_200000_stop_token_ids_are_refused_on_both_apis(unlimited_stub, tiny_stack):
    error = rpc_error(lambda: unlimited_stub.Generate(chat(stop_token_ids=list(range(200_000))), timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop_token_ids" in error.details()
    status, reply = post(tiny_stack, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                      "stop_token_ids": list(range(200_000))})
    assert status in (400, 413), reply
    still_serving(unlimited_stub)


def test_30000_stop_token_ids_with_four_beams_are_refused_not_internal(unlimited_stub):
    error = rpc_error(lambda: unlimited_stub.Generate(chat(stop_token_ids=list(range(30_000)), num_beams=4),
                                                      timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop_token_ids" in error.details()
    still_serving(unlimited_stub)


def test_500000_empty_messages_are_refused_while_a_running_stream_keeps_streaming(unlimited_stub, tiny_stack):
    running = unlimited_stub.Generate(make_request("a story:", max_tokens=400, ignore_eos=True), timeout=600)
    first = next(running)
    many = gateway_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(max_tokens=2))
    many.messages.extend(common_pb2.ChatMessage(role="user") for _ in range(500_000))
    error = rpc_error(lambda: unlimited_stub.Generate(many, timeout=60))
    assert error.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT), error.details()
    status, _ = post(tiny_stack, {"messages": [{"role": "user", "content": ""}] * 500_000, "max_tokens": 2})
    assert status in (400, 413)
    rest = list(running)
    assert len(first.token_ids) + sum(len(chunk.token_ids) for chunk in rest) == 400
    # under the size limit, the message count limit answers
    fewer = gateway_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(max_tokens=2))
    fewer.messages.extend(common_pb2.ChatMessage(role="user") for _ in range(3000))
    error = rpc_error(lambda: unlimited_stub.Generate(fewer, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "3000 messages" in error.details()
    still_serving(unlimited_stub)


def test_a_10000_character_role_is_refused_without_echoing_it(unlimited_stub, tiny_stack):
    role = "r" * 10_000
    error = rpc_error(lambda: unlimited_stub.Generate(make_request([(role, "hi")], max_tokens=2), timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in error.details()
    assert len(error.details()) < 300
    status, reply = post(tiny_stack, {"messages": [{"role": role, "content": "hi"}], "max_tokens": 2})
    assert status == 400 and len(reply["error"]["message"]) < 300
    still_serving(unlimited_stub)


def test_an_output_larger_than_the_budget_is_refused(unlimited_stub, tiny_stack):
    status, reply = post(tiny_stack, {"messages": [{"role": "user", "content": "hi"}], "n": 16, "max_tokens": 1900,
                                      "logprobs": True, "top_logprobs": 20})
    assert status == 400 and "per request" in reply["error"]["message"]
    status, _ = post(tiny_stack, {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3,
                                  "logprobs": True, "top_logprobs": 20})
    assert status == 200


def test_many_hostile_requests_at_once_leave_the_server_serving(unlimited_stub):
    """Refusals from many threads at once: none is INTERNAL, and the next normal request is served."""
    codes: list[grpc.StatusCode] = []

    def hostile(i: int) -> None:
        request = chat(stop_token_ids=list(range(10_000))) if i % 2 else make_request([("x" * 5000, "hi")])
        codes.append(rpc_error(lambda: unlimited_stub.Generate(request, timeout=60)).code())

    threads = [threading.Thread(target=hostile, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    still_serving(unlimited_stub)


def test_the_tokenizer_port_bounds_messages_and_roles_itself(tiny_stack):
    """The tokenizer is reachable by any internal caller: its own limits, not only the gateway's."""
    with grpc.insecure_channel(tiny_stack.address("tokenizer")) as channel:
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        many = tokenizer_pb2.TokenizeRequest(messages=[common_pb2.ChatMessage(role="user")] * 500_000)
        error = rpc_error(lambda: stub.Tokenize(many, timeout=120))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "500000 messages" in error.details()
        long_role = tokenizer_pb2.TokenizeRequest(messages=[common_pb2.ChatMessage(role="r" * 10_000, content="x")])
        error = rpc_error(lambda: stub.Tokenize(long_role, timeout=60))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 300
        assert stub.Tokenize(tokenizer_pb2.TokenizeRequest(prompt="hello"), timeout=60).token_ids


def over_64_rows(stack) -> float:
    metrics = scrape(stack.ports.engine_metrics)
    return metrics["splitserve_engine_batch_size_count"] - metrics['splitserve_engine_batch_size_bucket{le="64.0"}']


def test_beams_count_in_the_engines_sequence_limit(tiny_model_dir, tmp_path):
    """17 beam searches of 16 beams against max_num_seqs 64 (and a token budget that would allow more): the excess
    waits; no step ever runs more than 64 rows."""
    stack = start_stack(tiny_model_dir, tmp_path, ["--max-num-seqs", "64", "--max-num-batched-tokens", "2048",
                                                   "--compact-decode-weights", "false"])
    try:
        with grpc.insecure_channel(stack.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            requests = [make_request(f"story {i}:", max_tokens=12, num_beams=16, ignore_eos=True) for i in range(17)]
            results = stream_all(stub, requests, concurrency=17)
        assert all(result.last.finish_reason == "length" for result in results)
        assert over_64_rows(stack) == 0
    finally:
        stack.stop()


def test_the_engine_port_refuses_out_of_range_values_itself(tiny_stack):
    """The engine is reachable by any internal caller: it re-checks every bound it relies on."""
    cases = {
        "num_beams": common_pb2.SamplingParams(max_tokens=2, num_beams=1000),
        "num_speculative_tokens": common_pb2.SamplingParams(max_tokens=2, speculative="prompt_lookup",
                                                            num_speculative_tokens=10_000),
        "logit_bias": common_pb2.SamplingParams(max_tokens=2, logit_bias={i: 1.0 for i in range(10_000)}),
        "stop_token_ids": common_pb2.SamplingParams(max_tokens=2, stop_token_ids=list(range(200_000))),
        "vocabulary": common_pb2.SamplingParams(max_tokens=2, logit_bias={10_000_000: 1.0}),
        "lookahead_window": common_pb2.SamplingParams(max_tokens=2, speculative="lookahead", lookahead_window=10**6),
    }
    with grpc.insecure_channel(tiny_stack.address("engine"), options=[("grpc.max_send_message_length", -1)]) as ch:
        stub = engine_pb2_grpc.EngineStub(ch)
        for i, (field, sampling) in enumerate(cases.items()):
            request = engine_pb2.PrefillRequest(request_id=f"hostile-{i}-{time.time()}", prompt_token_ids=[5, 6, 7],
                                                sampling=sampling)
            error = rpc_error(lambda: stub.Prefill(request, timeout=60))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.code(), error.details())
            assert field in error.details() and len(error.details()) < 300, error.details()
        error = rpc_error(lambda: stub.Prefill(engine_pb2.PrefillRequest(
            request_id="x" * 10_000, prompt_token_ids=[5], sampling=common_pb2.SamplingParams(max_tokens=1)),
            timeout=60))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 300
        served = stub.Prefill(engine_pb2.PrefillRequest(request_id=f"after-{time.time()}", prompt_token_ids=[5, 6],
                                                        sampling=common_pb2.SamplingParams(max_tokens=1)), timeout=60)
        assert served.finish_reason == "length"
