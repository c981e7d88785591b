"""BeamSearch against transformers' own beam search: driven by the same model, it returns what `generate` returns,
token for token."""
from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Sequence

import pytest
import torch

from engine_service.decoding.beam import BeamSearch
from tests.helpers import prompt_ids
from tests.prompts import PROMPTS

EOS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The tiny model's ops are small: on a busy machine two threads spend more time waiting for each other than
    # computing (a tiny-Llama forward: 0.4 s with two threads, 0.015 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def with_eos_bias(model, eos: Sequence[int], bias: float = 10.0):
    """A copy of the model with `bias` added to the logits of the EOS ids: beams end after a few tokens, so that
    num_beams hypotheses finish before max_new_tokens and early_stopping and the "is done" heuristic decide when the
    search ends."""
    model = copy.deepcopy(model)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie from the embeddings
    biases = torch.zeros(model.config.vocab_size)
    biases[list(eos)] = bias
    model.lm_head.bias = torch.nn.Parameter(biases)
    return model


@pytest.fixture(scope="module")
def eos_prone_model(tiny_model):
    return with_eos_bias(tiny_model, [EOS])


def run_beam_search(model, ids: list[int], search: BeamSearch) -> list[int]:
    """The engine's loop without a KV cache: forward every live beam (prompt + its tokens) in one batch, hand the
    last position's log-probabilities to the search, fork the beams it keeps."""
    beams: list[list[int]] = [[]]
    with torch.inference_mode():
        while True:
            logits = model(torch.tensor([ids + beam for beam in beams]), logits_to_keep=1).logits[:, -1]
            step = search.step(torch.log_softmax(logits.float(), dim=-1))
            if step.done:
                return search.best()
            beams = [beams[parent] + [token] for parent, token in zip(step.parents, step.tokens)]
            assert beams == search.beams


