"""The sampler's logits processors against transformers' own, one row and mixed batches; its seeded draws against
the processed softmax and against the rest of the batch; logprobs; the speculative-decoding hooks."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

from engine_service.sampler import (
    Sampler, apply_logit_bias, apply_min_p, apply_presence_frequency, apply_repetition_penalty, apply_temperature,
    apply_top_k, apply_top_p, row_argmax, two_stage_argmax,
)
from engine_service.sampling import SamplingParams
from engine_service.sequence import Sequence

VOCAB = 500
CPU = torch.device("cpu")


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 3


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(1)) * 3


def same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal within float tolerance, with -inf (filtered) at the same places."""
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(ours)
    torch.testing.assert_close(ours[finite], theirs[finite])


def seq(params: SamplingParams, request_id: str = "s", prompt: list[int] | None = None,
        output: list[int] | None = None) -> Sequence:
    return Sequence(request_id=request_id, prompt_ids=list(prompt or [1, 2, 3]), params=params,
                    on_output=lambda output: None, output_ids=list(output or []))


def hf_row(row: torch.Tensor, processor) -> torch.Tensor:
    return processor(None, row.clone().unsqueeze(0))[0]


# -- each processor against transformers': one row, and a mixed batch row by row ------------------------------

SEEN = [3, 7, 7, 100, 499]


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(logits, penalty):
    ours = apply_repetition_penalty(logits.unsqueeze(0), [SEEN], [penalty])[0]
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([SEEN]), logits.clone().unsqueeze(0))[0]
    same(ours, theirs)


def test_repetition_penalty_on_a_mixed_batch(batch):
    penalties = [1.0, 0.5, 1.3, 2.0, 1.0, 1.1, 3.0, 0.9]
    seen = [list(range(r, 60 * r + 1, r + 1)) for r in range(8)]
    ours = apply_repetition_penalty(batch, seen, penalties)
    for r, penalty in enumerate(penalties):
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seen[r]]), batch[r:r + 1].clone())[0]
        same(ours[r], theirs)
    assert torch.equal(ours[0], batch[0]) and torch.equal(ours[4], batch[4])


def test_repetition_penalty_ignores_ids_beyond_the_vocab(logits):
    ours = apply_repetition_penalty(logits.unsqueeze(0), [[5, VOCAB, VOCAB + 7]], [2.0])[0]
    theirs = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[5, VOCAB, VOCAB + 7]]), logits.clone().unsqueeze(0))
    same(ours, theirs[0])


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_matches_transformers(logits, temperature):
    same(apply_temperature(logits.unsqueeze(0), [temperature])[0],
         hf_row(logits, TemperatureLogitsWarper(temperature)))


@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_top_k_matches_transformers(logits, top_k):
    same(apply_top_k(logits.unsqueeze(0), [top_k])[0], hf_row(logits, TopKLogitsWarper(top_k)))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(logits, top_p):
    same(apply_top_p(logits.unsqueeze(0), [top_p])[0], hf_row(logits, TopPLogitsWarper(top_p)))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(logits, min_p):
    same(apply_min_p(logits.unsqueeze(0), [min_p])[0], hf_row(logits, MinPLogitsWarper(min_p)))


def test_warpers_on_a_mixed_batch_match_transformers_row_by_row(batch):
    """Each row has its own parameter; off rows (0 / 1.0 / k >= vocab) come back bit for bit."""
    cases = [
        (apply_temperature, [1.0, 0.3, 0.7, 1.0, 2.0, 0.5, 1.0, 1.3], TemperatureLogitsWarper, lambda t: t == 1.0),
        (apply_top_k, [0, 1, 5, 50, VOCAB, 499, 0, 3], TopKLogitsWarper, lambda k: not 0 < k < VOCAB),
        (apply_top_p, [1.0, 0.05, 0.5, 0.9, 1.0, 0.999, 0.3, 1.0], TopPLogitsWarper, lambda p: p == 1.0),
        (apply_min_p, [0.0, 0.01, 0.1, 0.5, 0.0, 1.0, 0.05, 0.0], MinPLogitsWarper, lambda p: p == 0.0),
    ]
    for apply, values, warper, off in cases:
        ours = apply(batch, values)
        for r, value in enumerate(values):
            if off(value):
                assert torch.equal(ours[r], batch[r]), (apply.__name__, value)
            else:
                same(ours[r], hf_row(batch[r], warper(value)))


def test_top_p_off_keeps_tokens_whose_probability_underflows():
    row = torch.tensor([[100.0, 0.0, -200.0]])     # softmax of the last is 0 in float32
    assert torch.equal(apply_top_p(row, [1.0]), row)


