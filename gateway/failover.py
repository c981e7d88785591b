"""Mid-stream failover: when the engine serving a stream dies after its first token, the stream goes on from another
engine. The gateway resubmits the prompt plus the tokens already streamed (a prefill of that context, most of it from
the new engine's prefix cache when affinity put the prompt there), asks for what is left of max_tokens, and feeds
the new engine's tokens into the same text stream: the client sees neither an error nor repeated or missing text.

Greedy continuations are token-identical to an undisturbed run, and so are seeded ones (the engine keys a seeded
sequence's draws by (seed, position)); unseeded ones continue from the same distribution. Beam search cannot be
resumed mid-search: it restarts from the prompt and the tokens already streamed are skipped in its (identical) result.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from gateway.errors import GatewayError
from splitserve.v1 import common_pb2


@dataclass
class Replay:
    """What to prefill on the next engine, and how many of its first tokens the client already has."""
    context: list[int]
    sampling: common_pb2.SamplingParams
    replayed_tokens: int     # the context's last tokens that were generated (PrefillRequest.replayed_tokens)
    skip: int                # leading tokens of the new stream to drop (beam search restarts from the prompt)


def is_engine_lost(error: GatewayError) -> bool:
    """Whether a stream's error means its engine died or cannot be reached (rather than the request failing)."""
    return error.code == grpc.StatusCode.UNAVAILABLE


def replay(prompt_ids: list[int], generated: list[int], sampling: common_pb2.SamplingParams) -> Replay:
    resumed = common_pb2.SamplingParams()
    resumed.CopyFrom(sampling)
    if sampling.num_beams > 1:
        return Replay(list(prompt_ids), resumed, 0, len(generated))
    resumed.max_tokens = sampling.max_tokens - len(generated)
    return Replay(prompt_ids + generated, resumed, len(generated), 0)
