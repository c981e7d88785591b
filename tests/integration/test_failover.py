"""Mid-stream failover: two engines behind one gateway, one killed (-9) while streams run on it. Every stream
finishes as an undisturbed run does, token for token (greedy and seeded sampling), and the client sees no error.
The same scaled-out stack has two tokenizers behind one target: the gateway spreads its calls and Detokenize
streams over both. Runs its own stack: it kills an engine."""
from __future__ import annotations

import grpc
import pytest

from common.stack import Ports, Stack
from tests.helpers import make_request, stream_all
from tests.integration.test_lifecycle import scrape
from splitserve.v1 import engine_pb2, engine_pb2_grpc, gateway_pb2_grpc

MAX_TOKENS = 128
# fp32, as the tiny stack: greedy tokens must not depend on which engine or batch computed them.
ENGINE_ARGS = ["--max-num-batched-tokens", "64", "--compact-decode-weights", "false"]
SLOW = ["--step-delay-seconds", "0.02"]   # the victim: 128 steps take seconds, so the kill lands mid-stream
FAILOVERS = 'splitserve_failovers_total{reason="engine_unavailable"}'


@pytest.fixture(scope="module")
def stacks(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("failover-logs")
    victim = Stack(model=str(tiny_model_dir), ports=Ports.free(), log_dir=logs / "victim", engine_args=ENGINE_ARGS + SLOW)
    victim.start_service("engine")
    victim.start_service("tokenizer")
    ports = Ports.free()
    main = Stack(model=str(tiny_model_dir), ports=ports, log_dir=logs / "main", engine_args=ENGINE_ARGS,
                 engine_address=f"127.0.0.1:{ports.engine},{victim.address('engine')}",
                 tokenizer_address=f"ipv4:127.0.0.1:{ports.tokenizer},{victim.address('tokenizer')}",
                 gateway_args=["--engine-health-interval", "0.5"])
    try:
        main.start()
    except RuntimeError:
        victim.stop()
        raise
    yield main, victim
    main.stop()
    victim.stop()


def requests():
    """8 greedy streams (two with logprobs) and 4 seeded sampled ones, none of which stops early."""
    greedy = [make_request(f"Story number {i}: once upon a time", max_tokens=MAX_TOKENS, temperature=0.0,
                           ignore_eos=True, **({"logprobs": 2} if i < 2 else {})) for i in range(8)]
    sampled = [make_request(f"Poem {i}:", max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.95, seed=100 + i,
                            presence_penalty=0.5, ignore_eos=True) for i in range(4)]
    return greedy + sampled


def test_calls_and_detokenize_streams_spread_over_both_tokenizers(stacks):
    main, victim = stacks
    with grpc.insecure_channel(main.address("gateway")) as channel:
        stream_all(gateway_pb2_grpc.GatewayStub(channel), requests()[:8], concurrency=8)
    for stack in (main, victim):
        metrics = scrape(stack.ports.tokenizer_metrics)
        assert metrics['splitserve_tokenizer_seconds_count{op="tokenize"}'] > 0
        assert metrics['splitserve_tokenizer_seconds_count{op="detokenize"}'] > 0


def read_tokens(call, count: int) -> list:
    """The stream's first chunks, up to `count` tokens (or its end)."""
    chunks = []
    while sum(len(c.token_ids) for c in chunks) < count and not (chunks and chunks[-1].finish_reason):
        chunks.append(next(call))
    return chunks


def test_streams_survive_the_loss_of_their_engine(stacks):
    main, victim = stacks
    with grpc.insecure_channel(main.address("gateway")) as channel, \
            grpc.insecure_channel(victim.address("engine")) as victim_channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        undisturbed = [s.token_ids for s in stream_all(gateway, requests(), concurrency=12)]
        assert all(len(tokens) == MAX_TOKENS for tokens in undisturbed)

        before = scrape(main.ports.gateway_metrics).get(FAILOVERS, 0.0)
        calls = [gateway.Generate(request, timeout=120) for request in requests()]
        firsts = [read_tokens(call, 16) for call in calls]   # every stream is well past its first token
        on_victim = engine_pb2_grpc.EngineStub(victim_channel).GetStats(engine_pb2.GetStatsRequest()).running
        assert on_victim >= 1, "the router should have put some of the streams on the slow engine"
        victim.services["engine"].process.kill()
        streams = [[*first, *call] for first, call in zip(firsts, calls)]   # raises if a client saw an error

    for request, chunks, expected in zip(requests(), streams, undisturbed):
        assert [t for c in chunks for t in c.token_ids] == expected
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS
        if request.sampling.HasField("logprobs"):
            assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    failovers = scrape(main.ports.gateway_metrics)[FAILOVERS] - before
    assert 1 <= failovers <= on_victim
