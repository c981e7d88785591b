"""The full gRPC stack (tokenizer, engine, gateway processes) on a tiny random Llama with the real tokenizer."""
from __future__ import annotations

import pytest

from tests.helpers import (
    assert_equals_generate, assert_text_is_decode_of_ids, greedy_batch, make_request, prompt_ids, reference_greedy, stream,
)
from tests.prompts import CHATS, PROMPTS

MAX_TOKENS = 24
ALL_PROMPTS = PROMPTS + CHATS


@pytest.fixture(scope="module")
def greedy_results(gateway):
    return greedy_batch(gateway, ALL_PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("index", range(len(ALL_PROMPTS)))
def test_greedy_tokens_equal_transformers_generate(greedy_results, tiny_model, tokenizer, index):
    assert_equals_generate(greedy_results[index], tiny_model, tokenizer, ALL_PROMPTS[index], MAX_TOKENS)


@pytest.mark.parametrize("index", range(len(ALL_PROMPTS)))
def test_streamed_text_is_the_decode_of_the_streamed_ids(greedy_results, tokenizer, index):
    assert_text_is_decode_of_ids(greedy_results[index], tokenizer)


def test_ignore_eos_runs_to_max_tokens(gateway):
    got = stream(gateway, make_request("The quick brown fox", max_tokens=16, ignore_eos=True))
    assert len(got.token_ids) == 16
    assert got.last.finish_reason == "length"
    assert got.last.usage.completion_tokens == 16
    assert got.last.request_id


def test_seeded_sampling_is_reproducible(gateway):
    request = make_request("Once upon a time", max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    first, second = stream(gateway, request), stream(gateway, request)
    assert first.token_ids == second.token_ids
    other = stream(gateway, make_request("Once upon a time", max_tokens=16, temperature=1.0, seed=99))
    assert other.token_ids != first.token_ids


def test_stop_token_ids_end_the_stream(gateway, tiny_model, tokenizer):
    ids = prompt_ids(tokenizer, "The capital of France is")
    expected = reference_greedy(tiny_model, ids, 12)
    stop_at = expected[5]
    got = stream(gateway, make_request("The capital of France is", max_tokens=12, stop_token_ids=[stop_at]))
    assert got.token_ids == expected[: expected.index(stop_at) + 1]
    assert got.last.finish_reason == "stop"


def test_stop_string_is_not_returned_even_across_tokens(gateway, tokenizer):
    prompt = "Once upon a time, in a small village,"
    free = stream(gateway, make_request(prompt, max_tokens=24, ignore_eos=True))
    text, ids = free.text, free.token_ids
    # A stop string made of the end of one token's text and the start of the next ones.
    for i in range(2, len(ids) - 3):
        boundary = len(tokenizer.decode(ids[:i], skip_special_tokens=True))
        stop = text[boundary - 2: boundary + 3]
        if len(stop) == 5 and "\ufffd" not in text[: boundary + 3] and text.find(stop) == boundary - 2:
            break
    else:
        pytest.skip("no usable token boundary in this output")
    got = stream(gateway, make_request(prompt, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert got.last.finish_reason == "stop"
    assert got.text == text[: text.index(stop)]


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_greedy_with_repetition_penalty_equals_transformers(gateway, tiny_model, tokenizer, penalty):
    prompt = "1, 1, 2, 3, 5, 8,"
    expected = reference_greedy(tiny_model, prompt_ids(tokenizer, prompt), 20, repetition_penalty=penalty)
    got = stream(gateway, make_request(prompt, max_tokens=20, repetition_penalty=penalty))
    assert got.token_ids == expected
