"""Sliding-window models through the engine in process: each layer's window (Mistral's, Qwen2's
`use_sliding_window`, Gemma2's alternating local and global layers) is applied by the paged attention in prefill,
chunked prefill with a cached context, decode and speculative rows, so greedy output equals `generate` on prompts
several windows long."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from engine_service.engine import Engine
from engine_service.model_runner import ModelRunner
from tests.helpers import reference_greedy
from tests.unit.test_engine import run_all

WINDOW = 8
MAX_TOKENS = 24
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.3,
              bos_token_id=1, eos_token_id=2, sliding_window=WINDOW)
BUILDERS = {
    "mistral": lambda vocab: MistralForCausalLM(MistralConfig(vocab_size=vocab, **COMMON)),
    # max_window_layers=1: layer 0 attends everything, layer 1 its window.
    "qwen2": lambda vocab: Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, use_sliding_window=True,
                                                        max_window_layers=1, **COMMON)),
    # Gemma2 alternates: layer 0 local (the window), layer 1 global; its attention scores are soft-capped.
    "gemma2": lambda vocab: Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, head_dim=16, query_pre_attn_scalar=16,
                                                           **COMMON)),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def windowed_model(request, tmp_path_factory, tokenizer) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    torch.manual_seed(3)
    BUILDERS[request.param](len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def long_prompts(tokenizer) -> list[list[int]]:
    rng = random.Random(7)
    texts = ["Once upon a time, in a land far away, there lived a king who had three daughters.",
             "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)"]
    return [tokenizer(t).input_ids for t in texts] + [[rng.randrange(3, 49152) for _ in range(n)] for n in (40, 75)]


def _engine(folder: Path, fast_path: bool = True) -> Engine:
    # A 16-token step budget: longer prompts are prefilled in chunks that attend a cached context.
    runner = ModelRunner(str(folder), "tiny-windowed", torch.device("cpu"), torch.float32, kv_cache_bytes=1 << 24,
                         block_size=16, max_model_len=0, fast_path=fast_path)
    assert runner.fast is None, "the fast path does not apply windows: it must not be taken"
    engine = Engine(runner, max_num_seqs=8, max_num_batched_tokens=16, max_waiting=16)
    engine.start()
    return engine


def test_windowed_models_equal_generate_past_the_window(windowed_model, long_prompts):
    folder, model = windowed_model
    assert min(len(p) for p in long_prompts) > 2 * WINDOW
    engine = _engine(folder)
    try:
        got = run_all(engine, long_prompts, MAX_TOKENS)
    finally:
        engine.stop()
    assert got == {f"r{i}": reference_greedy(model, ids, MAX_TOKENS) for i, ids in enumerate(long_prompts)}


@pytest.mark.parametrize("speculative", ["prompt_lookup", "lookahead"])
def test_windowed_speculative_rows_equal_plain_greedy(windowed_model, long_prompts, speculative):
    """Guessed rows (an in-place chain, a lookahead tree in scratch slots) see the same window as a decode."""
    from engine_service.sampling import SamplingParams
    from tests.unit.test_engine import Collector
    folder, model = windowed_model
    engine = _engine(folder)
    collector = Collector()
    try:
        for i, ids in enumerate(long_prompts):
            engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=MAX_TOKENS, speculative=speculative),
                               collector.callback(f"r{i}"))
        collector.wait(len(long_prompts))
    finally:
        engine.stop()
    assert [collector.tokens[f"r{i}"] for i in range(len(long_prompts))] == [
        reference_greedy(model, ids, MAX_TOKENS) for ids in long_prompts]


def test_the_window_changes_the_answer(tmp_path, tokenizer, long_prompts):
    """Without its window the same Mistral answers otherwise: the tests above would see a missing window."""
    torch.manual_seed(3)
    model = BUILDERS["mistral"](len(tokenizer)).eval()
    windowed = [reference_greedy(model, ids, MAX_TOKENS) for ids in long_prompts]
    model.config.sliding_window = None
    assert windowed != [reference_greedy(model, ids, MAX_TOKENS) for ids in long_prompts]