def reference_beam_search(model, ids: list[int], num_beams: int, max_new_tokens: int, eos: Sequence[int],
                          length_penalty: float, early_stopping: bool) -> list[int]:
    """transformers' beam search. One prompt and one returned sequence: nothing is padded, so the tokens after the
    prompt are exactly the best hypothesis (the EOS included when it ended with one)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens,
                             length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=1,
                             eos_token_id=list(eos), pad_token_id=EOS)
    return out[0, len(ids):].tolist()


def assert_matches_generate(model, ids: list[int], num_beams: int, max_new_tokens: int, eos: Sequence[int],
                            length_penalty: float = 1.0, early_stopping: bool = False) -> list[int]:
    search = BeamSearch(num_beams, max_new_tokens, eos, length_penalty, early_stopping, prompt_len=len(ids))
    ours = run_beam_search(model, ids, search)
    theirs = reference_beam_search(model, ids, num_beams, max_new_tokens, eos, length_penalty, early_stopping)
    assert ours == theirs, f"num_beams={num_beams} eos={list(eos)}: ours {ours} vs transformers' {theirs}"
    return ours


def greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        return model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids):].tolist()


SETTINGS = list(itertools.product([2, 4], [1.0, 0.5, 2.0], [False, True]))


@pytest.mark.parametrize(("num_beams", "length_penalty", "early_stopping"), SETTINGS)
def test_equals_generate_when_beams_run_to_max_new_tokens(tiny_model, tokenizer, num_beams, length_penalty,
                                                          early_stopping):
    # The random model never says EOS: every hypothesis is a beam cut at max_new_tokens.
    ids = prompt_ids(tokenizer, PROMPTS[1])
    out = assert_matches_generate(tiny_model, ids, num_beams, 12, [EOS], length_penalty, early_stopping)
    assert len(out) == 12


@pytest.mark.parametrize(("num_beams", "length_penalty", "early_stopping"), SETTINGS)
def test_equals_generate_with_eos_hits_along_the_way(tiny_model, tokenizer, num_beams, length_penalty,
                                                     early_stopping):
    # Two EOS ids the model emits early (so 3 * num_beams candidates a step): some hypotheses end with an EOS, the
    # rest are cut at max_new_tokens, and the best is either.
    ids = prompt_ids(tokenizer, PROMPTS[0])
    tokens = greedy(tiny_model, ids, 6)
    assert_matches_generate(tiny_model, ids, num_beams, 12, [tokens[2], tokens[5]], length_penalty, early_stopping)


@pytest.mark.parametrize(("num_beams", "length_penalty", "early_stopping"), SETTINGS)
def test_equals_generate_when_the_search_ends_before_max_new_tokens(eos_prone_model, tokenizer, num_beams,
                                                                    length_penalty, early_stopping):
    ended_early = 0
    for prompt in PROMPTS[:3]:
        ids = prompt_ids(tokenizer, prompt)
        out = assert_matches_generate(eos_prone_model, ids, num_beams, 16, [EOS], length_penalty, early_stopping)
        ended_early += out[-1] == EOS
    assert ended_early > 0


@pytest.mark.parametrize(("num_beams", "early_stopping"), [(2, False), (4, False), (4, True)])
def test_equals_generate_when_eos_candidates_crowd_the_top(tiny_model, tokenizer, num_beams, early_stopping):
    # Three likely EOS ids: up to 3 * num_beams of the best candidates end, and only the spares of the
    # (1 + 3) * num_beams taken each step keep num_beams beams alive.
    eos = [EOS, 3, 4]
    model = with_eos_bias(tiny_model, eos)
    for prompt in PROMPTS[:2]:
        assert_matches_generate(model, prompt_ids(tokenizer, prompt), num_beams, 16, eos, 1.0, early_stopping)


def test_early_stopping_and_length_penalty_change_the_result(eos_prone_model, tokenizer):
    # The settings above are not all the same search: the comparisons cover the places where they differ.
    ids = prompt_ids(tokenizer, PROMPTS[1])
    results = {setting: run_beam_search(eos_prone_model, ids, BeamSearch(setting[0], 16, [EOS], *setting[1:]))
               for setting in SETTINGS}
    assert results[(4, 2.0, False)] != results[(4, 2.0, True)]
    assert results[(4, 0.5, False)] != results[(4, 2.0, False)]


def test_single_prompt_row_first_then_num_beams_rows():
    search = BeamSearch(num_beams=3, max_new_tokens=5, eos_token_ids=[0])
    with pytest.raises(ValueError):
        search.step(torch.log_softmax(torch.randn(3, 50), dim=-1))  # the first step has only the prompt's beam
    step = search.step(torch.log_softmax(torch.randn(1, 50), dim=-1))
    assert step.parents == [0, 0, 0] and len(set(step.tokens)) == 3 and not step.done
    step = search.step(torch.log_softmax(torch.randn(3, 50), dim=-1))
    assert len(step.parents) == 3 and all(0 <= p < 3 for p in step.parents)


def test_max_new_tokens_one_ends_after_one_step_with_the_best_token():
    logprobs = torch.log_softmax(torch.randn(1, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    search = BeamSearch(num_beams=2, max_new_tokens=1, eos_token_ids=[EOS])
    step = search.step(logprobs)
    assert step.done and step.parents == [] and step.tokens == []
    assert search.best() == [int(logprobs[0].argmax())]
    with pytest.raises(RuntimeError):
        search.step(logprobs)


def test_forbidden_tokens_never_become_beams_or_hypotheses():
    """A structured-output mask leaves fewer allowed tokens than candidates: the -inf ones are dropped, the search
    goes on with fewer beams, and ends with an allowed hypothesis."""
    search = BeamSearch(num_beams=3, max_new_tokens=3, eos_token_ids=[EOS])
    only = torch.full((1, 50), float("-inf"))
    only[0, [7, 9]] = torch.log_softmax(torch.tensor([1.0, 0.5]), dim=-1)   # two allowed tokens, three beams
    step = search.step(only)
    assert sorted(step.tokens) == [7, 9] and not step.done
    masked = torch.full((2, 50), float("-inf"))
    masked[:, 11] = -0.1
    masked[:, EOS] = -3.0
    step = search.step(masked)
    assert set(step.tokens) == {11}
    search.step(torch.full((len(step.tokens), 50), float("-inf")).index_fill_(1, torch.tensor([EOS]), 0.0))
    assert search.done and all(token in (7, 9, 11, EOS) for token in search.best())


def test_one_beam_is_greedy_not_beam_search():
    with pytest.raises(ValueError):
        BeamSearch(num_beams=1, max_new_tokens=8, eos_token_ids=[EOS])


@pytest.mark.e2e
@pytest.mark.parametrize("num_beams", [2])   # k = 4 on SmolLM2: tests/e2e/test_smollm2.py, through the engine
def test_equals_generate_on_smollm2(smollm2_dir, tokenizer, num_beams):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    chats = [[("user", "What is 2+2?")], [("user", "What is the capital of France?")],
             [("system", "You are a terse assistant."), ("user", "Name three colours.")]]
    for chat, (length_penalty, early_stopping) in zip(chats, [(1.0, False), (2.0, False), (1.0, True)]):
        ids = prompt_ids(tokenizer, chat)
        assert_matches_generate(model, ids, num_beams, 24, [tokenizer.eos_token_id], length_penalty, early_stopping)
