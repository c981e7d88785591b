"""Turns the last logits of each sampling sequence into a token.

Order as in transformers' generate: repetition penalty, then temperature, top-k, top-p, min-p; then greedy
argmax or a draw from the softmax with the sequence's own generator (so a seeded request gives the same tokens
whatever else is in the batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_service.sequence import Sequence, TokenLogprobs


@dataclass
class SampleOutput:
    tokens: list[int]                          # one per row
    logprobs: list[TokenLogprobs | None]       # one per row; None where the sequence did not ask for them


def apply_repetition_penalty(logits: torch.Tensor, token_ids: torch.Tensor, penalty: float) -> None:
    """In place, on one row: seen tokens' logits divided by penalty when positive, multiplied when negative."""
    scores = logits.gather(0, token_ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    logits.scatter_(0, token_ids, scores)


def apply_presence_frequency(logits: torch.Tensor, output_ids: list[int], presence: float, frequency: float) -> None:
    """In place, on one row, OpenAI's definition: over generated tokens only."""
    if not output_ids:
        return
    tokens, counts = torch.tensor(output_ids, device=logits.device).unique(return_counts=True)
    logits.index_add_(0, tokens, -(presence + frequency * counts.to(logits.dtype)))


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of tokens whose probability reaches top_p (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[-1] = False
    remove = remove_sorted.scatter(0, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.default_generator = torch.Generator(device=device)
        self.default_generator.seed()

    def generator_for(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.default_generator
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.params.seed)
        return seq.generator

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleOutput:
        """logits: [len(seqs), vocab] in any float dtype; returns one token per sequence."""
        logits = logits.float()
        raw = logits.clone() if any(seq.params.logprobs is not None for seq in seqs) else None
        greedy_rows = [i for i, seq in enumerate(seqs) if seq.params.greedy]
        for i, seq in enumerate(seqs):
            if seq.params.repetition_penalty != 1.0:
                seen = torch.tensor(seq.prompt_ids + seq.output_ids, device=logits.device).unique()
                apply_repetition_penalty(logits[i], seen, seq.params.repetition_penalty)
            if seq.params.presence_penalty or seq.params.frequency_penalty:
                apply_presence_frequency(logits[i], seq.output_ids, seq.params.presence_penalty,
                                         seq.params.frequency_penalty)
        tokens = [0] * len(seqs)
        if greedy_rows:
            index = torch.tensor(greedy_rows, device=logits.device)
            for row, token in zip(greedy_rows, logits.index_select(0, index).argmax(dim=-1).tolist()):
                tokens[row] = token
        for i, seq in enumerate(seqs):
            if seq.params.greedy:
                continue
            row = logits[i] / seq.params.temperature
            row = apply_top_k(row, seq.params.top_k)
            row = apply_top_p(row, seq.params.top_p)
            row = apply_min_p(row, seq.params.min_p)
            probs = row.softmax(dim=-1)
            tokens[i] = int(torch.multinomial(probs, 1, generator=self.generator_for(seq)).item())
        logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
        if raw is not None:
            for i, seq in enumerate(seqs):
                if seq.params.logprobs is None:
                    continue
                row = raw[i].log_softmax(dim=-1)
                top = row.topk(seq.params.logprobs) if seq.params.logprobs else None
                logprobs[i] = TokenLogprobs(tokens[i], float(row[tokens[i]]), () if top is None else tuple(
                    zip(top.indices.tolist(), top.values.tolist())))
        return SampleOutput(tokens, logprobs)
