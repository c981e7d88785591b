"""Decoding strategies: how a request's tokens come out of the model's logits, each behind one interface
(`base.Strategy`: plan the step's rows, accept the step's output). Plain greedy and sampling (`base.Plain`, the
sampler does the work), speculative decoding (`speculative`), lookahead decoding (`lookahead`), contrastive search
(`contrastive`) and beam search (`beam`); `tree` holds the draft trees the guessing strategies add to a step."""
from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

from engine_service.decoding.base import Plain, Strategy
from engine_service.decoding.beam import BeamGroup
from engine_service.decoding.contrastive import MAX_CONTRASTIVE_TOP_K, Contrastive
from engine_service.decoding.lookahead import LookaheadStrategy
from engine_service.decoding.speculative import Speculative
from engine_service.scheduler import ScheduledChunk
from engine_service.sequence import Sequence

Item = TypeVar("Item")


def make_strategy(seq: Sequence, context: int, draft_layers: int, eos_token_ids: tuple[int, ...]) -> Strategy:
    """The strategy seq's request asks for. Raises ValueError when the engine cannot serve it."""
    params = seq.params
    if params.structured_output is not None and (params.penalty_alpha > 0 or params.speculative == "lookahead"):
        # Both pick among rows or candidates the grammar's state does not follow (Jacobi guesses, top-k re-ranking).
        raise ValueError("structured_output does not combine with contrastive search or lookahead decoding; "
                         "use plain, beam search or speculative='prompt_lookup'/'draft'")
    if params.num_beams > 1:
        return BeamGroup(seq, () if params.ignore_eos else eos_token_ids + params.stop_token_ids,
                         min(params.max_tokens, context - len(seq.prompt_ids)))
    if params.penalty_alpha > 0:
        if params.top_k > MAX_CONTRASTIVE_TOP_K:
            raise ValueError(f"contrastive search takes at most top_k={MAX_CONTRASTIVE_TOP_K} candidates, "
                             f"got {params.top_k}")
        return Contrastive(params.penalty_alpha, params.top_k)
    if params.speculative == "lookahead":
        if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            raise ValueError("lookahead decoding does not take repetition, presence or frequency penalties")
        return LookaheadStrategy(params.lookahead_window, params.lookahead_ngram, params.num_speculative_tokens,
                                 context)
    if params.speculative in ("prompt_lookup", "draft"):
        if params.speculative == "draft" and draft_layers <= 0:
            raise ValueError("this engine has no draft model (start it with --draft-layers N on a Llama-family "
                             "model)")
        return Speculative(params.speculative, params.num_speculative_tokens, params.prompt_lookup_max_ngram,
                           context, draft_layers)
    return Plain()


def grouped(items: list[Item], key: Callable[[Item], Hashable]) -> dict[Hashable, list[Item]]:
    """items by key, each group in the items' order."""
    groups: dict[Hashable, list[Item]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def by_strategy(chunks: list[ScheduledChunk]) -> dict[type[Strategy], list[ScheduledChunk]]:
    """A step's chunks by their sequences' kind of strategy: each kind plans and accepts its chunks at once."""
    return grouped(chunks, lambda c: type(c.seq.strategy))
