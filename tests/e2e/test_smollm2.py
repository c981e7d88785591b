"""End to end on the real SmolLM2-135M-Instruct weights: the whole stack as a user runs it."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from transformers import AutoModelForCausalLM

from common.stack import Stack
from tests.conftest import start_stack
from tests.helpers import (
    assert_equals_generate, assert_text_is_decode_of_ids, check_greedy_close, greedy_batch, make_request, prompt_ids,
    reference_greedy, stream, stream_all,
)
from tests.prompts import CHATS, PROMPTS
from splitserve.v1 import gateway_pb2_grpc

pytestmark = pytest.mark.e2e

MAX_TOKENS = 24
ALL_PROMPTS = PROMPTS + CHATS


@pytest.fixture(scope="module")
def smollm2_stack(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The default model, as `make run` serves it ("smollm2" resolves to the converted GGUF folder), in fp32
    # throughout: token-identical to transformers. The compact decode weights are checked below, in-process.
    stack = start_stack("smollm2", tmp_path_factory.mktemp("smollm2-logs"), ["--compact-decode-weights", "false"])
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def smollm2_gateway(smollm2_stack: Stack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(smollm2_stack.address("gateway")) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


@pytest.fixture(scope="module")
def smollm2_model(smollm2_dir: Path):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()


@pytest.fixture(scope="module")
def greedy_results(smollm2_gateway):
    return greedy_batch(smollm2_gateway, ALL_PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("index", range(len(ALL_PROMPTS)))
def test_greedy_tokens_equal_transformers_generate(greedy_results, smollm2_model, tokenizer, index):
    assert_equals_generate(greedy_results[index], smollm2_model, tokenizer, ALL_PROMPTS[index], MAX_TOKENS)


@pytest.mark.parametrize("index", range(len(ALL_PROMPTS)))
def test_streamed_text_is_the_decode_of_the_streamed_ids(greedy_results, tokenizer, index):
    assert_text_is_decode_of_ids(greedy_results[index], tokenizer)


def test_chat_answer_names_paris(smollm2_gateway):
    got = stream(smollm2_gateway, make_request([("user", "What is the capital of France?")], max_tokens=48))
    assert "Paris" in got.text
    assert got.last.finish_reason in ("stop", "length")


def test_text_arrives_token_by_token(smollm2_gateway):
    """With a real model a decode step takes far longer than a hop over loopback: many chunks, not one."""
    call = smollm2_gateway.Generate(make_request("Write a long story about a dragon.", max_tokens=32,
                                                 ignore_eos=True), timeout=120)
    arrivals = []
    for chunk in call:
        arrivals.append((time.perf_counter(), chunk))
    assert sum(len(c.token_ids) for _, c in arrivals) == 32
    assert len(arrivals) >= 8


@pytest.mark.slow
def test_compact_small_steps_match_fp32_generate_up_to_near_ties(smollm2_dir, smollm2_model, tokenizer):
    """The default CPU configuration runs decode steps of up to 64 sequences in one kernel call, reading the
    GGUF's own Q4_1/Q8_0 blocks (the model's exact weights) with fp32 activations and accumulation. 8 requests
    at once, then 4 alone: outputs may leave transformers' (fp32) only at a near-tie (another summation order)."""
    import threading

    import torch

    from engine_service.engine import Engine
    from engine_service.model_runner import ModelRunner
    from engine_service.sampling import SamplingParams

    runner = ModelRunner(str(smollm2_dir), "smollm2", torch.device("cpu"), torch.float32, kv_cache_bytes=1 << 28,
                         block_size=16, max_model_len=0, compact_decode_weights=True)
    fast = runner.fast
    assert fast.decode_kernels is not None and fast.layers[0].qkv.bf16 is None   # the blocks replace it
    assert fast.lm_head.blocks is not None and all(w.gate_up.blocks is not None for w in fast.layers)
    engine = Engine(runner, max_num_seqs=8, max_num_batched_tokens=2048, max_waiting=64)
    engine.start()
    try:
        prompts = [prompt_ids(tokenizer, prompt) for prompt in ALL_PROMPTS[:12]]
        done = threading.Semaphore(0)
        outputs: list[list[int]] = [[] for _ in prompts]

        def collect(index: int):
            def on_output(output):
                outputs[index].extend(output.token_ids)
                if output.finish_reason:
                    done.release()
            return on_output

        for index, ids in enumerate(prompts[:8]):
            engine.add_request(f"together-{index}", ids, SamplingParams(max_tokens=MAX_TOKENS), collect(index))
        for _ in range(8):
            assert done.acquire(timeout=300)
        for index in range(8, 12):
            engine.add_request(f"alone-{index}", prompts[index], SamplingParams(max_tokens=MAX_TOKENS),
                               collect(index))
            assert done.acquire(timeout=300)
        for ids, tokens in zip(prompts, outputs):
            check_greedy_close(smollm2_model, ids, tokens, reference_greedy(smollm2_model, ids, MAX_TOKENS),
                               tolerance=0.5)
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def greedy_references(smollm2_model, tokenizer) -> list[list[int]]:
    return [reference_greedy(smollm2_model, prompt_ids(tokenizer, p), MAX_TOKENS) for p in ALL_PROMPTS[:20]]


