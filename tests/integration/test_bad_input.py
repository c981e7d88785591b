"""Every bad request gets the right status and a message a person understands; the next request is served."""
from __future__ import annotations

import grpc
import pytest

from tests.conftest import TINY_CONTEXT
from tests.helpers import make_request, rpc_error, stream
from splitserve.v1 import common_pb2, gateway_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def both_prompt_and_messages() -> gateway_pb2.GenerateRequest:
    request = make_request("hello", max_tokens=4)
    request.messages.append(common_pb2.ChatMessage(role="user", content="hi"))
    return request


BAD_REQUESTS = {
    "neither prompt nor messages": (gateway_pb2.GenerateRequest(), "exactly one of prompt or messages"),
    "both prompt and messages": (both_prompt_and_messages(), "exactly one of prompt or messages"),
    "unknown chat role": (make_request([("wizard", "hi")], max_tokens=4), "role"),
    "prompt longer than the context": (make_request("hello " * (TINY_CONTEXT + 10), max_tokens=4), "context"),
    "max_tokens 0": (make_request("hello", max_tokens=0), "max_tokens"),
    "max_tokens past the context": (make_request("hello", max_tokens=TINY_CONTEXT), "context"),
    "negative temperature": (make_request("hello", max_tokens=4, temperature=-0.5), "temperature"),
    "top_p 0": (make_request("hello", max_tokens=4, top_p=0.0), "top_p"),
    "top_p above 1": (make_request("hello", max_tokens=4, top_p=1.5), "top_p"),
    "negative top_k": (make_request("hello", max_tokens=4, top_k=-1), "top_k"),
    "repetition_penalty 0": (make_request("hello", max_tokens=4, repetition_penalty=0.0), "repetition_penalty"),
    "negative repetition_penalty": (make_request("hello", max_tokens=4, repetition_penalty=-1.0),
                                    "repetition_penalty"),
    "too many stop strings": (make_request("hello", max_tokens=4, stop=[f"s{i}" for i in range(17)]), "stop"),
    "empty stop string": (make_request("hello", max_tokens=4, stop=["ok", ""]), "stop[1] is empty"),
    "stop token id past the vocabulary": (make_request("hello", max_tokens=4, stop_token_ids=[10**7]),
                                          "stop_token_ids"),
    "nan temperature": (make_request("hello", max_tokens=4, temperature=float("nan")), "temperature"),
    "too many logprobs": (make_request("hello", max_tokens=4, logprobs=21), "logprobs is too large"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_invalid_argument_and_server_keeps_serving(gateway, case):
    request, words = BAD_REQUESTS[case]
    error = rpc_error(lambda: gateway.Generate(request, timeout=30))
    assert error.code() == INVALID, error.details()
    assert words in error.details()
    ok = stream(gateway, make_request("hello", max_tokens=3))
    assert ok.last.finish_reason in ("length", "stop")


def test_duplicate_request_id_in_flight_is_rejected(gateway):
    first = gateway.Generate(make_request("hello", max_tokens=200, ignore_eos=True, request_id="dup-1"), timeout=60)
    next(first)
    error = rpc_error(lambda: gateway.Generate(make_request("hi", max_tokens=2, request_id="dup-1"), timeout=30))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "dup-1" in error.details()
    first.cancel()


def test_engine_rejects_bad_token_ids_directly(engine):
    from splitserve.v1 import engine_pb2
    for ids in ([], [-1, 5], [10**6]):
        error = rpc_error(lambda: engine.Prefill(engine_pb2.PrefillRequest(
            request_id=f"bad-{len(ids)}", prompt_token_ids=ids,
            sampling=common_pb2.SamplingParams(max_tokens=2)), timeout=10))
        assert error.code() == INVALID, error.details()
