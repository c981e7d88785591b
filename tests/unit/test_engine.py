"""The engine in-process (no gRPC) on the tiny Llama: chunked prefill, preemption and aborts keep greedy output
identical to transformers and leave no KV block behind."""
from __future__ import annotations

import random
import threading

import pytest
import torch

from engine_service.engine import Engine, EngineFullError
from engine_service.intake import RequestError
from engine_service.model_runner import ModelRunner
from engine_service.sampling import SamplingParams
from engine_service.sequence import SequenceOutput
from tests.helpers import reference_greedy

BLOCK_BYTES = 16 * 2 * 2 * 2 * 16 * 4   # tokens * (k, v) * layers * kv_heads * head_dim * fp32


class Collector:
    """Gathers each request's tokens and finish reason from the step loop's callbacks."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.reasons: dict[str, str] = {}
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)

    def callback(self, request_id: str):
        self.tokens[request_id] = []

        def on_output(output: SequenceOutput) -> None:
            with self.lock:
                self.tokens[request_id].extend(output.token_ids)
                if output.finish_reason:
                    self.reasons[request_id] = output.finish_reason
                self.done.notify_all()   # every output: waits on token counts too
        return on_output

    def wait(self, count: int, timeout: float = 120) -> None:
        with self.lock:
            assert self.done.wait_for(lambda: len(self.reasons) >= count, timeout), self.reasons

    def wait_tokens(self, request_id: str, count: int, timeout: float = 120) -> None:
        """Until request_id has streamed `count` tokens (or ended)."""
        with self.lock:
            assert self.done.wait_for(lambda: len(self.tokens[request_id]) >= count or request_id in self.reasons,
                                      timeout), f"{request_id}: fewer than {count} tokens"


def make_engine(model_dir, kv_blocks: int = 4096, max_num_batched_tokens: int = 2048, max_num_seqs: int = 64,
                max_waiting: int = 1000, fast_path: bool = True, prefix_caching: bool = True,
                draft_layers: int = 0) -> Engine:
    runner = ModelRunner(str(model_dir), "tiny", torch.device("cpu"), torch.float32,
                         kv_cache_bytes=kv_blocks * BLOCK_BYTES, block_size=16, max_model_len=0,
                         fast_path=fast_path, prefix_caching=prefix_caching)
    assert (runner.fast is not None) == fast_path
    assert runner.blocks.num_blocks == kv_blocks
    engine = Engine(runner, max_num_seqs, max_num_batched_tokens, max_waiting, draft_layers)
    engine.start()
    return engine


@pytest.fixture
def prompts(tokenizer) -> list[list[int]]:
    rng = random.Random(0)
    texts = ["The capital of France is", "def add(a, b):", "你好，世界", "Once upon a time " * 12]
    return [tokenizer(t).input_ids for t in texts] + [[rng.randrange(3, 49152) for _ in range(n)] for n in (70, 33)]


def run_all(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict[str, list[int]]:
    collector = Collector()
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=max_tokens), collector.callback(f"r{i}"))
    collector.wait(len(prompts))
    return {rid: collector.tokens[rid] for rid in sorted(collector.tokens)}


def expected(tiny_model, prompts: list[list[int]], max_tokens: int) -> dict[str, list[int]]:
    return {f"r{i}": reference_greedy(tiny_model, ids, max_tokens) for i, ids in enumerate(prompts)}


@pytest.mark.parametrize("fast_path", [True, False], ids=["llama-fast-path", "transformers-path"])
def test_prompts_longer_than_the_step_budget_are_prefilled_in_chunks(tiny_model_dir, tiny_model, prompts, fast_path):
    engine = make_engine(tiny_model_dir, max_num_batched_tokens=16, fast_path=fast_path)
    try:
        assert max(len(p) for p in prompts) > 16
        assert run_all(engine, prompts, 20) == expected(tiny_model, prompts, 20)
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.stop()


def test_a_full_kv_cache_preempts_and_every_request_still_completes(tiny_model_dir, tiny_model, prompts):
    # 24 blocks = 384 token slots for 6 sequences that need ~100 to ~230 each: only some fit at once.
    engine = make_engine(tiny_model_dir, kv_blocks=24)
    try:
        assert run_all(engine, prompts, 60) == expected(tiny_model, prompts, 60)
        assert engine.scheduler.num_preemptions > 0
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.stop()


def test_a_prefix_cache_hit_reuses_blocks_and_gives_the_cold_run_tokens(tiny_model_dir, tiny_model, tokenizer):
    system = tokenizer("You are a helpful assistant. " * 12).input_ids        # ~84 tokens: 5 full blocks
    prompts = [system + tokenizer(q).input_ids for q in ("What is 2+2?", "Name a colour.", "Say hi.")]
    cold = expected(tiny_model, prompts, 16)
    engine = make_engine(tiny_model_dir)
    try:
        first = run_all(engine, prompts[:1], 16)
        assert engine.scheduler.prefix_hit_tokens == 0
        cached = dict(engine.runner.blocks.cached)
        assert len(cached) >= len(system) // 16
        collector = Collector()
        seqs = [engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=16), collector.callback(f"r{i}"))
                for i, ids in enumerate(prompts[1:], start=1)]
        collector.wait(2)
        assert engine.scheduler.prefix_hit_tokens >= 2 * (len(system) // 16) * 16
        assert {**first, **collector.tokens} == cold
        assert engine.stats().kv_blocks_used == 0
        assert all(s.finish_reason for s in seqs)
    finally:
        engine.stop()


def test_without_prefix_caching_nothing_is_shared(tiny_model_dir, tiny_model, tokenizer):
    system = tokenizer("You are a helpful assistant. " * 12).input_ids
    prompts = [system + tokenizer(q).input_ids for q in ("What is 2+2?", "Name a colour.")]
    engine = make_engine(tiny_model_dir, prefix_caching=False)
    try:
        assert run_all(engine, prompts, 12) == expected(tiny_model, prompts, 12)
        assert engine.scheduler.prefix_hit_tokens == 0 and not engine.runner.blocks.cached
    finally:
        engine.stop()


def test_random_aborts_leave_no_block_in_use(tiny_model_dir):
    engine = make_engine(tiny_model_dir, kv_blocks=256, max_num_batched_tokens=64)
    rng = random.Random(1)
    collector = Collector()
    try:
        for i in range(1000):
            ids = [rng.randrange(3, 49152) for _ in range(rng.randint(1, 80))]
            engine.add_request(f"a{i}", ids, SamplingParams(max_tokens=rng.randint(1, 40), ignore_eos=True),
                               collector.callback(f"a{i}"))
            if rng.random() < 0.5:
                engine.abort(f"a{rng.randint(0, i)}")
        collector.wait(1000)
        assert set(collector.reasons.values()) <= {"abort", "length"}
        assert "abort" in collector.reasons.values()
        stats = engine.stats()
        assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)
    finally:
        engine.stop()


def test_a_request_whose_forward_pass_fails_ends_alone_and_the_batch_goes_on(tiny_model_dir, tiny_model, prompts):
    engine = make_engine(tiny_model_dir)
    poison = 48000
    engine.runner.fault_token_id = poison
    collector = Collector()
    try:
        for i, ids in enumerate(prompts):
            engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=12), collector.callback(f"r{i}"))
        engine.add_request("bad", [5, 6, poison, 7], SamplingParams(max_tokens=12), collector.callback("bad"))
        collector.wait(len(prompts) + 1)
        assert collector.reasons["bad"] == "error"
        good = {rid: tokens for rid, tokens in collector.tokens.items() if rid != "bad"}
        assert good == expected(tiny_model, prompts, 12)
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.stop()


def test_requests_the_engine_cannot_take(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_waiting=1)
    try:
        with pytest.raises(RequestError):
            engine.add_request("x", [], SamplingParams(), lambda output: None)
        with pytest.raises(RequestError):
            engine.add_request("x", [49152], SamplingParams(), lambda output: None)
        with pytest.raises(RequestError, match="context"):
            engine.add_request("x", [5] * 4096, SamplingParams(), lambda output: None)
        with pytest.raises(ValueError, match="top_p"):
            engine.add_request("x", [5], SamplingParams(top_p=0.0), lambda output: None)
        engine.stop()  # nothing drains the queue now: the bound is reached at once
        engine.add_request("y", [5], SamplingParams(), lambda output: None)
        with pytest.raises(EngineFullError):
            engine.add_request("z", [5], SamplingParams(), lambda output: None)
    finally:
        engine.stop()


def test_the_bfloat16_forward_pass_is_transformers_sdpa_bit_for_bit(tiny_model_dir, tmp_path):
    """bf16 (the GPU default), on the CPU: the fast path's logits for every position of a prompt are transformers'
    own (SDPA attention), bit for bit: the same roundings in the same places (RMSNorm and its weights, rotary, fused
    projections). The tiny model with its norm weights drawn at random (they start at one)."""
    from transformers import AutoModelForCausalLM

    from engine_service.model import attention
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    runner = ModelRunner(str(tmp_path), "tiny", torch.device("cpu"), torch.bfloat16, kv_cache_bytes=1 << 22,
                         block_size=16, max_model_len=0)
    assert runner.fast is not None
    ids = torch.randint(3, 49000, (40,), generator=torch.Generator().manual_seed(3))
    tokens = len(ids)
    attention.set_step_context(attention.StepContext(
        k_cache=runner.cache.k, v_cache=runner.cache.v, slot_mapping=torch.arange(tokens), num_decode=0,
        decode_slots=None, decode_mask=None, prefills=[attention.PrefillChunk(0, tokens, 0, None)]))
    try:
        with torch.inference_mode():
            ours = runner.fast(ids, torch.arange(tokens), torch.arange(tokens))[0]
    finally:
        attention.set_step_context(None)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa")
    with torch.inference_mode():
        expected = reference(ids.unsqueeze(0)).logits[0]
    assert ours.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(ours, expected)
