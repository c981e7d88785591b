"""Turns the last logits of each sampling sequence into a token, for the whole batch at once.

Processors, in transformers' generate order: repetition penalty, presence/frequency penalties, logit bias; then,
for sampled rows only, temperature, top-k, top-p, min-p. Each processor is a function over a [rows, vocab] batch
with one parameter per row (its "off" value leaves a row unchanged), and the sampler runs it only on the rows
that use it, or not at all: a batch of plain greedy rows costs one argmax.

Sampled rows draw by an exponential race, argmax(p / E) with E ~ Exp(1) (an exact draw from p), where each seeded
sequence's E comes from its own generator, so a seeded request gives the same tokens whatever else is in the batch.
That generator is re-keyed from (seed, position) whenever the sequence reaches a new position: the draws for a token
depend on the seed and the token's place in the sequence only, so a stream replayed on another engine (the
gateway's failover resubmits prompt + tokens so far) continues exactly as the original would have.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from hashlib import blake2b
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from engine_service.sequence import Sequence, TokenLogprobs
from engine_service.structured_output import mask_rows


@dataclass
class SampleOutput:
    tokens: list[int]                          # one per row
    logprobs: list[TokenLogprobs | None]       # one per row; None where the sequence did not ask for them


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    """Row numbers on the device. non_blocking: a host->GPU copy must not wait for the queued forward pass."""
    return torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)


def _param(values: list[float] | list[int], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A per-row parameter as a [rows, 1] tensor on the logits' device (without waiting for the GPU, as _index)."""
    return torch.tensor(values, dtype=dtype or like.dtype).to(like.device, non_blocking=True).unsqueeze(1)


def _token_index(token_ids: list[list[int]], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token id) of every listed token, flat, on like's device; ids >= vocab become vocab, a spare column
    the callers drop (an embedding table can be larger than the output layer; such tokens cannot be drawn)."""
    rows, vocab = like.shape
    lengths = [len(ids) for ids in token_ids]
    ids = _index(list(chain.from_iterable(token_ids)), like.device).clamp(max=vocab)
    # output_size given: otherwise repeat_interleave reads the lengths back from the GPU to size its output.
    row_of = torch.repeat_interleave(torch.arange(rows, device=like.device), _index(lengths, like.device),
                                     output_size=sum(lengths))
    return row_of, ids


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: list[list[int]], penalty: list[float]) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor per row: each seen token's logit divided by the penalty when
    positive, multiplied when negative, once however often it occurs. 1.0 = off."""
    rows, vocab = logits.shape
    seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device)
    seen.index_put_(_token_index(seen_ids, logits), torch.ones((), dtype=torch.bool, device=logits.device))
    p = _param(penalty, logits)
    return torch.where(seen[:, :vocab], torch.where(logits < 0, logits * p, logits / p), logits)