def test_logit_bias_matches_transformers_sequence_bias(batch):
    biases = [((3, 5.0), (10, -100.0)), (), ((VOCAB - 1, 2.5),), ((0, -1.0), (1, 1.0), (2, 0.5)),
              (), ((42, float("-inf")),), (), ((7, 0.25),)]
    ours = apply_logit_bias(batch, list(biases))
    for r, pairs in enumerate(biases):
        if not pairs:
            assert torch.equal(ours[r], batch[r])
            continue
        processor = SequenceBiasLogitsProcessor([[[token], value] for token, value in pairs])
        theirs = processor(torch.tensor([[1, 2, 3]]), batch[r:r + 1].clone())[0]
        same(ours[r], theirs)


def test_logit_bias_ignores_ids_beyond_the_vocab(logits):
    ours = apply_logit_bias(logits.unsqueeze(0), [((VOCAB, 9.0), (VOCAB + 100, 9.0), (4, 1.0))])[0]
    expected = logits.clone()
    expected[4] += 1.0
    assert torch.equal(ours, expected)


def test_presence_and_frequency_penalties_follow_openai(batch):
    outputs = [[4, 4, 4, 9], [], [1, 2, 2], [4, 4, 4, 9], [VOCAB + 3], [0] * 10, [7], [8, 9]]
    presence = [0.5, 1.0, 0.0, 0.0, 1.0, -0.5, 2.0, 0.0]
    frequency = [0.25, 1.0, 0.3, 0.0, 1.0, 0.1, 0.0, 0.0]
    ours = apply_presence_frequency(batch, outputs, presence, frequency)
    for r in range(8):
        expected = batch[r].clone()
        for token in set(outputs[r]):
            if token < VOCAB:
                expected[token] -= presence[r] + frequency[r] * outputs[r].count(token)
        torch.testing.assert_close(ours[r], expected)
    assert torch.equal(ours[3], batch[3]) and torch.equal(ours[7], batch[7])


# -- the composed chain, per row of a mixed batch ---------------------------------------------------------------

MIXED = [
    SamplingParams(),                                                       # plain greedy
    SamplingParams(repetition_penalty=1.3, logit_bias=((5, 3.0),)),         # greedy with penalty and bias
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=1),
    SamplingParams(temperature=1.0),                                        # plain sampling
    SamplingParams(temperature=0.5, top_p=0.7, presence_penalty=0.5, frequency_penalty=0.2),
    SamplingParams(temperature=1.2, top_k=5, repetition_penalty=0.8, seed=2),
    SamplingParams(presence_penalty=1.0, frequency_penalty=0.5),            # greedy with OpenAI penalties
    SamplingParams(temperature=0.7, min_p=0.2, logit_bias=((9, -50.0), (11, 4.0)), seed=3),
]


def mixed_seqs() -> list[Sequence]:
    return [seq(p, f"r{r}", prompt=[r, 2 * r + 1, 40 + r], output=[r + 1, r + 1, 3 * r + 5])
            for r, p in enumerate(MIXED)]


def hf_chain(row: torch.Tensor, s: Sequence, extra: list[int] = ()) -> torch.Tensor:
    """transformers' processors for one row alone; presence/frequency by their formula."""
    p, x = s.params, row.clone().unsqueeze(0)
    if p.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(
            torch.tensor([s.prompt_ids + s.output_ids + list(extra)]), x)
    generated = s.output_ids + list(extra)
    for token in set(generated):
        x[0, token] -= p.presence_penalty + p.frequency_penalty * generated.count(token)
    if p.logit_bias:
        x = SequenceBiasLogitsProcessor([[[t], b] for t, b in p.logit_bias])(torch.tensor([[0]]), x)
    if not p.greedy:
        warpers = LogitsProcessorList(
            ([TemperatureLogitsWarper(p.temperature)] if p.temperature != 1.0 else [])
            + ([TopKLogitsWarper(p.top_k)] if p.top_k else [])
            + ([TopPLogitsWarper(p.top_p)] if p.top_p < 1.0 else [])
            + ([MinPLogitsWarper(p.min_p)] if p.min_p else []))
        x = warpers(None, x)
    return x[0]


def test_process_matches_transformers_row_by_row_on_a_mixed_batch(batch):
    seqs = mixed_seqs()
    before = batch.clone()
    ours = Sampler(CPU).process(batch, seqs)
    assert torch.equal(batch, before), "process must not modify the caller's logits"
    for r, s in enumerate(seqs):
        same(ours[r], hf_chain(batch[r], s))
    assert torch.equal(ours[0], batch[0])


