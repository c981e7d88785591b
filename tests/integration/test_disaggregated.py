"""Disaggregated serving: a prefill engine (--role prefill) computes the prompts and sends their KV caches to a decode
engine (--role decode) behind one gateway (--prefill-engine-address). Greedy output equals transformers' generate;
a prompt sharing a long prefix with an earlier one transfers only its new blocks; mismatched engines are refused;
a prefill engine killed mid-transfer fails the request fast and leaks no block. Runs its own stack."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from common.stack import Ports, Stack
from tests.helpers import make_request, greedy_batch, prompt_ids, reference_greedy, stream
from tests.integration.test_lifecycle import scrape, wait_until
from tests.prompts import CHATS, PROMPTS
from splitserve.v1 import common_pb2, engine_pb2, engine_pb2_grpc, gateway_pb2_grpc

MAX_TOKENS = 16
# As the tiny stack: a step budget of 64 tokens (longer prompts are prefilled in chunks, each chunk's blocks sent as
# soon as it is computed), fp32 for token-identical output. The prefill engine is slowed so that a kill lands
# mid-transfer.
ENGINE_ARGS = ["--max-num-batched-tokens", "64", "--compact-decode-weights", "false"]
LONG_PROMPT = "A long prompt, past the step budget: " + " ".join(f"item {i}," for i in range(120))
SHARED_PREFIX = "System: you are a helpful assistant. " + " ".join(f"Rule {i}: be kind." for i in range(160))


@pytest.fixture(scope="module")
def stacks(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("disaggregated-logs")
    prefill = Stack(model=str(tiny_model_dir), ports=Ports.free(), log_dir=logs / "prefill",
                    engine_args=[*ENGINE_ARGS, "--role", "prefill", "--step-delay-seconds", "0.1"])
    prefill.start_service("engine")
    main = Stack(model=str(tiny_model_dir), ports=Ports.free(), log_dir=logs / "main",
                 engine_args=[*ENGINE_ARGS, "--role", "decode"],
                 gateway_args=["--prefill-engine-address", prefill.address("engine")])
    try:
        main.start()
    except RuntimeError:
        prefill.stop()
        raise
    yield main, prefill
    main.stop()
    prefill.stop()


@pytest.fixture(scope="module")
def gateway(stacks):
    with grpc.insecure_channel(stacks[0].address("gateway")) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def transferred(stack: Stack, direction: str) -> tuple[float, float]:
    """(blocks transferred, blocks skipped) as the engine's metrics count them."""
    metrics = scrape(stack.ports.engine_metrics)
    return (metrics.get(f'splitserve_engine_kv_transfer_blocks_total{{direction="{direction}"}}', 0.0),
            metrics.get("splitserve_engine_kv_transfer_skipped_blocks_total", 0.0))


def test_greedy_through_prefill_and_decode_engines_equals_generate(stacks, gateway, tiny_model, tokenizer):
    main, prefill = stacks
    prompts = [*PROMPTS, *CHATS, LONG_PROMPT]
    assert len(prompt_ids(tokenizer, LONG_PROMPT)) > 64 * 4
    received_before, _ = transferred(main, "received")
    got = greedy_batch(gateway, prompts, MAX_TOKENS)     # 8 concurrent
    for prompt, streamed in zip(prompts, got):
        assert streamed.token_ids == reference_greedy(tiny_model, prompt_ids(tokenizer, prompt), MAX_TOKENS)
    received, _ = transferred(main, "received")
    sent, _ = transferred(prefill, "sent")
    assert received - received_before >= len(prompts) and sent >= received   # every prompt's KV came over
    phases = scrape(main.ports.gateway_metrics)
    assert phases['splitserve_request_phase_seconds_count{phase="kv_transfer"}'] >= len(prompts)


def test_a_shared_prefix_transfers_only_the_new_blocks(stacks, gateway, tiny_model, tokenizer):
    main, _ = stacks
    first, second = SHARED_PREFIX + " Question: what is 2 + 2?", SHARED_PREFIX + " Question: name a colour."
    first_ids, second_ids = prompt_ids(tokenizer, first), prompt_ids(tokenizer, second)
    shared = next(i for i, (a, b) in enumerate(zip(first_ids, second_ids)) if a != b)
    assert shared >= 1000
    stream(gateway, make_request(first, max_tokens=2, temperature=0.0))
    received_before, skipped_before = transferred(main, "received")
    got = stream(gateway, make_request(second, max_tokens=MAX_TOKENS, temperature=0.0, logprobs=2))
    received, skipped = transferred(main, "received")
    held = min(shared // 16, (len(second_ids) - 1) // 16)     # full blocks of the shared prefix (block size 16)
    assert skipped - skipped_before == held
    assert received - received_before == -(-len(second_ids) // 16) - held
    assert got.token_ids == reference_greedy(tiny_model, second_ids, MAX_TOKENS)
    logprobs = [lp for chunk in got.chunks for lp in chunk.logprobs]   # the first one computed by the prefill engine
    assert [lp.token_id for lp in logprobs] == got.token_ids and all(len(lp.top) == 2 for lp in logprobs)


def test_engines_with_other_layouts_or_roles_are_refused(stacks, tokenizer):
    main, prefill = stacks
    with grpc.insecure_channel(prefill.address("engine")) as to_prefill, \
            grpc.insecure_channel(main.address("engine")) as to_decode:
        prefill_engine, decode_engine = engine_pb2_grpc.EngineStub(to_prefill), engine_pb2_grpc.EngineStub(to_decode)
        ids = prompt_ids(tokenizer, "hello")
        layout = engine_pb2.KvLayout(model="another-model", dtype="float32", block_size=32, num_layers=2,
                                     num_kv_heads=2, head_dim=16)
        with pytest.raises(grpc.RpcError) as refused:
            list(prefill_engine.TransferKV(engine_pb2.KvTransferRequest(
                request_id="mismatch", prompt_token_ids=ids, sampling=common_pb2.SamplingParams(max_tokens=1),
                layout=layout), timeout=30))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "another-model" in refused.value.details() and "tiny" in refused.value.details()
        for call in (lambda: prefill_engine.Prefill(engine_pb2.PrefillRequest(request_id="p", prompt_token_ids=ids),
                                                    timeout=30),
                     lambda: list(decode_engine.TransferKV(engine_pb2.KvTransferRequest(request_id="d"), timeout=30))):
            with pytest.raises(grpc.RpcError) as wrong_role:
                call()
            assert wrong_role.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--role" in wrong_role.value.details()


def test_a_prefill_engine_killed_mid_transfer_fails_fast_and_leaks_no_block(stacks, gateway):
    """Runs last: it kills the prefill engine."""
    main, prefill = stacks
    received_before, _ = transferred(main, "received")
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            stream(gateway, make_request("Fault: " + " ".join(f"word{i}" for i in range(400)), max_tokens=4))
        except grpc.RpcError as exc:
            outcome["code"], outcome["details"] = exc.code(), exc.details()
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_until(lambda: transferred(main, "received")[0] > received_before, timeout=60)   # mid-transfer
    prefill.services["engine"].process.kill()
    killed = time.monotonic()
    thread.join(timeout=30)
    assert outcome["code"] == grpc.StatusCode.UNAVAILABLE, outcome
    assert "prefill engine" in str(outcome["details"])
    assert outcome["ended"] - killed < 5.0
    with grpc.insecure_channel(main.address("engine")) as channel:
        decode_engine = engine_pb2_grpc.EngineStub(channel)
        assert wait_until(lambda: decode_engine.GetStats(engine_pb2.GetStatsRequest()).kv_blocks_used == 0, 10)