def apply_presence_frequency(logits: torch.Tensor, output_ids: list[list[int]], presence: list[float],
                             frequency: list[float]) -> torch.Tensor:
    """OpenAI's definition, over generated tokens only: logit -= presence * (count > 0) + frequency * count."""
    rows, vocab = logits.shape
    counts = torch.zeros(rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    row_of, ids = _token_index(output_ids, logits)
    counts.index_put_((row_of, ids), torch.ones_like(ids, dtype=logits.dtype), accumulate=True)
    counts = counts[:, :vocab]
    return logits - (_param(presence, logits) * (counts > 0) + _param(frequency, logits) * counts)


def apply_logit_bias(logits: torch.Tensor, bias: list[tuple[tuple[int, float], ...]]) -> torch.Tensor:
    """Adds each row's (token id, bias) pairs to its logits; ids >= vocab are ignored."""
    rows, vocab = logits.shape
    row_of = [row for row, pairs in enumerate(bias) for _ in pairs]
    ids = [min(token, vocab) for pairs in bias for token, _ in pairs]
    values = [value for pairs in bias for _, value in pairs]
    dense = torch.zeros(rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    dense.index_put_((_index(row_of, logits.device), _index(ids, logits.device)),
                     _param(values, logits).squeeze(1), accumulate=True)
    return logits + dense[:, :vocab]


def apply_temperature(logits: torch.Tensor, temperature: list[float]) -> torch.Tensor:
    """transformers' TemperatureLogitsWarper per row. 1.0 = off."""
    return logits / _param(temperature, logits)


def apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """transformers' TopKLogitsWarper per row: keeps the logits at least as large as the k-th largest (ties
    included). 0, or k >= vocab, = off."""
    vocab = logits.shape[-1]
    on = [0 < k < vocab for k in top_k]
    if not any(on):
        return logits
    ks = [k if row_on else 1 for k, row_on in zip(top_k, on)]
    # One topk as deep as the deepest row, not a full sort; each row reads its own k-th value from it.
    kth = logits.topk(max(ks), dim=-1).values.gather(1, _param(ks, logits, torch.long) - 1)
    kth = kth.masked_fill(~_param(on, logits, torch.bool), float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """transformers' TopPLogitsWarper per row: keeps the smallest set of most likely tokens whose probability
    reaches top_p (at least one). 1.0 = off."""
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # 1 - p in double, as transformers computes it, so the boundary falls where theirs does.
    remove = cumulative <= _param([1.0 - p for p in top_p], logits)
    remove[:, -1] = False
    # An off row keeps everything, even tokens whose probability underflows to 0 (which <= 0 would remove).
    remove &= _param([p < 1.0 for p in top_p], logits, torch.bool)
    return logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """transformers' MinPLogitsWarper per row: drops tokens less likely than min_p times the most likely one,
    keeping at least the most likely. 0.0 = off."""
    probs = logits.softmax(dim=-1)
    remove = probs < _param(min_p, probs) * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


def _on_rows(x: torch.Tensor, rows: list[int], fn: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> torch.Tensor:
    """fn(x[rows], rows) written back into x's rows; fn on the whole batch when every row takes part, and no
    work at all when none does."""
    if not rows:
        return x
    if len(rows) == x.shape[0]:
        return fn(x, rows)
    index = _index(rows, x.device)
    return x.index_copy(0, index, fn(x.index_select(0, index), rows))


def token_logprobs(logits: torch.Tensor, tokens: list[int], top_n: list[int]) -> list[TokenLogprobs]:
    """Each row's token under the raw distribution (vLLM v1's default: what the model thought, not what the
    processors left), with that row's top_n most likely alternatives. logits: [len(tokens), vocab] unprocessed."""
    raw = logits.float().log_softmax(dim=-1)
    chosen = raw.gather(1, torch.tensor(tokens, device=raw.device).unsqueeze(1)).squeeze(1).tolist()
    depth = max(top_n)
    top = raw.topk(depth, dim=-1) if depth else None
    top_ids, top_values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
    return [TokenLogprobs(token, value, tuple(zip(top_ids[j][:n], top_values[j][:n])) if n else ())
            for j, (token, value, n) in enumerate(zip(tokens, chosen, top_n))]


def position_seed(seed: int, position: int) -> int:
    """A generator seed for the draws at one position of a seeded sequence (a hash: nearby keys are unrelated)."""
    return int.from_bytes(blake2b(f"{seed}:{position}".encode(), digest_size=8).digest(), "little")


def row_argmax(x: torch.Tensor, chunks: int = 256) -> torch.Tensor:
    """x.argmax(dim=-1) for [rows, vocab] (the first index of the largest value, NaN counted largest, as torch's).
    On GPUs a few rows of a large vocabulary take two stages: torch reduces each row in one thread block (28 us for
    one row of 128,256 on an H200, a fiftieth of a step), here the row's chunks are reduced in parallel first."""
    rows, vocab = x.shape
    if x.device.type == "cpu" and x.dtype == torch.float32:
        # numpy's argmax is vectorised, torch's CPU one is not: 11 against 60-110 us for one row of 49,152 on the
        # 2-core CI machine, 0.85 against 2.5 ms for 64 rows (same choice: first of the largest, NaN counted largest)
        return torch.from_numpy(np.argmax(x.numpy(), axis=-1))
    if x.device.type != "cuda" or vocab < 16 * chunks or rows > 16:
        return x.argmax(dim=-1)
    return two_stage_argmax(x, chunks)


def two_stage_argmax(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """row_argmax's two stages: each chunk's argmax, then the first chunk holding the row's largest value."""
    rows, vocab = x.shape
    width = -(-vocab // chunks)
    if width * chunks != vocab:
        x = F.pad(x, (0, width * chunks - vocab), value=float("-inf"))
    parts = x.view(rows, chunks, width)
    within = parts.argmax(dim=-1)                                           # [rows, chunks]
    best = parts.gather(2, within.unsqueeze(-1)).squeeze(-1)                # each chunk's largest
    chunk = best.argmax(dim=-1, keepdim=True)                               # the first chunk holding the largest
    return (chunk * width + within.gather(1, chunk)).squeeze(1)


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.default_generator = torch.Generator(device=device)   # shared by the unseeded rows
        self.default_generator.seed()

    def generator_for(self, seq: Sequence) -> torch.Generator:
        """The generator of the sequence's next draws: keyed by (seed, position) on the first draw at a position,
        continued by further draws there (a speculative step's several draws)."""
        if seq.params.seed is None:
            return self.default_generator
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device)
        if seq.generator_position != seq.num_tokens:
            seq.generator_position = seq.num_tokens
            seq.generator.manual_seed(position_seed(seq.params.seed, seq.num_tokens))
        return seq.generator

    def process(self, logits: torch.Tensor, seqs: list[Sequence],
                extra_ids: list[list[int]] | None = None) -> torch.Tensor:
        """[rows, vocab] float32 logits after each row's processors (-inf where filtered). A constrained row's
        grammar mask comes first (after extra_ids[row]). Penalties count the row's prompt and output plus
        extra_ids[row] (draft tokens before that row); the warpers apply to sampled rows only. Rows may repeat a
        sequence. Never modifies `logits`; when nothing applies, returns
        logits.float() (the caller's tensor itself if already float32: a plain greedy batch costs no copy)."""
        extra = extra_ids or [[] for _ in seqs]
        params = [seq.params for seq in seqs]
        x = mask_rows(logits.float(), seqs, extra)   # every step is out of place: the caller's tensor stays as it was
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        x = _on_rows(x, [i for i, p in enumerate(params) if p.repetition_penalty != 1.0],
                     lambda sub, rows: apply_repetition_penalty(
                         sub, [seqs[i].prompt_ids + seqs[i].output_ids + extra[i] for i in rows],
                         [params[i].repetition_penalty for i in rows]))
        x = _on_rows(x, [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty],
                     lambda sub, rows: apply_presence_frequency(
                         sub, [seqs[i].generated_ids + extra[i] for i in rows],
                         [params[i].presence_penalty for i in rows], [params[i].frequency_penalty for i in rows]))
        x = _on_rows(x, [i for i, p in enumerate(params) if p.logit_bias],
                     lambda sub, rows: apply_logit_bias(sub, [params[i].logit_bias for i in rows]))
        x = _on_rows(x, [i for i in sampled if params[i].temperature != 1.0],
                     lambda sub, rows: apply_temperature(sub, [params[i].temperature for i in rows]))
        x = _on_rows(x, [i for i in sampled if 0 < params[i].top_k < x.shape[-1]],
                     lambda sub, rows: apply_top_k(sub, [params[i].top_k for i in rows]))
        x = _on_rows(x, [i for i in sampled if params[i].top_p < 1.0],
                     lambda sub, rows: apply_top_p(sub, [params[i].top_p for i in rows]))
        x = _on_rows(x, [i for i in sampled if params[i].min_p > 0.0],
                     lambda sub, rows: apply_min_p(sub, [params[i].min_p for i in rows]))
        return x

    def _race(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """[rows] token ids, one exact draw per row from probs (rows need not sum to one): argmax(p / E) with
        E ~ Exp(1). A seeded row's E comes from its own generator, drawn for that row alone, so its token does
        not depend on the other rows; the unseeded rows share one draw from the default generator."""
        noise = torch.empty_like(probs, dtype=torch.float32)
        unseeded = [i for i, seq in enumerate(seqs) if seq.params.seed is None]
        if len(unseeded) == len(seqs):
            noise.exponential_(generator=self.default_generator)
        elif unseeded:
            shared = torch.empty(len(unseeded), probs.shape[-1], device=probs.device)
            noise.index_copy_(0, _index(unseeded, probs.device), shared.exponential_(generator=self.default_generator))
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None:    # in row order, so repeated rows of one sequence draw in turn
                noise[i].exponential_(generator=self.generator_for(seq))
        # E can come out as 0; tiny keeps 0/E at 0 instead of NaN (which argmax would take as the largest).
        return (probs / noise.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)

    def draw(self, probs: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row of probs [rows, vocab], each from its sequence's generator (rows may repeat one)."""
        return self._race(probs, seqs).tolist()

    def uniform(self, seq: Sequence) -> float:
        """One U(0, 1) draw from the sequence's generator (speculative decoding's acceptance test)."""
        return float(torch.rand((), device=self.device, generator=self.generator_for(seq)))

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleOutput:
        """logits: [len(seqs), vocab] in any float dtype; returns one token per sequence."""
        processed = self.process(logits, seqs)
        sampled = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        if len(sampled) == len(seqs):
            tokens = self._race(processed.softmax(dim=-1), seqs)
        else:
            tokens = row_argmax(processed)
            if sampled:
                index = _index(sampled, logits.device)
                drawn = self._race(processed.index_select(0, index).softmax(dim=-1), [seqs[i] for i in sampled])
                tokens = tokens.index_copy(0, index, drawn)
        token_list = tokens.tolist()
        want = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
        if want:
            rows = logits.index_select(0, _index(want, logits.device))
            found = token_logprobs(rows, [token_list[i] for i in want], [seqs[i].params.logprobs for i in want])
            for i, entry in zip(want, found):
                logprobs[i] = entry
        return SampleOutput(token_list, logprobs)
