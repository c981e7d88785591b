"""Beam search, token for token the same as transformers' `generate(num_beams=k, do_sample=False)`.

`BeamGroup` is the strategy: the request's sequence prefills the prompt; then its beams, sequences of their own
that share the prompt's blocks, decode side by side in the batched forward pass (the scheduler reserves their
blocks: they are the group's `members`). After each pass their next-token log-probabilities go to
`BeamSearch.step`, the pure bookkeeping (no model, no cache), which says which beams live on (a parent and a token
each) and when the search is over; the group forks and frees the beams' blocks accordingly. The text arrives when
the search ends.

transformers 5.x semantics, mirrored here (`GenerationMixin._beam_search` and helpers, batch size 1):
- Candidates: the top K = max(2, 1 + n_eos) * num_beams of running_score + logprob over all live beams x vocab,
  best first. K leaves at least num_beams non-EOS candidates, since each EOS id is chosen at most once per beam.
- First step: only the prompt's beam is live (transformers gives beams 1.. a score of -1e9), so a single row.
- A candidate "hits a stop" when its token is an EOS or when it makes max_new_tokens. Only hits among the first
  num_beams candidates become finished hypotheses, scored sum_logprobs / generated_len ** length_penalty, where
  generated_len counts the generated tokens including the new one (the EOS); the best num_beams are kept.
- The next live beams: the first num_beams candidates that did not hit a stop.
- Over when max_new_tokens is reached (then the top num_beams candidates all finish, EOS or not, which is how fewer
  than num_beams EOS-finished hypotheses get filled up), or, once num_beams hypotheses finished: at once with
  early_stopping=True; with False when the best live beam's score / current_generated_len ** length_penalty is not
  above the worst finished hypothesis' score.
- The result is the best-scoring finished hypothesis.
- generate applies no logits processor by default for a plain Llama config (min_length 0, no repetition
  penalty...): the caller's log_softmax of the fp32 logits is all transformers uses.

Scores are kept and computed as float32 tensors with the same operations as transformers, so that comparisons
between hypotheses see bit-identical values. Exact score ties are broken by candidate order (stable), where
transformers relies on `torch.topk`; with real logits such ties do not occur.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine_service.decoding.base import Step, Strategy
from engine_service.sampling import SamplingParams
from engine_service.scheduler import ScheduledChunk
from engine_service.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from engine_service.model_runner import StepOutput


@dataclass
class BeamStep:
    parents: list[int]  # for each beam alive after this step, the index of its parent among the beams passed to step()
    tokens: list[int]   # the token appended to that parent
    done: bool          # the search is over: call best(); parents and tokens are then empty


@dataclass
class Hypothesis:
    score: float        # sum of logprobs / generated_len ** length_penalty, a float32 value
    tokens: list[int]   # generated tokens, the EOS included when it ended with one


class BeamSearch:
    """One request's beam search. Call step() after each forward pass of the live beams, fork the beams as it
    says, and call best() once a step says done."""

    def __init__(self, num_beams: int, max_new_tokens: int, eos_token_ids: Collection[int],
                 length_penalty: float = 1.0, early_stopping: bool = False, prompt_len: int = 0) -> None:
        # num_beams == 1 is greedy decoding in transformers, not a one-beam search: the engine's sampler does that.
        if num_beams < 2:
            raise ValueError(f"beam search needs num_beams >= 2, got {num_beams}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.length_penalty = float(length_penalty)
        self.early_stopping = early_stopping
        # transformers measures every length from the end of the prompt, so the prompt length changes no decision;
        # it is kept for the caller's bookkeeping only.
        self.prompt_len = prompt_len
        self.num_candidates = max(2, 1 + len(eos_token_ids)) * num_beams  # counts duplicate ids, as transformers
        self.beams: list[list[int]] = [[]]            # generated tokens of each live beam, in the caller's order
        self.scores = torch.zeros(1, dtype=torch.float32)  # each live beam's sum of logprobs
        self.finished: list[Hypothesis] = []          # at most num_beams, best first
        self.done = False

    def step(self, logprobs: torch.Tensor) -> BeamStep:
        """logprobs: [num_live, vocab] fp32 log_softmax of each live beam's next-token logits, in the order of the
        beams returned by the previous step (a single row at the first step)."""
        if self.done:
            raise RuntimeError("the beam search is over")
        if logprobs.dim() != 2 or logprobs.shape[0] != len(self.beams):
            raise ValueError(f"expected logprobs of shape [{len(self.beams)}, vocab], got {list(logprobs.shape)}")
        vocab = logprobs.shape[1]
        if vocab < self.num_candidates:
            raise ValueError(f"vocab {vocab} is smaller than the {self.num_candidates} candidates kept per step")

        totals = logprobs.float() + self.scores.to(logprobs.device)[:, None]
        values, flat = torch.topk(totals.flatten(), k=self.num_candidates)
        values = values.cpu()
        parents = (flat // vocab).tolist()
        tokens = (flat % vocab).tolist()
        generated_len = len(self.beams[0]) + 1  # all live beams have the same length: the new token included
        at_max = generated_len >= self.max_new_tokens
        stops = [at_max or token in self.eos_token_ids for token in tokens]
        # A candidate at -inf is a token a structured-output mask forbids (fewer allowed tokens than candidates):
        # never a hypothesis nor a beam.
        possible = torch.isfinite(values).tolist()

        # Finished hypotheses: only stops among the first num_beams candidates count (the rest are spares that
        # keep num_beams beams alive when the best candidates all end).
        penalized = values / (generated_len ** self.length_penalty)
        for i in range(self.num_beams):
            if stops[i] and possible[i]:
                self.finished.append(Hypothesis(penalized[i].item(), self.beams[parents[i]] + [tokens[i]]))
        self.finished = sorted(self.finished, key=lambda h: -h.score)[:self.num_beams]  # stable: older win ties

        if at_max:
            return self._finish()
        live = [i for i in range(self.num_candidates) if not stops[i] and possible[i]][:self.num_beams]
        if not live:
            return self._finish()
        self.beams = [self.beams[parents[i]] + [tokens[i]] for i in live]
        self.scores = values[live]

        if len(self.finished) == self.num_beams:
            if self.early_stopping:
                return self._finish()
            # transformers' "is done" heuristic: could the best live beam, scored at its current length, still
            # beat the worst finished hypothesis? Exact for length_penalty <= 0; with > 0 a longer beam might
            # still win, but transformers stops here, so we do too.
            best_possible = (self.scores[:1] / (generated_len ** self.length_penalty)).item()
            if not best_possible > self.finished[-1].score:
                return self._finish()
        return BeamStep(parents=[parents[i] for i in live], tokens=[tokens[i] for i in live], done=False)

    def _finish(self) -> BeamStep:
        self.done = True
        self.beams = []
        return BeamStep(parents=[], tokens=[], done=True)

    def best(self) -> list[int]:
        """The generated tokens (without the prompt) of the best hypothesis, as generate returns them (EOS included
        when it ended with EOS, no padding)."""
        if not self.done:
            raise RuntimeError("the beam search is not over yet")
        return list(self.finished[0].tokens)


class BeamGroup(Strategy):
    def __init__(self, leader: Sequence, eos_token_ids: tuple[int, ...], max_new_tokens: int) -> None:
        params: SamplingParams = leader.params
        self.search = BeamSearch(params.num_beams, max_new_tokens, eos_token_ids, params.length_penalty,
                                 params.early_stopping, len(leader.prompt_ids))
        self.leader = leader                     # the request's own sequence
        self.beams: list[Sequence] = []          # the live beams, in the search's order
        self.started = False                     # the prompt's logits went to the search

    def span(self, seq: Sequence) -> int:
        return 1 if self.beams else 0

    def members(self, seq: Sequence) -> list[Sequence]:
        return self.beams or [seq]

    @classmethod
    def accept(cls, chunks: list[ScheduledChunk], out: StepOutput, step: Step) -> None:
        by_group: dict[int, tuple[BeamGroup, dict[Sequence, ScheduledChunk]]] = {}
        for c in chunks:
            by_group.setdefault(id(c.seq.strategy), (c.seq.strategy, {}))[1][c.seq] = c
        for group, computed in by_group.values():
            rows = [computed[beam] for beam in group.beams if beam in computed]
            if rows and len(rows) == len(group.beams):
                group.advance(out.last_logits(rows), group.beams, step)
            elif group.leader in computed and computed[group.leader].yields_token and not group.started:
                # The prompt's logits start the search (once: after a preemption the beams already exist).
                group.started = True
                group.advance(out.last_logits([computed[group.leader]]), [group.leader], step)

    def advance(self, logits: torch.Tensor, seqs: list[Sequence], step: Step) -> None:
        """Feeds the live beams' (or, first, the prompt's) logits to the search; forks, extends and frees beams."""
        leader = self.leader
        # As generate: the processors (penalties, bias) act on the log-probabilities.
        result = self.search.step(step.sampler.process(logits.float().log_softmax(dim=-1), seqs))
        parents = self.beams or [leader]
        if result.done:
            for beam in self.beams:
                _drop(beam, step)
            self.beams = []
            step.emit(leader, self.search.best())
            if not leader.is_finished:
                step.finish(leader, "length")
            return
        reused: set[int] = set()
        beams: list[Sequence] = []
        for index in result.parents:
            parent = parents[index]
            if parent is not leader and index not in reused:
                reused.add(index)     # the first child continues its parent's blocks; the others copy them
                beams.append(parent)
                continue
            # A request's beams share its id (the engine retries a failed step request by request).
            child = Sequence(request_id=leader.request_id, prompt_ids=leader.prompt_ids,
                             params=leader.params, on_output=leader.on_output, output_ids=list(parent.output_ids),
                             status=SequenceStatus.RUNNING, strategy=self,
                             matcher=parent.matcher.fork() if parent.matcher is not None else None)
            step.fork(parent, child)
            beams.append(child)
        for index, parent in enumerate(parents):
            if parent is not leader and index not in reused:
                _drop(parent, step)
        for beam, token in zip(beams, result.tokens):
            beam.output_ids.append(token)
            if beam.matcher is not None:
                beam.matcher.accept(token)   # allowed by its mask: the search never keeps a -inf candidate
        self.beams = beams


def _drop(beam: Sequence, step: Step) -> None:
    """A beam that ends: its blocks and its grammar state go back."""
    step.free(beam)
    if beam.matcher is not None:
        beam.matcher.close()
        beam.matcher = None
