"""The gateway's validation of public requests, without servers."""
from __future__ import annotations

import grpc
import pytest

from gateway.errors import GatewayError
from gateway.validation import Limits, fit_max_tokens, validate
from splitserve.v1 import common_pb2, gateway_pb2


def request(**sampling: object) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(**sampling))


def test_valid_request_gets_an_id_and_loses_its_stop_strings_for_the_engine():
    valid = validate(request(stop=["\n\n"], temperature=0.7), Limits())
    assert len(valid.request_id) == 32
    assert valid.stop == ["\n\n"]
    assert list(valid.sampling.stop) == []
    assert valid.sampling.temperature == pytest.approx(0.7)


def test_max_tokens_default_is_capped_by_the_context():
    valid = validate(request(), Limits())
    fit_max_tokens(valid, prompt_tokens=100, context=200, vocab_size=1000)
    assert valid.sampling.max_tokens == 100
    valid = validate(request(), Limits())
    fit_max_tokens(valid, prompt_tokens=10, context=8192, vocab_size=1000)
    assert valid.sampling.max_tokens == 256


@pytest.mark.parametrize("prompt_tokens,max_tokens,words", [(200, None, "no room"), (100, 101, "at most 100")])
def test_context_overflow(prompt_tokens, max_tokens, words):
    valid = validate(request() if max_tokens is None else request(max_tokens=max_tokens), Limits())
    with pytest.raises(GatewayError) as info:
        fit_max_tokens(valid, prompt_tokens=prompt_tokens, context=200, vocab_size=1000)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.message


@pytest.mark.parametrize("params", [dict(min_p=1.5), dict(presence_penalty=3.0), dict(frequency_penalty=-2.5),
                                    dict(stop_token_ids=[-1]), dict(top_p=float("inf"))])
def test_out_of_range_parameters(params):
    with pytest.raises(GatewayError) as info:
        validate(request(**params), Limits())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert next(iter(params)) in info.value.message


def test_limits_are_configurable():
    with pytest.raises(GatewayError):
        validate(request(stop=["a", "b", "c"]), Limits(max_stop_strings=2))
    with pytest.raises(GatewayError):
        validate(request(stop=["abcdef"]), Limits(max_stop_string_chars=5))
    with pytest.raises(GatewayError):
        validate(gateway_pb2.GenerateRequest(prompt="x" * 11), Limits(max_prompt_chars=10))


def test_request_id_must_be_printable_and_short():
    with pytest.raises(GatewayError):
        validate(gateway_pb2.GenerateRequest(prompt="hi", request_id="a\nb"), Limits())
    with pytest.raises(GatewayError):
        validate(gateway_pb2.GenerateRequest(prompt="hi", request_id="x" * 200), Limits())
