"""Decoding strategies in the engine (in-process, tiny Llama, fp32): speculative decoding (prompt lookup and the
early-exit draft), lookahead decoding and contrastive search, checked against transformers and a plain reference."""
from __future__ import annotations

import random
import time

import pytest
import torch
from scipy.stats import chisquare

from engine_service.engine import Engine
from engine_service.intake import RequestError
from engine_service.sampler import Sampler
from engine_service.sampling import SamplingParams
from engine_service.sequence import Sequence
from engine_service.decoding.contrastive import contrastive_choice
from engine_service.decoding.speculative import Speculative
from tests.helpers import reference_greedy
from tests.unit.test_engine import Collector, make_engine

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_num_batched_tokens=256, draft_layers=1)   # 2 layers: draft with one
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def twenty_prompts(tokenizer) -> list[list[int]]:
    rng = random.Random(5)
    texts = ["The capital of France is", "def add(a, b):\n    return", "1, 2, 3, 4, 5, 6, 7, 8,",
             "the cat sat on the mat. the cat sat on the", "你好，世界"]
    repetitive = [[5, 6, 7, 8] * 10, list(range(100, 140)) * 2, [9, 9, 9, 9, 9, 9]]
    randoms = [[rng.randrange(3, 49152) for _ in range(rng.randrange(4, 60))] for _ in range(12)]
    return [tokenizer(t).input_ids for t in texts] + repetitive + randoms


def run(engine: Engine, prompts: list[list[int]], **params: object) -> list[list[int]]:
    collector = Collector()
    for i, ids in enumerate(prompts):
        engine.add_request(f"s{i}", ids, SamplingParams(max_tokens=MAX_TOKENS, **params), collector.callback(f"s{i}"))
    collector.wait(len(prompts))
    return [collector.tokens[f"s{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("params", [
    {"speculative": "prompt_lookup"},
    {"speculative": "prompt_lookup", "num_speculative_tokens": 8, "prompt_lookup_max_ngram": 1},
    {"speculative": "draft", "num_speculative_tokens": 3},
    {"speculative": "lookahead"},
    {"speculative": "lookahead", "lookahead_window": 3, "lookahead_ngram": 2},
], ids=["prompt-lookup", "prompt-lookup-k8-n1", "draft", "lookahead", "lookahead-w3-n2"])
def test_speculative_greedy_equals_plain_greedy(engine, tiny_model, twenty_prompts, params):
    assert len(twenty_prompts) == 20
    drafts_before = engine.guesses_verified
    got = run(engine, twenty_prompts, **params)
    assert got == [reference_greedy(tiny_model, ids, MAX_TOKENS) for ids in twenty_prompts]
    assert engine.guesses_verified > drafts_before, "no step verified any guess: the test proves nothing"
    assert engine.stats().kv_blocks_used == 0


def reference_contrastive(model, ids: list[int], top_k: int, alpha: float, max_new_tokens: int,
                          eos: int) -> list[int]:
    """The paper's formula, written plainly: every candidate's hidden state from a full forward pass, no cache."""
    tokens = list(ids)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(torch.tensor([tokens]), output_hidden_states=True)
            context = out.hidden_states[-1][0]                               # [L, H], after the final norm
            top = out.logits[0, -1].float().softmax(dim=-1).topk(top_k)
            scores = []
            for token, prob in zip(top.indices.tolist(), top.values.tolist()):
                h = model(torch.tensor([tokens + [token]]), output_hidden_states=True).hidden_states[-1][0, -1]
                similarity = float(torch.cosine_similarity(h.unsqueeze(0), context, dim=-1).max())
                scores.append((1 - alpha) * prob - alpha * similarity)
            tokens.append(top.indices[scores.index(max(scores))].item())
            if tokens[-1] == eos:
                break
    return tokens[len(ids):]


def test_contrastive_search_equals_the_plain_reference(engine, tiny_model, twenty_prompts):
    prompts = twenty_prompts[:10]
    got = run(engine, prompts, penalty_alpha=0.6, top_k=4)
    eos = engine.model_spec.eos_token_ids[0]
    assert got == [reference_contrastive(tiny_model, ids, 4, 0.6, MAX_TOKENS, eos) for ids in prompts]
    assert got != [reference_greedy(tiny_model, ids, MAX_TOKENS) for ids in prompts]   # it is not greedy
    assert engine.stats().kv_blocks_used == 0


