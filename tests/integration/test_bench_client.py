"""The server_load benchmark's streaming client (bench/server_load.py) against the real stack on the tiny model:
it must count every token a server streams and refuse a run in which a request came back short."""
from __future__ import annotations

import pytest

from bench.server_load import Completion, figures, run_load
from tests.helpers import make_request, stream

MAX_TOKENS = 8


def test_client_counts_every_streamed_token_and_text(tiny_stack, gateway):
    prompts = [f"Tell me about the number {i}." for i in range(4)]
    completions, wall = run_load(f"http://127.0.0.1:{tiny_stack.ports.gateway_http}/v1", prompts, 2, MAX_TOKENS)
    assert len(completions) == 4
    for completion in completions:
        assert completion.tokens == MAX_TOKENS and completion.finish_reason == "length"
        assert 1 <= len(completion.chunk_times) <= MAX_TOKENS and completion.prompt_tokens > 0
    # the same greedy request through gRPC: the client's text is the whole stream, its count the ids streamed
    by_text = {c.text for c in completions}
    for prompt in prompts:
        reference = stream(gateway, make_request(prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
        assert len(reference.token_ids) == MAX_TOKENS
        assert reference.text in by_text
    run = figures(completions, wall, MAX_TOKENS)
    assert run["requests"] == 4 and run["tokens_per_s"] > 0
    assert 0 < run["ttft_p50_s"] <= run["ttft_p99_s"] and run["itl_p50_s"] <= run["itl_p99_s"]


def test_a_short_request_fails_the_run():
    short = Completion(start=0.0, chunk_times=[0.1, 0.2], tokens=MAX_TOKENS - 1, finish_reason="stop")
    full = Completion(start=0.0, chunk_times=[0.1, 0.2], tokens=MAX_TOKENS, finish_reason="length")
    figures([full], 1.0, MAX_TOKENS)
    with pytest.raises(RuntimeError, match="1 of 2 requests did not produce 8 tokens"):
        figures([full, short], 1.0, MAX_TOKENS)
