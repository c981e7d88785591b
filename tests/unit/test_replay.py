"""The gateway's failover plan: what the next engine is asked for after the first one was lost mid-stream."""
from __future__ import annotations

import grpc

from gateway.errors import GatewayError
from gateway.failover import is_engine_lost, replay
from splitserve.v1 import common_pb2


def test_a_stream_resumes_from_its_tokens_with_what_is_left_of_max_tokens():
    sampling = common_pb2.SamplingParams(max_tokens=10, temperature=0.8, seed=3)
    plan = replay([1, 2, 3], [7, 8], sampling)
    assert plan.context == [1, 2, 3, 7, 8] and plan.replayed_tokens == 2 and plan.skip == 0
    assert plan.sampling.max_tokens == 8 and plan.sampling.seed == 3 and sampling.max_tokens == 10


def test_beam_search_restarts_from_the_prompt_and_skips_what_was_streamed():
    plan = replay([1, 2, 3], [7, 8], common_pb2.SamplingParams(max_tokens=10, num_beams=2))
    assert plan.context == [1, 2, 3] and plan.replayed_tokens == 0 and plan.skip == 2
    assert plan.sampling.max_tokens == 10


def test_only_a_lost_engine_fails_over():
    assert is_engine_lost(GatewayError(grpc.StatusCode.UNAVAILABLE, "gone"))
    assert not is_engine_lost(GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, "late"))
    assert not is_engine_lost(GatewayError(grpc.StatusCode.INTERNAL, "the engine failed"))
