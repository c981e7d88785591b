"""Contrastive search (Su et al., 2022): among the top-k tokens of the model's distribution, take
argmax (1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j), where h_v is the candidate's last hidden state and h_j
those of every token before it.

The k candidates are one tree of rows at the same position (each sees the context and itself, in scratch slots);
the chosen one's keys/values are kept, and its logits give the next candidates, so the whole sequence, last token
included, is always in the KV cache. The prompt's chunks keep their hidden states, and its last logits give the
first candidates (nothing is sampled).
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from engine_service.decoding.base import Guessing, Step, StepResult, logprobs_of
from engine_service.decoding.tree import DraftTree
from engine_service.scheduler import ScheduledChunk
from engine_service.sequence import Sequence

if TYPE_CHECKING:
    from engine_service.model_runner import StepOutput

MAX_CONTRASTIVE_TOP_K = 64


class Contrastive(Guessing):
    prefix_cacheable = False    # every context token's hidden state is needed; the prefix cache keeps none

    def __init__(self, alpha: float, top_k: int) -> None:
        self.alpha = alpha
        self.top_k = top_k
        self.next_logits: torch.Tensor | None = None    # [vocab]: the distribution of the next token
        self.hidden: list[torch.Tensor] = []             # [n, hidden] per computed chunk, in position order
        self.candidate_probs: torch.Tensor | None = None

    def span(self, seq: Sequence) -> int:
        return 1 if self.next_logits is not None and seq.num_computed == seq.num_tokens else 0

    def scratch_rows(self, seq: Sequence) -> int:
        return self.top_k if self.span(seq) else 0

    @classmethod
    def plan(cls, chunks: list[ScheduledChunk], step: Step) -> list[ScheduledChunk]:
        return [replace(c, want_hidden=True) for c in super().plan(chunks, step)]

    @classmethod
    def accept(cls, chunks: list[ScheduledChunk], out: StepOutput, step: Step) -> None:
        for c in chunks:
            if c.tree is None:
                c.seq.strategy.remember(c, out)
            else:
                step.keep(c, out, c.seq.strategy.verify(c, out, step))

    def remember(self, chunk: ScheduledChunk, out: StepOutput) -> None:
        """A prompt chunk: its hidden states; the chunk that ends the prompt also gives the first candidates."""
        if chunk.start == 0:
            self.hidden, self.next_logits = [], None
        self.hidden.append(out.chunks[chunk].hidden.float())
        if chunk.yields_token:
            self.next_logits = out.logits_of(chunk)[-1]

    def guess(self, seq: Sequence, step: Step) -> DraftTree:
        assert self.next_logits is not None
        # The model's distribution after the request's own processors (penalties, bias), as generate does.
        processed = step.sampler.process(self.next_logits.unsqueeze(0), [seq])[0]
        top = processed.softmax(dim=-1).topk(self.top_k)
        self.candidate_probs = top.values
        k = self.top_k
        return DraftTree(tokens=top.indices.tolist(), offsets=[0] * k,
                         mask=[[i == j for j in range(k)] for i in range(k)])

    def verify(self, chunk: ScheduledChunk, out: StepOutput, step: Step) -> StepResult:
        hidden, logits = out.chunks[chunk].hidden, out.logits_of(chunk)
        assert hidden is not None and self.candidate_probs is not None and self.next_logits is not None
        chosen = contrastive_choice(self.candidate_probs, hidden.float(), torch.cat(self.hidden), self.alpha)
        token = chunk.tree.tokens[chosen]
        logprobs = logprobs_of(chunk.seq, self.next_logits.unsqueeze(0), [token])
        self.hidden.append(hidden[chosen: chosen + 1].float())
        self.next_logits = logits[chosen]
        return StepResult([token], [chosen], logprobs)


def contrastive_choice(probs: torch.Tensor, candidates: torch.Tensor, context: torch.Tensor, alpha: float) -> int:
    """probs [k] of the candidates, their hidden states [k, H], the context's [L, H] -> the chosen row."""
    unit_candidates = candidates / candidates.norm(dim=-1, keepdim=True)
    unit_context = context / context.norm(dim=-1, keepdim=True)
    degeneration = (unit_candidates @ unit_context.T).max(dim=-1).values
    return int(((1 - alpha) * probs - alpha * degeneration).argmax())
