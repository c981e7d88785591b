"""The one interface every decoding strategy implements, with plain sampling (greedy or sampled) as its defaults.

A step: the scheduler picks chunks -> each strategy `plan`s the chunks of its sequences (it may add rows of
guesses, a `DraftTree`, or first run a draft model) -> one batched forward pass (a `StepOutput`) -> each strategy
`accept`s its chunks' outputs and hands the new tokens to the step (`Step.emit`). `plan` and `accept` are class
methods over all of a step's chunks of that strategy, so that a strategy batches its own work: plain sampling
draws every row at once, the draft model guesses for all speculative sequences in the same passes.

An instance (one per request) holds that request's state and answers the scheduler: `span` (positions past the
cache its next step may write), `scratch_rows` (rows it may put in the cache's scratch slots), `members` (the
sequences that compute: the request's own, or its beams), `prefix_cacheable` and `prefill_elsewhere`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch

from engine_service.decoding.tree import DraftTree
from engine_service.sampler import Sampler, token_logprobs
from engine_service.scheduler import ScheduledChunk
from engine_service.sequence import Sequence, TokenLogprobs

if TYPE_CHECKING:
    from engine_service.model_runner import StepOutput


@dataclass
class StepResult:
    """What a guessing step keeps."""
    tokens: list[int]                    # new tokens, in order
    kv_rows: list[int]                   # rows whose keys/values are positions start, start + 1, ... of the sequence
    logprobs: list[TokenLogprobs | None]  # one per token when the request asked for them
    guesses: int = 0                     # guesses this step verified (speculative, lookahead), for the metrics


class Step(Protocol):
    """What a strategy may ask of the engine during a step."""
    sampler: Sampler

    def forward(self, chunks: list[ScheduledChunk], num_layers: int | None = None) -> StepOutput:
        """An extra forward pass (a draft model's); num_layers: only the model's first layers."""

    def emit(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprobs | None] | None = None) -> None:
        """Delivers new tokens; stops at the one that finishes the sequence."""

    def keep(self, chunk: ScheduledChunk, out: StepOutput, result: StepResult) -> None:
        """A tree's accepted rows become the sequence's next positions, and their tokens are emitted."""

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Gives child (no blocks) parent's cached positions: full blocks shared, the last one copied."""

    def free(self, seq: Sequence) -> None:
        """Gives back a sequence's blocks."""

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a request."""


class Strategy:
    """One request's decoding. The defaults are plain decoding: no guesses, one token per step from the sampler."""
    prefix_cacheable = True    # False: every prompt token must be computed (contrastive needs their hidden states)
    # Whether a prefill engine may compute the prompt (disaggregated serving): not when the strategy builds its own
    # state during the prompt's prefill (beams, contrastive hidden states, drafts and n-gram pools).
    prefill_elsewhere = False

    def span(self, seq: Sequence) -> int:
        """Positions past seq.num_computed the next step may write when it is a strategy step; 0: a plain chunk."""
        return 0

    def scratch_rows(self, seq: Sequence) -> int:
        """Rows the next strategy step may put in the KV cache's scratch slots (guesses that share a position)."""
        return 0

    def members(self, seq: Sequence) -> list[Sequence]:
        """The sequences that hold KV blocks and compute in a strategy step."""
        return [seq]

    @classmethod
    def plan(cls, chunks: list[ScheduledChunk], step: Step) -> list[ScheduledChunk]:
        """The chunks to compute for this strategy's scheduled ones."""
        return chunks

    @classmethod
    def accept(cls, chunks: list[ScheduledChunk], out: StepOutput, step: Step) -> None:
        """Plain sampling: one token from the last logits of every chunk that reaches its sequence's end."""
        sampling = [c for c in chunks if c.yields_token]
        if not sampling:
            return
        sampled = step.sampler(out.last_logits(sampling), [c.seq for c in sampling])
        for c, token, logprobs in zip(sampling, sampled.tokens, sampled.logprobs):
            step.emit(c.seq, [token], [logprobs])


class Plain(Strategy):
    """Greedy or sampled decoding, one token per step: the interface's defaults."""
    prefill_elsewhere = True


class Guessing(Strategy):
    """Adds rows of guesses (a DraftTree) to a sequence's decode step and keeps the accepted ones: speculative
    decoding, lookahead decoding, contrastive search. A subclass says per sequence what to guess and what to keep;
    a step without guesses is a plain one."""

    def guess(self, seq: Sequence, step: Step) -> DraftTree | None:
        raise NotImplementedError

    def verify(self, chunk: ScheduledChunk, out: StepOutput, step: Step) -> StepResult:
        raise NotImplementedError

    @classmethod
    def plan(cls, chunks: list[ScheduledChunk], step: Step) -> list[ScheduledChunk]:
        planned = []
        for c in chunks:
            tree = c.seq.strategy.guess(c.seq, step) if c.seq.strategy.span(c.seq) else None
            planned.append(c if tree is None else replace(c, tree=tree))
        return planned

    @classmethod
    def accept(cls, chunks: list[ScheduledChunk], out: StepOutput, step: Step) -> None:
        super().accept([c for c in chunks if c.tree is None], out, step)
        for c in chunks:
            if c.tree is not None:
                step.keep(c, out, c.seq.strategy.verify(c, out, step))


def logprobs_of(seq: Sequence, raw: torch.Tensor, tokens: list[int]) -> list[TokenLogprobs | None]:
    """raw: [len(tokens), vocab] unprocessed logits of the rows that produced each token."""
    if seq.params.logprobs is None:
        return [None] * len(tokens)
    return list(token_logprobs(raw, tokens, [seq.params.logprobs] * len(tokens)))


def decoding(seq: Sequence) -> bool:
    """Past the prompt, with every token but the last in the KV cache: the next step may guess."""
    return bool(seq.output_ids) and seq.num_computed == seq.num_tokens - 1


def room(seq: Sequence, context: int) -> int:
    """New tokens the sequence may still produce (its max_tokens and the model's context)."""
    return max(0, min(seq.params.max_tokens - len(seq.output_ids), context - seq.num_tokens))
