"""The engine's grammar states on SmolLM2's vocabulary, without servers: the compile cache, a matcher's look-ahead
over draft tokens (its state unchanged afterwards), forks that go their own way, and the stop tokens a dead end
allows (bit 31 of a mask word included)."""
from __future__ import annotations

import asyncio

import pytest
import torch
import xgrammar as xgr
from prometheus_client import REGISTRY

from engine_service.sampling import StructuredOutput
from engine_service.structured_output import ConstraintError, Grammars, Matcher

VOCAB = 49152
HITS = "splitserve_engine_structured_compile_cache_hits_total"


def allowed(matcher: Matcher, ahead: list[int] = ()) -> set[int]:
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    matcher.fill(bitmask, 0, list(ahead))
    logits = torch.zeros(1, VOCAB)
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


@pytest.fixture(scope="module")
def grammars(smollm2_dir):
    # Stop token 31: its bit is the sign bit of the first int32 word of a mask.
    grammars = Grammars(str(smollm2_dir), VOCAB, (31,))
    yield grammars
    grammars.shutdown()


def compile_(grammars: Grammars, kind: str, value: object):
    return asyncio.run(grammars.compile(StructuredOutput(kind, value)))


def test_a_second_compile_is_a_cache_hit(grammars):
    hits = REGISTRY.get_sample_value(HITS) or 0.0
    first = compile_(grammars, "regex", "(yes|no)")
    assert compile_(grammars, "regex", "(yes|no)") is first
    assert REGISTRY.get_sample_value(HITS) == hits + 1
    with pytest.raises(ConstraintError, match=r"^structured_output\.regex: .*parenthesis"):
        compile_(grammars, "regex", "a(b")


def test_look_ahead_leaves_the_state_and_forks_are_independent(grammars, tokenizer):
    compiled = compile_(grammars, "choice", ("yes please", "no thanks"))
    matcher = grammars.matcher(compiled)
    yes = tokenizer.encode("yes", add_special_tokens=False)
    start = allowed(matcher)
    after_yes = allowed(matcher, yes)
    assert yes[0] in start and after_yes != start
    assert allowed(matcher) == start              # the look-ahead was rolled back
    fork = matcher.fork()
    assert all(fork.accept(token) for token in yes)
    assert allowed(fork) == after_yes and allowed(matcher) == start
    assert not fork.accept(tokenizer.encode(" no", add_special_tokens=False)[0])   # refused, state unchanged
    assert allowed(fork) == after_yes
    for m in (matcher, fork):
        m.close()


def test_a_dead_end_allows_only_the_stop_tokens(grammars, tokenizer):
    compiled = compile_(grammars, "regex", "ok \U00040000")   # no token holds the byte 0xF1
    matcher = grammars.matcher(compiled)
    for token in tokenizer.encode("ok ", add_special_tokens=False):
        assert matcher.accept(token)
    assert matcher.dead_end and allowed(matcher) == {31}
    matcher.close()
    with pytest.raises(ConstraintError, match="cannot write"):
        compile_(grammars, "regex", "\U00040000")
