"""The sampler's logits processors against transformers' own, and its sampling against the processed softmax."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

from engine_service.sampler import (
    Sampler, apply_min_p, apply_presence_frequency, apply_repetition_penalty, apply_top_k, apply_top_p,
)
from engine_service.sampling import SamplingParams
from engine_service.sequence import Sequence

VOCAB = 500


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 3


def same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(ours)
    torch.testing.assert_close(ours[finite], theirs[finite])


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(logits, penalty):
    seen = torch.tensor([3, 7, 7, 100, 499])
    ours = logits.clone()
    apply_repetition_penalty(ours, seen.unique(), penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(seen.unsqueeze(0), logits.clone().unsqueeze(0))[0]
    same(ours, theirs)


@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_top_k_matches_transformers(logits, top_k):
    same(apply_top_k(logits, top_k), TopKLogitsWarper(top_k)(None, logits.unsqueeze(0))[0])


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(logits, top_p):
    same(apply_top_p(logits, top_p), TopPLogitsWarper(top_p)(None, logits.unsqueeze(0))[0])


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_matches_transformers(logits, min_p):
    same(apply_min_p(logits, min_p), MinPLogitsWarper(min_p)(None, logits.unsqueeze(0))[0])


def test_temperature_matches_transformers(logits):
    same(logits / 0.7, TemperatureLogitsWarper(0.7)(None, logits.unsqueeze(0))[0])


def test_presence_and_frequency_penalties_follow_openai(logits):
    ours = logits.clone()
    apply_presence_frequency(ours, [4, 4, 4, 9], presence=0.5, frequency=0.25)
    assert ours[4].item() == pytest.approx(logits[4].item() - 0.5 - 3 * 0.25)
    assert ours[9].item() == pytest.approx(logits[9].item() - 0.5 - 0.25)
    assert torch.equal(ours[10:], logits[10:])


def seq(params: SamplingParams, request_id: str = "s") -> Sequence:
    return Sequence(request_id=request_id, prompt_ids=[1, 2, 3], params=params, on_output=lambda ids, reason, logprobs: None)


def test_greedy_rows_take_the_argmax_and_sampled_rows_follow_their_seed(logits):
    sampler = Sampler(torch.device("cpu"))
    batch = torch.stack([logits, logits.flip(0)])
    greedy = seq(SamplingParams())
    tokens = sampler(batch, [greedy, seq(SamplingParams(temperature=1.0, seed=7))]).tokens
    assert tokens[0] == int(logits.argmax())
    alone = Sampler(torch.device("cpu"))(logits.flip(0).unsqueeze(0), [seq(SamplingParams(temperature=1.0, seed=7))])
    assert tokens[1] == alone.tokens[0]


def test_sampling_follows_the_processed_distribution():
    """20,000 seeded draws from fixed logits pass a chi-squared test against the softmax after top-k and top-p."""
    from scipy.stats import chisquare

    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -4.0])
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.95, seed=123)
    processed = apply_top_p(apply_top_k(logits / 0.8, 6), 0.95)
    probs = processed.softmax(-1)
    sampler = Sampler(torch.device("cpu"))
    s = seq(params)
    counts = torch.zeros(len(logits))
    for _ in range(20_000):
        counts[sampler(logits.unsqueeze(0), [s]).tokens[0]] += 1
    support = probs > 0
    assert counts[~support].sum() == 0
    result = chisquare(counts[support].numpy(), (probs[support] * 20_000).numpy())
    assert result.pvalue > 0.001


def test_tiny_temperatures_are_greedy(logits):
    sampler = Sampler(torch.device("cpu"))
    assert sampler(logits.unsqueeze(0), [seq(SamplingParams(temperature=1e-40))]).tokens == [int(logits.argmax())]
