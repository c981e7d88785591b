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


# ---- decoding strategies: logprobs, logit_bias, n, beam search, contrastive search, speculative decoding ----------

INVALID_DECODING = {
    "logprobs too large": (dict(logprobs=21), "logprobs is too large"),
    "negative logprobs": (dict(logprobs=-1), "logprobs"),
    "logit_bias above 100": (dict(logit_bias={5: 100.5}), "logit_bias[5]"),
    "logit_bias below -100": (dict(logit_bias={5: -101.0}), "logit_bias[5]"),
    "logit_bias not finite": (dict(logit_bias={5: float("nan")}), "logit_bias[5]"),
    "logit_bias negative id": (dict(logit_bias={-3: 1.0}), "logit_bias keys"),
    "logit_bias too many": (dict(logit_bias={i: 1.0 for i in range(301)}), "logit_bias has 301 entries"),
    "n above 16": (dict(n=17, temperature=1.0), "sampling.n"),
    "negative n": (dict(n=-1, temperature=1.0), "sampling.n"),
    "n > 1 greedy without beams": (dict(n=2), "n > 1 needs sampling"),
    "n > 1 with beams": (dict(n=2, num_beams=2), "n > 1 with num_beams > 1 is not supported"),
    "num_beams above 16": (dict(num_beams=17), "num_beams"),
    "negative num_beams": (dict(num_beams=-1), "num_beams"),
    "beam search with temperature": (dict(num_beams=2, temperature=0.7), "temperature must be 0"),
    "length_penalty without beams": (dict(length_penalty=2.0), "length_penalty"),
    "early_stopping without beams": (dict(early_stopping=True), "early_stopping"),
    "length_penalty not finite": (dict(num_beams=2, length_penalty=float("inf")), "length_penalty"),
    "logprobs with beams": (dict(num_beams=2, logprobs=0), "logprobs with num_beams > 1 is not supported"),
    "penalty_alpha above 1": (dict(penalty_alpha=1.5, top_k=4), "penalty_alpha"),
    "negative penalty_alpha": (dict(penalty_alpha=-0.1, top_k=4), "penalty_alpha"),
    "contrastive without top_k": (dict(penalty_alpha=0.6), "top_k >= 2"),
    "contrastive with top_k 1": (dict(penalty_alpha=0.6, top_k=1), "top_k >= 2"),
    "contrastive with temperature": (dict(penalty_alpha=0.6, top_k=4, temperature=0.8), "temperature must be 0"),
    "beams and contrastive": (dict(num_beams=2, penalty_alpha=0.6, top_k=4), "choose one"),
    "beams and speculative": (dict(num_beams=2, speculative="prompt_lookup"), "choose one"),
    "contrastive and speculative": (dict(penalty_alpha=0.6, top_k=4, speculative="draft"), "choose one"),
    "unknown speculative mode": (dict(speculative="medusa"), "'prompt_lookup', 'draft', 'lookahead'"),
    "lookahead with temperature": (dict(speculative="lookahead", temperature=0.5), "temperature must be 0"),
    "num_speculative_tokens above 16": (dict(speculative="draft", num_speculative_tokens=17),
                                        "num_speculative_tokens"),
    "num_speculative_tokens without speculative": (dict(num_speculative_tokens=4), "num_speculative_tokens"),
    "prompt_lookup_max_ngram above 8": (dict(speculative="prompt_lookup", prompt_lookup_max_ngram=9),
                                        "prompt_lookup_max_ngram"),
    "prompt_lookup_max_ngram without prompt_lookup": (dict(speculative="draft", prompt_lookup_max_ngram=3),
                                                      "prompt_lookup_max_ngram"),
    "lookahead_window above 16": (dict(speculative="lookahead", lookahead_window=17), "lookahead_window"),
    "lookahead_ngram 1": (dict(speculative="lookahead", lookahead_ngram=1), "lookahead_ngram"),
    "lookahead_ngram above 8": (dict(speculative="lookahead", lookahead_ngram=9), "lookahead_ngram"),
    "lookahead_window without lookahead": (dict(lookahead_window=4), "lookahead_window"),
    "lookahead_ngram without lookahead": (dict(speculative="prompt_lookup", lookahead_ngram=3), "lookahead_ngram"),
}


@pytest.mark.parametrize("case", list(INVALID_DECODING))
def test_invalid_decoding_parameters_name_the_field(case):
    params, words = INVALID_DECODING[case]
    with pytest.raises(GatewayError) as info:
        validate(request(**params), Limits())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.message, info.value.message


VALID_DECODING = {
    "logprobs 0": dict(logprobs=0), "logprobs 20": dict(logprobs=20),
    "logit_bias": dict(logit_bias={0: -100.0, 7: 100.0, 9: 0.5}),
    "n sampled": dict(n=16, temperature=0.8, seed=3), "n 0 greedy": dict(n=0), "n 1 greedy": dict(n=1),
    "beam search": dict(num_beams=4, length_penalty=0.5, early_stopping=True),
    "beam search 16 with logit_bias": dict(num_beams=16, logit_bias={3: -5.0}),
    "contrastive": dict(penalty_alpha=0.6, top_k=4, logprobs=5),
    "prompt lookup sampled": dict(speculative="prompt_lookup", num_speculative_tokens=16,
                                  prompt_lookup_max_ngram=8, temperature=0.7, n=2),
    "draft": dict(speculative="draft", num_speculative_tokens=4, logprobs=2),
    "lookahead": dict(speculative="lookahead", lookahead_window=16, lookahead_ngram=8),
    "lookahead defaults": dict(speculative="lookahead", lookahead_ngram=2),
}


@pytest.mark.parametrize("case", list(VALID_DECODING))
def test_valid_decoding_parameters_reach_the_engine_unchanged(case):
    params = VALID_DECODING[case]
    valid = validate(request(**params), Limits())
    assert valid.n == max(1, params.get("n", 1))
    expected = common_pb2.SamplingParams(**params)
    expected.ClearField("n")          # the gateway fans out; the engine sees one sequence per completion
    assert valid.sampling == expected


def test_logit_bias_ids_must_be_in_the_vocabulary():
    valid = validate(request(logit_bias={999: 1.0}), Limits())
    fit_max_tokens(valid, prompt_tokens=10, context=200, vocab_size=1000)
    valid = validate(request(logit_bias={1000: 1.0}), Limits())
    with pytest.raises(GatewayError) as info:
        fit_max_tokens(valid, prompt_tokens=10, context=200, vocab_size=1000)
    assert "logit_bias" in info.value.message and "1000" in info.value.message


def test_engine_sampling_params_accept_what_the_gateway_accepts():
    """Every valid combination maps into the engine's SamplingParams and passes its own re-check."""
    from engine_service.server import sampling_from_proto
    for params in VALID_DECODING.values():
        valid = validate(request(max_tokens=8, **params), Limits())
        engine_params = sampling_from_proto(valid.sampling)
        engine_params.validate()
        assert engine_params.logprobs == params.get("logprobs")
        assert dict(engine_params.logit_bias) == params.get("logit_bias", {})
        assert engine_params.num_beams == max(1, params.get("num_beams", 1))
        assert engine_params.length_penalty == params.get("length_penalty", 1.0)
        assert engine_params.speculative == params.get("speculative", "")