@pytest.mark.parametrize("mode", ["prompt_lookup", "draft", "lookahead"])
def test_speculative_greedy_equals_plain_greedy(smollm2_gateway, greedy_references, mode):
    """Through the public API, 20 prompts, 8 at a time: every speculative mode gives plain greedy's tokens."""
    requests = [make_request(p, max_tokens=MAX_TOKENS, temperature=0.0, speculative=mode) for p in ALL_PROMPTS[:20]]
    got = stream_all(smollm2_gateway, requests, concurrency=8)
    assert [g.token_ids for g in got] == greedy_references


@pytest.mark.slow
@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_equals_generate(smollm2_gateway, smollm2_model, tokenizer, num_beams):
    prompts = [p for p in ALL_PROMPTS if not isinstance(p, str)][:3] + [p for p in ALL_PROMPTS if isinstance(p, str)][:3]
    requests = [make_request(p, max_tokens=MAX_TOKENS, num_beams=num_beams) for p in prompts]
    got = stream_all(smollm2_gateway, requests, concurrency=6)
    for result, prompt in zip(got, prompts):
        ids = prompt_ids(tokenizer, prompt)
        assert result.token_ids == reference_greedy(smollm2_model, ids, MAX_TOKENS, num_beams=num_beams)


def test_greedy_through_a_prefill_engine_equals_generate(smollm2_stack, greedy_results, tmp_path):
    """Disaggregated serving on the real weights: a prefill engine (fp32, as the stack's) computes every prompt and
    sends its KV cache to the stack's engine, which decodes; a second gateway sends the requests that way, 8 at a
    time. The tokens are those of the colocated run, which equal generate's (above)."""
    from common.stack import Ports
    from tests.helpers import start_extra_gateway
    from tests.integration.test_lifecycle import scrape

    prefill = Stack(model="smollm2", ports=Ports.free(), log_dir=tmp_path / "prefill",
                    engine_args=["--role", "prefill", "--compact-decode-weights", "false", "--kv-cache-gb", "0.25"])
    prefill.start_service("engine")
    extra = None
    try:
        extra = start_extra_gateway(smollm2_stack, tmp_path / "gateway",
                                    ["--prefill-engine-address", prefill.address("engine")])
        with grpc.insecure_channel(extra.address("gateway")) as channel:
            got = greedy_batch(gateway_pb2_grpc.GatewayStub(channel), ALL_PROMPTS, MAX_TOKENS)
        assert [g.token_ids for g in got] == [g.token_ids for g in greedy_results]
        sent = scrape(prefill.ports.engine_metrics)['splitserve_engine_kv_transfer_blocks_total{direction="sent"}']
        assert sent >= len(ALL_PROMPTS)      # every prompt's KV cache came from the prefill engine
    finally:
        if extra is not None:
            extra.stop()
        prefill.stop()


def test_json_schema_and_json_object_outputs_on_smollm2(smollm2_gateway):
    """SmolLM2 writes meaningful JSON under the masks: the schema greedy and sampled with three seeds, and "any
    JSON object" greedy, all at once; every output parses and validates."""
    from tests.integration.test_structured_output import assert_finished_valid, constrained
    person = [("user", "Describe a person as JSON with name, age, pet, tags and ok.")]
    capital = [("user", "What is the capital of France? Answer as a JSON object with the key \"capital\".")]
    cases = [("json_schema", person, {"temperature": 0.0})]
    cases += [("json_schema", person, {"temperature": 1.0, "seed": seed}) for seed in (1, 2, 3)]
    cases += [("json_object", capital, {"temperature": 0.0})]
    results = stream_all(smollm2_gateway, [constrained(kind, chat, max_tokens=200, **params)
                                           for kind, chat, params in cases], concurrency=len(cases))
    for (kind, _, _), got in zip(cases, results):
        assert_finished_valid(kind, got)


@pytest.mark.slow
def test_a_16_bit_kv_cache_serves_greedy_output_that_leaves_generate_only_at_near_ties(
        smollm2_model, tokenizer, tmp_path):
    """`--kv-cache-dtype float16` on the default CPU configuration: the keys and values are stored rounded to fp16
    (twice the tokens in the same memory), the one-call kernel widens them as it reads. Rounding what the model
    attends may move a greedy choice only where two tokens were nearly tied in fp32."""
    stack = start_stack("smollm2", tmp_path / "logs", ["--kv-cache-dtype", "float16", "--kv-cache-gb", "0.25"])
    try:
        with grpc.insecure_channel(stack.address("gateway")) as channel:
            results = greedy_batch(gateway_pb2_grpc.GatewayStub(channel), ALL_PROMPTS[:8], MAX_TOKENS)
        assert "kv_cache_dtype='float16'" in stack.services["engine"].log_path.read_text(errors="replace")
    finally:
        stack.stop()
    for prompt, got in zip(ALL_PROMPTS[:8], results):
        ids = prompt_ids(tokenizer, prompt)
        check_greedy_close(smollm2_model, ids, got.token_ids, reference_greedy(smollm2_model, ids, MAX_TOKENS),
                           tolerance=0.5)
