"""OpenAI JSON -> the public GenerateRequest: n, logprobs (chat and completions forms), logit_bias with string keys,
and splitserve's decoding fields as top-level body fields. Ranges are gateway.validation's (tested there)."""
from __future__ import annotations

import pytest

from gateway.errors import GatewayError
from gateway.openai.request import ParamError, generate_request
from gateway.validation import Limits, validate

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
PROMPT = {"prompt": "hi"}


def test_n_logprobs_and_logit_bias():
    chat = generate_request({**CHAT, "n": 3, "logprobs": True, "top_logprobs": 4, "logit_bias": {"50": -2, "7": 1.5}},
                            chat=True, request_id="r").generate.sampling
    assert chat.n == 3 and chat.logprobs == 4 and dict(chat.logit_bias) == {50: -2.0, 7: 1.5}
    assert generate_request({**CHAT, "logprobs": True}, chat=True, request_id="r").generate.sampling.logprobs == 0
    assert not generate_request({**CHAT, "logprobs": False}, chat=True,
                                request_id="r").generate.sampling.HasField("logprobs")
    completion = generate_request({**PROMPT, "logprobs": 2}, chat=False, request_id="r").generate.sampling
    assert completion.logprobs == 2
    assert not generate_request(PROMPT, chat=False, request_id="r").generate.sampling.HasField("logprobs")


@pytest.mark.parametrize("body,param", [
    ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({**CHAT, "logprobs": 1}, "logprobs"),
    ({**PROMPT, "logprobs": True}, "logprobs"),
    ({**PROMPT, "logit_bias": {"x": 1}}, "logit_bias"),
    ({**PROMPT, "logit_bias": [1, 2]}, "logit_bias"),
    ({**PROMPT, "logit_bias": {"5": "a lot"}}, "logit_bias[5]"),
    ({**PROMPT, "num_beams": "two"}, "num_beams"),
    ({**PROMPT, "speculative": 3}, "speculative"),
    ({**PROMPT, "early_stopping": "yes"}, "early_stopping"),
    ({**PROMPT, "best_of": 2}, "best_of"),
])
def test_wrong_json_types_name_the_field(body, param):
    chat = "messages" in body
    with pytest.raises(ParamError) as info:
        generate_request(body, chat=chat, request_id="r")
    assert info.value.param == param


def test_extension_fields_reach_the_sampling_params():
    body = {**PROMPT, "num_beams": 4, "length_penalty": 0.5, "early_stopping": True}
    sampling = generate_request(body, chat=False, request_id="r").generate.sampling
    assert (sampling.num_beams, sampling.length_penalty, sampling.early_stopping) == (4, 0.5, True)
    assert sampling.temperature == 0.0     # an unset temperature is greedy for a greedy-only strategy
    body = {**PROMPT, "speculative": "prompt_lookup", "num_speculative_tokens": 5, "prompt_lookup_max_ngram": 4,
            "top_k": 8, "min_p": 0.1, "repetition_penalty": 1.1}
    sampling = generate_request(body, chat=False, request_id="r").generate.sampling
    assert (sampling.speculative, sampling.num_speculative_tokens, sampling.prompt_lookup_max_ngram) == \
        ("prompt_lookup", 5, 4)
    assert sampling.temperature == 1.0     # OpenAI's default: prompt lookup also samples
    body = {**PROMPT, "speculative": "lookahead", "lookahead_window": 5, "lookahead_ngram": 3}
    sampling = generate_request(body, chat=False, request_id="r").generate.sampling
    assert (sampling.lookahead_window, sampling.lookahead_ngram, sampling.temperature) == (5, 3, 0.0)
    body = {**PROMPT, "penalty_alpha": 0.6, "top_k": 4}
    sampling = generate_request(body, chat=False, request_id="r").generate.sampling
    assert (round(sampling.penalty_alpha, 3), sampling.top_k, sampling.temperature) == (0.6, 4, 0.0)


@pytest.mark.parametrize("extra", [
    {"num_beams": 4, "length_penalty": 0.5, "early_stopping": True},
    {"penalty_alpha": 0.6, "top_k": 4},
    {"speculative": "lookahead", "lookahead_window": 5, "lookahead_ngram": 3},
    {"speculative": "draft", "num_speculative_tokens": 3},
    {"speculative": "prompt_lookup", "n": 2, "seed": 1},
])
def test_strategies_from_http_pass_validation(extra):
    validate(generate_request({**PROMPT, **extra}, chat=False, request_id="r").generate, Limits())


def test_a_greedy_strategy_with_an_explicit_temperature_is_refused():
    with pytest.raises(GatewayError, match="temperature must be 0"):
        validate(generate_request({**PROMPT, "num_beams": 2, "temperature": 1.0}, chat=False,
                                  request_id="r").generate,
                 Limits())
