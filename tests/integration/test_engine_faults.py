"""A request whose forward pass fails ends alone with INTERNAL; the requests batched with it complete."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.conftest import start_stack
from tests.helpers import make_request, prompt_ids, reference_greedy, rpc_error, stream
from splitserve.v1 import engine_pb2, engine_pb2_grpc, gateway_pb2_grpc

POISON = "zebra"   # the engine is told to fail any step that computes this word's token


@pytest.fixture(scope="module")
def faulty_stack(tiny_model_dir, tokenizer, tmp_path_factory):
    poison_id = tokenizer(" " + POISON, add_special_tokens=False).input_ids[-1]
    stack = start_stack(tiny_model_dir, tmp_path_factory.mktemp("faulty-stack-logs"),
                        ["--fault-token-id", str(poison_id), "--small-step-bf16", "false"])
    yield stack
    stack.stop()


def test_failing_request_is_internal_and_the_batch_goes_on(faulty_stack, tiny_model, tokenizer):
    with grpc.insecure_channel(faulty_stack.address("gateway")) as channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        good_prompts = [f"A story about the number {i}:" for i in range(6)]
        with ThreadPoolExecutor(7) as pool:
            bad = pool.submit(lambda: rpc_error(lambda: gateway.Generate(
                make_request(f"Look, a {POISON}!", max_tokens=16), timeout=60)))
            good = list(pool.map(lambda p: stream(gateway, make_request(p, max_tokens=16)), good_prompts))
        error = bad.result()
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "engine" in error.details()
        for prompt, got in zip(good_prompts, good):
            assert got.token_ids == reference_greedy(tiny_model, prompt_ids(tokenizer, prompt), 16)
        assert stream(gateway, make_request("still serving", max_tokens=4)).last.finish_reason
    with grpc.insecure_channel(faulty_stack.address("engine")) as channel:
        stats = engine_pb2_grpc.EngineStub(channel).GetStats(engine_pb2.GetStatsRequest())
        assert (stats.running, stats.kv_blocks_used) == (0, 0)