def test_guesses_past_the_scratch_slots_wait_a_step_and_change_nothing(engine, twenty_prompts, caplog):
    """Twelve contrastive requests of 64 candidates need 768 scratch slots a step, more than the cache has: the
    scheduler lets those that fit run and the others wait (no step fails); each gets the tokens it gets alone."""
    prompts = twenty_prompts[:12]
    assert len(prompts) * 64 > engine.scheduler.scratch_slots
    params = {"penalty_alpha": 0.6, "top_k": 64}
    together = run(engine, prompts, **params)
    assert together == [run(engine, [ids], **params)[0] for ids in prompts]
    assert all(len(tokens) == MAX_TOKENS or tokens[-1] in engine.model_spec.eos_token_ids for tokens in together)
    assert engine.stats().kv_blocks_used == 0
    assert "engine step failed" not in caplog.text


def test_contrastive_choice_trades_probability_for_novelty():
    context = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[1.0, 0.0], [1.0, -1.0]])     # the first repeats the context
    probs = torch.tensor([0.6, 0.4])
    assert contrastive_choice(probs, candidates, context, alpha=0.0) == 0
    assert contrastive_choice(probs, candidates, context, alpha=0.6) == 1


def test_a_draft_request_without_a_draft_model_is_refused(tiny_model_dir):
    engine = make_engine(tiny_model_dir, kv_blocks=64)
    try:
        with pytest.raises(RequestError, match="draft"):
            engine.add_request("d", [1, 2, 3], SamplingParams(speculative="draft"), lambda *a: None)
    finally:
        engine.stop()


@pytest.mark.parametrize("with_draft_model", [False, True], ids=["prompt-lookup-guess", "draft-model-guess"])
def test_speculative_sampling_keeps_the_target_distribution(with_draft_model):
    """Leviathan et al.'s rule: whatever the guess, the first emitted token follows p (chi-squared, 20,000 draws)."""
    vocab = 6
    p = torch.tensor([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])
    q = torch.tensor([0.4, 0.1, 0.1, 0.1, 0.2, 0.1])
    logits = torch.stack([p.log(), p.roll(1).log()])          # row 0 verifies the guess; row 1 gives the bonus
    sampler = Sampler(torch.device("cpu"))
    seq = Sequence("s", [1], SamplingParams(temperature=1.0, seed=11), lambda *a: None)
    strategy = Speculative("draft" if with_draft_model else "prompt_lookup", 1, 0, 100)
    counts = [0] * vocab
    for _ in range(20_000):
        guess = int(torch.multinomial(q, 1)) if with_draft_model else 0
        strategy.draft_probs = q.unsqueeze(0) if with_draft_model else None
        tokens = strategy.accept_sampled(seq, [guess], logits.softmax(dim=-1), sampler)
        counts[tokens[0]] += 1
    assert chisquare(counts, (p * 20_000).tolist()).pvalue > 1e-3


@pytest.mark.parametrize("num_beams,options", [(2, {}), (4, {}), (4, {"length_penalty": 0.5, "early_stopping": True}),
                                               (3, {"length_penalty": 2.0}), (2, {"repetition_penalty": 1.3})])
def test_beam_search_equals_generate(engine, tiny_model, twenty_prompts, num_beams, options):
    """Beams of all the prompts share the batch; each equals generate(num_beams=k, do_sample=False)."""
    prompts = twenty_prompts[:8]
    got = run(engine, prompts, num_beams=num_beams, **options)
    assert got == [reference_greedy(tiny_model, ids, MAX_TOKENS, num_beams=num_beams, **options) for ids in prompts]
    assert got != [reference_greedy(tiny_model, ids, MAX_TOKENS) for ids in prompts]   # it is not greedy
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("params", [{"speculative": "prompt_lookup"}, {"speculative": "lookahead"},
                                    {"penalty_alpha": 0.6, "top_k": 4}], ids=["prompt-lookup", "lookahead",
                                                                              "contrastive"])
def test_strategies_stream_one_logprob_per_token(engine, twenty_prompts, params):
    got: list = []
    reasons: list = []

    def on_output(output):
        got.append((output.token_ids, output.logprobs))
        if output.finish_reason:
            reasons.append(output.finish_reason)

    engine.add_request("lp", twenty_prompts[5], SamplingParams(max_tokens=MAX_TOKENS, logprobs=3, **params), on_output)
    start = time.monotonic()
    while not reasons and time.monotonic() - start < 120:
        time.sleep(0.05)
    assert reasons == ["length"]
    for token_ids, logprobs in got:
        assert [lp.token_id for lp in logprobs] == token_ids
        for lp in logprobs:
            assert lp.logprob <= 0 and len(lp.top) == 3
            if "penalty_alpha" not in params:   # greedy guesses: the chosen token is the most likely one
                assert lp.top[0][0] == lp.token_id
