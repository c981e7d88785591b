"""The engine servicer's protobuf mapping: every strategy field reaches the engine's SamplingParams, and logprobs
travel with their tokens (the first one in PrefillResponse, the rest in the decode queue, coalesced in order)."""
from __future__ import annotations

import asyncio

from engine_service.sequence import TokenLogprobs
from engine_service.server import OutputStream, sampling_from_proto
from splitserve.v1 import common_pb2


def test_unset_fields_keep_the_engines_defaults():
    params = sampling_from_proto(common_pb2.SamplingParams(max_tokens=4))
    assert params.logprobs is None and params.logit_bias == () and params.num_beams == 1
    assert params.length_penalty == 1.0 and params.speculative == "" and params.penalty_alpha == 0.0


def test_every_strategy_field_is_mapped():
    params = sampling_from_proto(common_pb2.SamplingParams(
        max_tokens=4, logprobs=0, logit_bias={9: -1.5, 3: 2.0}, n=3, num_beams=4, length_penalty=0.0,
        early_stopping=True, penalty_alpha=0.5, speculative="prompt_lookup", num_speculative_tokens=5,
        prompt_lookup_max_ngram=2, lookahead_window=6, lookahead_ngram=3))
    assert params.logprobs == 0                       # set to 0: the chosen token's only (not "none")
    assert params.logit_bias == ((3, 2.0), (9, -1.5))
    assert (params.num_beams, params.length_penalty, params.early_stopping) == (4, 0.0, True)
    assert (params.penalty_alpha, params.speculative, params.num_speculative_tokens) == (0.5, "prompt_lookup", 5)
    assert (params.prompt_lookup_max_ngram, params.lookahead_window, params.lookahead_ngram) == (2, 6, 3)


def test_logprobs_follow_their_tokens_through_the_output_stream():
    async def scenario():
        stream = OutputStream(first=asyncio.get_running_loop().create_future())
        lps = [TokenLogprobs(t, -0.1 * t, ((t, -0.1 * t), (99, -5.0))) for t in (1, 2, 3, 4)]
        stream.push([1, 2], "", lps[:2])              # several tokens at once (a speculative step)
        stream.push([3], "", lps[2:3])
        stream.push([4], "length", lps[3:])
        token, reason, first = await stream.first
        assert (token, reason, first.token_id) == (1, "", 1)
        assert [top.token_id for top in first.top] == [1, 99]
        queued = [stream.queue.get_nowait() for _ in range(stream.queue.qsize())]
        assert [ids for ids, _, _ in queued] == [[2], [3], [4]]
        assert [[lp.token_id for lp in logprobs] for _, _, logprobs in queued] == [[2], [3], [4]]
        assert queued[-1][1] == "length"

        plain = OutputStream(first=asyncio.get_running_loop().create_future())
        plain.push([7], "stop", [])                   # no logprobs asked
        assert await plain.first == (7, "stop", None)

    asyncio.run(scenario())