def test_greedy_rows_take_the_argmax_of_the_penalised_logits(batch):
    seqs = mixed_seqs()
    processed = Sampler(CPU).process(batch, seqs)
    tokens = Sampler(CPU)(batch, seqs).tokens
    for r in (0, 1, 6):
        assert tokens[r] == int(hf_chain(batch[r], seqs[r]).argmax())
    for r in (2, 3, 4, 5, 7):
        assert not torch.isinf(processed[r, tokens[r]]), "a sampled row drew a filtered token"


def test_a_plain_greedy_batch_is_one_argmax():
    """No processor runs: process hands back the caller's float32 tensor itself (no copy)."""
    logits = torch.randn(64, VOCAB)
    seqs = [seq(SamplingParams(), f"g{i}") for i in range(64)]
    sampler = Sampler(CPU)
    assert sampler.process(logits, seqs) is logits
    assert sampler(logits, seqs).tokens == logits.argmax(dim=-1).tolist()


def test_bfloat16_logits_are_processed_in_float32(batch):
    seqs = mixed_seqs()
    ours = Sampler(CPU).process(batch.bfloat16(), seqs)
    assert ours.dtype == torch.float32
    same(ours[2], hf_chain(batch[2].bfloat16().float(), seqs[2]))


def test_tiny_temperatures_are_greedy(logits):
    sampler = Sampler(CPU)
    assert sampler(logits.unsqueeze(0), [seq(SamplingParams(temperature=1e-40))]).tokens == [int(logits.argmax())]


# -- seeded draws ----------------------------------------------------------------------------------------------

def test_sampling_follows_the_processed_distribution():
    """20,000 seeded draws from fixed logits pass a chi-squared test against transformers' processed softmax."""
    from scipy.stats import chisquare

    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -4.0])
    params = SamplingParams(temperature=0.8, top_k=8, top_p=0.97, min_p=0.05, seed=123)
    reference = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(8), TopPLogitsWarper(0.97),
                                     MinPLogitsWarper(0.05)])(None, logits.clone().unsqueeze(0))[0]
    probs = reference.softmax(-1)
    assert 3 < int((probs > 0).sum()) < len(logits), "every filter should bite and leave a few tokens"
    # One sequence on 1,000 rows, 20 steps: its rows draw in turn from its generator.
    sampler, s = Sampler(CPU), seq(params)
    rows = logits.expand(1_000, -1)
    counts = torch.zeros(len(logits))
    for _ in range(20):
        counts += torch.bincount(torch.tensor(sampler(rows, [s] * 1_000).tokens), minlength=len(logits))
    support = probs > 0
    assert counts[~support].sum() == 0
    assert chisquare(counts[support].numpy(), (probs[support] * 20_000).numpy()).pvalue > 0.001


def test_a_seed_gives_the_same_tokens_alone_and_in_a_mixed_batch(batch):
    """Five consecutive steps: row 2 of the mixed batch (seed 1) against the same request alone."""
    sampler_alone, sampler_batch = Sampler(CPU), Sampler(CPU)
    alone = mixed_seqs()[2]
    seqs = mixed_seqs()
    noise = torch.Generator().manual_seed(5)
    for _ in range(5):
        step = batch + torch.randn(batch.shape, generator=noise)
        in_batch = sampler_batch(step, seqs).tokens
        by_itself = sampler_alone(step[2:3], [alone]).tokens
        assert in_batch[2] == by_itself[0]
        for s, token in zip(seqs, in_batch):
            s.output_ids.append(token)
        alone.output_ids.append(by_itself[0])
    assert alone.output_ids == seqs[2].output_ids


def test_unseeded_rows_vary_and_seeded_rows_repeat(logits):
    flat = torch.zeros(1, VOCAB)
    unseeded = {Sampler(CPU)(flat, [seq(SamplingParams(temperature=1.0))]).tokens[0] for _ in range(10)}
    seeded = {Sampler(CPU)(flat, [seq(SamplingParams(temperature=1.0, seed=9))]).tokens[0] for _ in range(10)}
    assert len(unseeded) > 1 and len(seeded) == 1


# -- logprobs ----------------------------------------------------------------------------------------------------

