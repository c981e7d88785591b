"""The engine servicer's protobuf mapping: every strategy field reaches the engine's SamplingParams, and logprobs
travel with their tokens (the first one in PrefillResponse, the rest held until a Decode stream takes them, coalesced)."""
from __future__ import annotations

import asyncio

import grpc

from engine_service.sequence import SequenceOutput, TokenLogprobs
from engine_service.server import sampling_from_proto
from engine_service.streams import DecodeOutbox, FirstToken, OutputStream
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


def test_outputs_wait_for_their_stream_then_go_out_coalesced_with_their_logprobs():
    async def scenario():
        stream = OutputStream(first=asyncio.get_running_loop().create_future(), request_id="r")
        lps = [TokenLogprobs(t, -0.1 * t, ((t, -0.1 * t), (99, -5.0))) for t in (1, 2, 3, 4, 5)]
        stream.push(SequenceOutput([1, 2], "", lps[:2], queue_seconds=0.5, prefill_seconds=0.25))  # a speculative step
        stream.push(SequenceOutput([3], "", lps[2:3]))
        first = await stream.first
        assert (first.token_id, first.finish_reason, first.logprobs.token_id) == (1, "", 1)
        assert (first.queue_seconds, first.prefill_seconds) == (0.5, 0.25)
        assert [top.token_id for top in first.logprobs.top] == [1, 99]

        outbox = DecodeOutbox()                       # attached only now: what piled up goes out as one output
        stream.outbox, stream.key = outbox, 7
        stream.push(SequenceOutput([4], "", lps[3:4]))
        assert outbox.take() == [stream] and outbox.take() == []
        output = stream.take()
        assert (output.key, list(output.token_ids), output.finish_reason) == (7, [2, 3, 4], "")
        assert [lp.token_id for lp in output.logprobs] == [2, 3, 4] and not stream.finished
        stream.push(SequenceOutput([5], "length", lps[4:]))
        output = stream.take()
        assert (list(output.token_ids), output.finish_reason, stream.finished) == ([5], "length", True)

        plain = OutputStream(first=asyncio.get_running_loop().create_future())
        plain.push(SequenceOutput([7], "stop"))       # no logprobs asked
        assert await plain.first == FirstToken(7, "stop", None)

        failed = OutputStream(first=asyncio.get_running_loop().create_future(), request_id="f")
        failed.push(SequenceOutput([8]))
        failed.push(SequenceOutput([], "error"))
        output = failed.take()
        assert output.error_code == grpc.StatusCode.INTERNAL.value[0] and "'f'" in output.error

    asyncio.run(scenario())
