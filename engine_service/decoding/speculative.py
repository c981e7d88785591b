"""Speculative decoding: guess k tokens, verify them in one forward pass of the target. The guesses come from the
context (prompt lookup) or from a draft model, here the target's own first layers (self-speculative early exit),
run k times over all drafting sequences at once before the step's verifying pass.

Greedy requests accept a guess when it equals the target's choice (output identical to plain greedy); sampled
ones use Leviathan et al.'s rule: accept guess d with probability min(1, p(d) / q(d)), on rejection draw from
max(p - q, 0) renormalised, so the tokens follow the target distribution p exactly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine_service.decoding.base import Guessing, Step, StepResult, decoding, logprobs_of, room
from engine_service.decoding.tree import DraftTree, accept_greedy, chain
from engine_service.sampler import Sampler
from engine_service.scheduler import ScheduledChunk
from engine_service.sequence import Sequence

if TYPE_CHECKING:
    from engine_service.model_runner import StepOutput

DEFAULT_SPECULATIVE_TOKENS = 5
DEFAULT_PROMPT_LOOKUP_NGRAM = 3


class Speculative(Guessing):
    def __init__(self, mode: str, num_tokens: int, max_ngram: int, context: int, draft_layers: int = 0) -> None:
        self.mode = mode                     # "prompt_lookup" or "draft"
        self.num_tokens = num_tokens or DEFAULT_SPECULATIVE_TOKENS
        self.max_ngram = max_ngram or DEFAULT_PROMPT_LOOKUP_NGRAM
        self.context = context
        self.draft_layers = draft_layers     # the draft model: the target's first draft_layers layers
        self.drafts: list[int] = []                  # this step's guesses
        self.draft_probs: torch.Tensor | None = None  # [len(drafts), vocab]: q of each guess (sampled drafts)

    def span(self, seq: Sequence) -> int:
        return 1 + self.num_tokens if decoding(seq) else 0

    def max_drafts(self, seq: Sequence) -> int:
        # The last accepted row also yields a bonus token, so k guesses can give k + 1 tokens.
        return max(0, min(self.num_tokens, room(seq, self.context) - 1))

    @classmethod
    def plan(cls, chunks: list[ScheduledChunk], step: Step) -> list[ScheduledChunk]:
        drafting = [c for c in chunks if c.seq.strategy.mode == "draft" and c.seq.strategy.span(c.seq)]
        if drafting:
            _draft(drafting, step)
        return super().plan(chunks, step)

    def guess(self, seq: Sequence, step: Step) -> DraftTree | None:
        if self.mode == "prompt_lookup":
            self.drafts = prompt_lookup(seq.prompt_ids + seq.output_ids, self.max_ngram, self.max_drafts(seq))
            self.draft_probs = None
        return chain(seq.output_ids[-1], self.drafts) if self.drafts else None

    def verify(self, chunk: ScheduledChunk, out: StepOutput, step: Step) -> StepResult:
        seq, tree = chunk.seq, chunk.tree
        logits = out.logits_of(chunk)
        drafts = tree.tokens[1:]
        rows = len(tree.tokens)
        processed = step.sampler.process(logits, [seq] * rows, [drafts[:i] for i in range(rows)])
        if seq.params.greedy:
            result = accept_greedy(tree, processed.argmax(dim=-1).tolist())
            tokens, kv_rows = result.tokens, result.kv_rows
        else:
            tokens = self.accept_sampled(seq, drafts, processed.softmax(dim=-1), step.sampler)
            kv_rows = list(range(len(tokens)))
        return StepResult(tokens, kv_rows, logprobs_of(seq, logits[: len(tokens)], tokens), guesses=len(drafts))

    def accept_sampled(self, seq: Sequence, drafts: list[int], probs: torch.Tensor, sampler: Sampler) -> list[int]:
        """Leviathan et al.'s rule over the guesses, then the bonus token: tokens distributed as p."""
        tokens: list[int] = []
        for i, draft in enumerate(drafts):
            p = probs[i]
            q = self.draft_probs[i] if self.draft_probs is not None else None
            q_draft = 1.0 if q is None else float(q[draft])
            if sampler.uniform(seq) * q_draft < float(p[draft]):
                tokens.append(draft)
                continue
            residual = p.clone()
            if q is None:
                residual[draft] = 0.0      # a deterministic guess: q is one-hot on it
            else:
                residual = (residual - q).clamp(min=0.0)
            if float(residual.sum()) <= 0.0:   # p == q: any draw from p is right
                residual = p
            tokens.append(sampler.draw((residual / residual.sum()).unsqueeze(0), [seq])[0])
            return tokens
        tokens.append(sampler.draw(probs[len(drafts)].unsqueeze(0), [seq])[0])
        return tokens


def _draft(chunks: list[ScheduledChunk], step: Step) -> None:
    """The draft model's guesses: up to k early-exit forward passes (the target's first layers), batched over the
    sequences, each writing its guess's keys/values of those layers in place (the verifying pass rewrites them)."""
    strategies: list[Speculative] = [c.seq.strategy for c in chunks]
    for strategy in strategies:
        strategy.drafts, strategy.draft_probs = [], None
    probs: list[list[torch.Tensor]] = [[] for _ in chunks]
    for k in range(max(s.max_drafts(c.seq) for s, c in zip(strategies, chunks))):
        active = [i for i, (s, c) in enumerate(zip(strategies, chunks)) if s.max_drafts(c.seq) > k]
        mini = [ScheduledChunk(chunks[i].seq, chunks[i].start + k, chunks[i].start + k + 1,
                               tree=chain(([chunks[i].seq.output_ids[-1]] + strategies[i].drafts)[-1], []))
                for i in active]
        out = step.forward(mini, num_layers=strategies[0].draft_layers)
        seqs = [chunks[i].seq for i in active]
        processed = step.sampler.process(out.last_logits(mini), seqs, [list(strategies[i].drafts) for i in active])
        argmax = processed.argmax(dim=-1).tolist()
        distribution = processed.softmax(dim=-1)
        for row, i in enumerate(active):
            if seqs[row].params.greedy:
                strategies[i].drafts.append(argmax[row])
            else:
                strategies[i].drafts.append(step.sampler.draw(distribution[row: row + 1], [seqs[row]])[0])
                probs[i].append(distribution[row])
    for strategy, rows in zip(strategies, probs):
        if rows:
            strategy.draft_probs = torch.stack(rows)


def prompt_lookup(context: list[int], max_ngram: int, num_drafts: int) -> list[int]:
    """Drafts copied from the context: find an earlier occurrence of the context's last n tokens (the longest n
    from max_ngram down to 1 that occurs) and propose the tokens that followed it. [] when nothing matches.

    Unlike transformers' PromptLookupCandidateGenerator, which takes the earliest occurrence, we take the most
    recent one: the nearest text is the best predictor when a model repeats itself (a loop, a list being extended,
    code being edited), and a later occurrence already reflects any change made since an older one.
    The copy may run into the text that follows the occurrence up to the end of the context and then on into the
    drafts themselves (as an LZ77 copy does), so a period shorter than num_drafts still yields num_drafts drafts.
    """
    if num_drafts <= 0 or max_ngram <= 0:
        return []
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        suffix = context[-n:]
        # Occurrences other than the suffix itself, newest first; start + n < len(context) leaves a token to copy.
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == suffix:
                source = context[:]
                for k in range(num_drafts):
                    source.append(source[start + n + k])
                return source[len(context):]
    return []