def test_logprobs_are_under_the_raw_distribution_most_likely_first(batch):
    params = [SamplingParams(logprobs=0), SamplingParams(temperature=0.7, top_k=5, logprobs=3, seed=4),
              SamplingParams(), SamplingParams(repetition_penalty=2.0, logprobs=20),
              SamplingParams(temperature=1.0, logprobs=1)]
    seqs = [seq(p, f"l{i}") for i, p in enumerate(params)]
    logits = batch[:5]
    out = Sampler(CPU)(logits, seqs)
    raw = logits.log_softmax(dim=-1)
    assert out.logprobs[2] is None
    for r, p in enumerate(params):
        if p.logprobs is None:
            continue
        lp = out.logprobs[r]
        assert lp.token_id == out.tokens[r]
        assert lp.logprob == pytest.approx(raw[r, out.tokens[r]].item(), abs=1e-5)
        assert len(lp.top) == p.logprobs
        if p.logprobs:
            expected = raw[r].topk(p.logprobs)
            assert [t for t, _ in lp.top] == expected.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(expected.values.tolist(), abs=1e-5)
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


# -- speculative-decoding hooks -----------------------------------------------------------------------------------

def test_process_counts_extra_ids_per_row_of_a_repeated_sequence(logits):
    s = seq(SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5), prompt=[1], output=[2])
    rows = torch.stack([logits, logits, logits])
    out = Sampler(CPU).process(rows, [s, s, s], extra_ids=[[], [7], [7, 7]])
    for r, extra in enumerate([[], [7], [7, 7]]):
        same(out[r], hf_chain(logits, s, extra))
    assert out[0, 7] == logits[7] and out[1, 7] != logits[7] and out[2, 7] != out[1, 7]


def test_draw_follows_each_sequences_seed():
    probs = torch.softmax(torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(3)), dim=-1)
    a, b = seq(SamplingParams(temperature=1.0, seed=11), "a"), seq(SamplingParams(temperature=1.0, seed=11), "b")
    # a's two rows draw in turn from a's generator: the same as b drawing twice alone.
    in_batch = Sampler(CPU).draw(probs, [a, seq(SamplingParams(temperature=1.0)), a, seq(SamplingParams())])
    sampler = Sampler(CPU)
    assert [in_batch[0], in_batch[2]] == [sampler.draw(probs[0:1], [b])[0], sampler.draw(probs[2:3], [b])[0]]
    one_hot = torch.zeros(2, VOCAB)
    one_hot[0, 17], one_hot[1, 400] = 1.0, 1.0
    assert Sampler(CPU).draw(one_hot, [a, seq(SamplingParams(temperature=1.0))]) == [17, 400]


def test_uniform_follows_the_seed():
    a, b = seq(SamplingParams(temperature=1.0, seed=5), "a"), seq(SamplingParams(temperature=1.0, seed=5), "b")
    sampler = Sampler(CPU)
    draws = [sampler.uniform(a) for _ in range(3)]
    assert draws == [sampler.uniform(b) for _ in range(3)]
    assert all(0.0 <= u < 1.0 for u in draws) and len(set(draws)) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_processing_and_keeps_seeds_batch_independent(batch):
    cuda = torch.device("cuda")
    seqs = mixed_seqs()
    same(Sampler(cuda).process(batch.to(cuda), seqs).cpu(), Sampler(CPU).process(batch, seqs))
    in_batch = Sampler(cuda)(batch.to(cuda), mixed_seqs()).tokens
    assert in_batch[2] == Sampler(cuda)(batch[2:3].to(cuda), [mixed_seqs()[2]]).tokens[0]


@pytest.mark.parametrize("rows,vocab,chunks", [(1, 128256, 256), (3, 49152, 256), (5, 1000, 7), (2, 4096, 64)])
def test_two_stage_argmax_is_torchs_argmax(rows, vocab, chunks):
    """row_argmax's GPU form (chunks reduced first) and its CPU form (numpy's) pick what argmax picks: the first of
    tied largest values, a NaN over any number, index 0 for a row of -inf; vocabularies that do not divide into the
    chunks."""
    generator = torch.Generator().manual_seed(rows + vocab)
    x = torch.randn(rows, vocab, generator=generator)
    x[0, 5] = x[0].max() + 1
    x[0, vocab - 1] = x[0, 5]
    if rows > 1:
        x[1] = float("-inf")
    if rows > 2:
        x[2, 17] = x[2, 900] = float("nan")
    assert torch.equal(two_stage_argmax(x, chunks), x.argmax(dim=-1))
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))          # the CPU's (numpy's) too
    assert torch.equal(row_argmax(x[:, : vocab // 2]), x[:, : vocab // 2].argmax(dim=-1))   # a strided view
