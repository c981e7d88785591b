"""Draft proposers: the acceptance rule on hand-made trees, prompt lookup's copies, and, with a real model, that
prompt lookup and lookahead decoding give exactly plain greedy's tokens in fewer forward passes."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_service.decoding.lookahead import Lookahead
from engine_service.decoding.speculative import prompt_lookup
from engine_service.decoding.tree import Accepted, DraftTree, accept_greedy, chain
from tests.helpers import prompt_ids, reference_greedy
from tests.prompts import PROMPTS

# ---------------------------------------------------------------- acceptance on hand-made trees


def test_chain_is_causal_from_the_last_token():
    tree = chain(7, [8, 9])
    assert tree.tokens == [7, 8, 9]
    assert tree.offsets == [0, 1, 2]
    assert tree.mask == [[True, False, False], [True, True, False], [True, True, True]]


def test_chain_without_drafts_is_plain_greedy():
    assert accept_greedy(chain(7, []), [5]) == Accepted(tokens=[5], kv_rows=[0])


def test_all_drafts_accepted_plus_the_bonus_token():
    # Greedy after 7 is 8, after 8 is 9, after 9 is 4: all drafts right, 4 comes free.
    assert accept_greedy(chain(7, [8, 9]), [8, 9, 4]) == Accepted(tokens=[8, 9, 4], kv_rows=[0, 1, 2])


def test_partial_accept_stops_at_the_first_wrong_draft():
    # Draft 9 is right, 3 is wrong (greedy says 6 there): keep 9, correct to 6, drop what follows 3.
    assert accept_greedy(chain(7, [9, 3, 5]), [9, 6, 1, 2]) == Accepted(tokens=[9, 6], kv_rows=[0, 1])


def test_no_draft_accepted_gives_the_greedy_token():
    assert accept_greedy(chain(7, [8, 9]), [5, 9, 4]) == Accepted(tokens=[5], kv_rows=[0])


def two_branches() -> DraftTree:
    # Row 0 (token 7) has two candidate continuations: 8 -> 9 (rows 1, 2) and 3 -> 4 -> 5 (rows 3, 4, 5).
    mask = [[False] * 6 for _ in range(6)]
    for row, attended in enumerate([[0], [0, 1], [0, 1, 2], [0, 3], [0, 3, 4], [0, 3, 4, 5]]):
        for j in attended:
            mask[row][j] = True
    return DraftTree(tokens=[7, 8, 9, 3, 4, 5], offsets=[0, 1, 2, 1, 2, 3], mask=mask)


def test_tree_takes_the_branch_greedy_follows():
    # Greedy after 7 is 3, after 3 is 4, after 4 is 1: branch 2 holds for two tokens; row 5 (token 5) is wrong.
    argmax = [3, 0, 0, 4, 1, 9]
    assert accept_greedy(two_branches(), argmax) == Accepted(tokens=[3, 4, 1], kv_rows=[0, 3, 4])


def test_tree_takes_the_first_branch_and_ignores_rows_of_the_other():
    # Greedy after 7 is 8, after 8 is 9, after 9 is 2; branch 2's rows predict whatever, they are off the path.
    argmax = [8, 9, 2, 4, 5, 6]
    assert accept_greedy(two_branches(), argmax) == Accepted(tokens=[8, 9, 2], kv_rows=[0, 1, 2])


def test_tree_with_no_matching_branch_gives_the_greedy_token():
    assert accept_greedy(two_branches(), [6, 9, 2, 4, 5, 6]).tokens == [6]


# ---------------------------------------------------------------- prompt lookup


def test_prompt_lookup_copies_what_followed_the_longest_matching_suffix():
    # Suffix [1, 2] occurs at the start (followed by 3, 4, 5); a bare [2] later is followed by 9 but is shorter.
    assert prompt_lookup([1, 2, 3, 4, 5, 2, 9, 1, 2], max_ngram=2, num_drafts=3) == [3, 4, 5]


def test_prompt_lookup_falls_back_to_shorter_ngrams():
    assert prompt_lookup([5, 6, 7, 8, 6], max_ngram=3, num_drafts=2) == [7, 8]


def test_prompt_lookup_takes_the_most_recent_occurrence():
    # [1, 2] was followed by 3 long ago and by 4 lately: the recent continuation wins.
    assert prompt_lookup([1, 2, 3, 0, 1, 2, 4, 0, 1, 2], max_ngram=3, num_drafts=2) == [4, 0]


def test_prompt_lookup_continues_a_period_past_the_end_of_the_context():
    # The last "a b" is followed by "c a b" and then the end; the copy goes on through its own drafts.
    assert prompt_lookup([1, 2, 3, 1, 2, 3, 1, 2], max_ngram=2, num_drafts=7) == [3, 1, 2, 3, 1, 2, 3]


def test_prompt_lookup_without_match_proposes_nothing():
    assert prompt_lookup([1, 2, 3, 4], max_ngram=3, num_drafts=4) == []
    assert prompt_lookup([1], max_ngram=3, num_drafts=4) == []
    assert prompt_lookup([1, 2, 1], max_ngram=3, num_drafts=0) == []


# ---------------------------------------------------------------- lookahead trees


@pytest.mark.parametrize("window, ngram", [(4, 4), (3, 2), (1, 3)])
def test_lookahead_tree_rows_attend_a_path_of_contiguous_positions(window, ngram):
    lookahead = Lookahead(window=window, ngram=ngram, max_verify=3)
    context = list(range(100, 120))
    for step in range(6):
        tree = lookahead.plan(context)
        for row in range(1, len(tree.tokens)):
            # The attended rows are exactly one row per earlier offset: a path from row 0.
            attended = [j for j in range(len(tree.tokens)) if tree.mask[row][j]]
            assert sorted(tree.offsets[j] for j in attended) == list(range(tree.offsets[row] + 1))
            assert all(j <= row for j in attended) and tree.mask[row][0]
        # A stand-in model: the argmax of every row is its token + 1.
        argmax = [t + 1 for t in tree.tokens]
        context += lookahead.accept(tree, argmax).tokens
    # Once full: N-1 levels, level 0 keeps W-1 columns (row 0 is its first), the others W.
    assert [len(level) for level in lookahead.levels] == [window - 1] + [window] * (ngram - 2)


def test_lookahead_verifies_pool_ngrams_that_start_with_the_last_token():
    lookahead = Lookahead(window=3, ngram=3, max_verify=2)
    lookahead.levels = [[0, 0], [0, 0, 0]]                 # a full window (N-1 = 2 levels)
    lookahead.pool = {7: [(1, 2), (1, 3), (5, 6)]}
    tree = lookahead.plan([4, 7])
    # Window: 1 + 2 + 3 rows; verification: the two most recent n-grams (1, 3) and (5, 6), no shared prefix.
    assert tree.tokens[6:] == [1, 3, 5, 6]
    assert tree.offsets[6:] == [1, 2, 1, 2]
    argmax = [5] + [0] * 5 + [0, 0, 6, 8]                     # greedy: 7 -> 5 -> 6 -> 8
    assert lookahead.accept(tree, argmax) == Accepted(tokens=[5, 6, 8], kv_rows=[0, 8, 9])


def test_lookahead_verifies_every_candidate_when_fewer_than_max_verify():
    lookahead = Lookahead(window=3, ngram=3, max_verify=4)
    lookahead.levels = [[0, 0], [0, 0, 0]]
    lookahead.pool = {7: [(1, 2), (1, 3)]}
    tree = lookahead.plan([4, 7])
    assert tree.tokens[6:] == [1, 2, 3]                       # the shared first token 1 is one row
    assert tree.offsets[6:] == [1, 2, 2]


# ---------------------------------------------------------------- against a real model

MAX_NEW = 32
EOS = 2

Step = Callable[[list[int]], DraftTree]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models' ops are tiny: on a busy machine two threads spend more time waiting for each other than
    # computing (a tiny-Llama forward: 0.7 s with two threads, 0.02 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tree_argmax(model, context: list[int], tree: DraftTree) -> list[int]:
    """One forward pass as the engine runs it, but without a KV cache: the context (causal) and the tree's rows
    (each attending the whole context and the rows of its mask), at explicit positions; the argmax of each row."""
    cached = len(context) - 1                                 # the engine's KV cache holds all but the last token
    total = cached + len(tree.tokens)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    allowed[:cached, :cached] = torch.ones(cached, cached, dtype=torch.bool).tril()
    allowed[cached:, :cached] = True
    allowed[cached:, cached:] = torch.tensor(tree.mask)
    mask = torch.zeros(total, total).masked_fill(~allowed, float("-inf"))
    positions = list(range(cached)) + [cached + offset for offset in tree.offsets]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([context[:-1] + tree.tokens]), position_ids=torch.tensor([positions]),
                       attention_mask=mask[None, None], use_cache=False, logits_to_keep=len(tree.tokens)).logits
    return logits[0].argmax(-1).tolist()


def speculative_greedy(model, prompt: list[int], plan: Step, accept: Callable[[DraftTree, list[int]], Accepted],
                       max_new: int = MAX_NEW) -> tuple[list[int], int]:
    """Decodes like the engine would (the first pass doubles as the prefill); returns the tokens and the passes."""
    context, passes = list(prompt), 0
    while len(context) - len(prompt) < max_new and EOS not in context[len(prompt):]:
        tree = plan(context)
        accepted = accept(tree, tree_argmax(model, context, tree))
        assert accepted.kv_rows[0] == 0 and len(accepted.kv_rows) == len(accepted.tokens)
        context += accepted.tokens
        passes += 1
    out = context[len(prompt):]
    if EOS in out:
        out = out[:out.index(EOS) + 1]
    return out[:max_new], passes


def prompt_lookup_decoding(model, prompt: list[int], max_new: int = MAX_NEW) -> tuple[list[int], int]:
    return speculative_greedy(model, prompt, lambda c: chain(c[-1], prompt_lookup(c, max_ngram=3, num_drafts=5)),
                              accept_greedy, max_new)


def lookahead_decoding(model, prompt: list[int], window: int, ngram: int,
                       max_new: int = MAX_NEW) -> tuple[list[int], int]:
    lookahead = Lookahead(window=window, ngram=ngram, max_verify=window)
    return speculative_greedy(model, prompt, lookahead.plan, lookahead.accept, max_new)


@pytest.fixture(scope="module")
def tiny_prompts(tokenizer) -> list[list[int]]:
    return [prompt_ids(tokenizer, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def tiny_greedy(tiny_model, tiny_prompts) -> list[list[int]]:
    return [reference_greedy(tiny_model, ids, MAX_NEW) for ids in tiny_prompts]


def check_against_greedy(name: str, decode: Callable[[list[int]], tuple[list[int], int]],
                         prompts: list[list[int]], expected: list[list[int]]) -> None:
    tokens = passes = 0
    for ids, want in zip(prompts, expected):
        got, used = decode(ids)
        assert got == want
        tokens, passes = tokens + len(got), passes + used
    print(f"\n{name}: {tokens} tokens in {passes} forward passes over {len(prompts)} prompts")
    assert passes <= tokens


def test_prompt_lookup_equals_greedy_on_the_tiny_model(tiny_model, tiny_prompts, tiny_greedy):
    assert len(tiny_prompts) == 20
    check_against_greedy("prompt lookup (tiny)", lambda ids: prompt_lookup_decoding(tiny_model, ids),
                         tiny_prompts, tiny_greedy)


@pytest.mark.parametrize("window, ngram", [(4, 3), (6, 4)])
def test_lookahead_equals_greedy_on_the_tiny_model(tiny_model, tiny_prompts, tiny_greedy, window, ngram):
    check_against_greedy(f"lookahead W={window} N={ngram} (tiny)",
                         lambda ids: lookahead_decoding(tiny_model, ids, window, ngram),
                         tiny_prompts, tiny_greedy)


# Prompts that SmolLM2 answers by copying (greedy continuations checked by hand).
REPETITIVE: list[str | list[tuple[str, str]]] = [
    [("user", "Repeat this text exactly: Alice was beginning to get very tired of sitting by her sister on the bank, "
              "and of having nothing to do.")],
    [("user", "Copy this list: red, orange, yellow, green, blue, indigo, violet, black, white, grey, brown, pink.")],
    "Copy this list exactly: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, mango, "
    "nectarine, orange, papaya.\nCopy: apple, banana,",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20\n1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20\n1 2 3",
]


@pytest.fixture(scope="module")
def smollm2_model(smollm2_dir: Path):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.mark.e2e
def test_prompt_lookup_needs_fewer_passes_than_tokens_on_smollm2(smollm2_model, tokenizer):
    prompts = [prompt_ids(tokenizer, p) for p in REPETITIVE]
    expected = [reference_greedy(smollm2_model, ids, MAX_NEW) for ids in prompts]
    tokens = passes = 0
    for ids, want in zip(prompts, expected):
        got, used = prompt_lookup_decoding(smollm2_model, ids)
        assert got == want
        tokens, passes = tokens + len(got), passes + used
    print(f"\nprompt lookup (SmolLM2, repetitive): {tokens} tokens in {passes} forward passes")
    assert passes <= 0.6 * tokens
