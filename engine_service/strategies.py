"""Decoding strategies that guess several rows per step: speculative decoding (prompt lookup or a draft model),
lookahead decoding and contrastive search.

A strategy owns one sequence's extra state. Each step the engine asks it for a `DraftTree` (the rows to compute
after the cached context), runs them in the batched forward pass with everything else, and hands the rows' logits
back to `accept`, which says which tokens are new and which rows' keys/values become the sequence's next positions.
The scheduler only needs `span`: how many positions past the cached ones the step may write.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_service.beam_search import BeamSearch
from engine_service.drafting import Accepted, DraftTree, Lookahead, accept_greedy, chain, prompt_lookup
from engine_service.kv_cache import BlockManager
from engine_service.sampler import Sampler, token_logprobs
from engine_service.sampling import SamplingParams
from engine_service.sequence import Sequence, TokenLogprobs

DEFAULT_SPECULATIVE_TOKENS = 5
DEFAULT_PROMPT_LOOKUP_NGRAM = 3
DEFAULT_LOOKAHEAD_WINDOW = 5
DEFAULT_LOOKAHEAD_NGRAM = 4
MAX_CONTRASTIVE_TOP_K = 64


@dataclass
class StepResult:
    tokens: list[int]                    # new tokens, in order
    kv_rows: list[int]                   # rows whose keys/values are positions start, start + 1, ... of the sequence
    logprobs: list[TokenLogprobs | None]  # one per token when the request asked for them
    drafted: int = 0                     # guesses this step verified (speculative, lookahead), for the metrics


def _logprobs(seq: Sequence, raw: torch.Tensor, tokens: list[int]) -> list[TokenLogprobs | None]:
    """raw: [len(tokens), vocab] unprocessed logits of the rows that produced each token."""
    if seq.params.logprobs is None:
        return [None] * len(tokens)
    return list(token_logprobs(raw, tokens, [seq.params.logprobs] * len(tokens)))


class Strategy:
    """One sequence's multi-row decoding. `plan` may return None: this step is a plain decode."""
    consumes_prefill = False   # True: the prompt's last logits go to after_prefill, not to the sampler
    wants_hidden = False       # True: the runner returns the hidden states of the sequence's prefill rows

    def span(self, seq: Sequence) -> int:
        """Positions past seq.num_computed the next step may write; 0 when it is not a strategy step."""
        raise NotImplementedError

    def plan(self, seq: Sequence, sampler: Sampler) -> DraftTree | None:
        raise NotImplementedError

    def accept(self, seq: Sequence, tree: DraftTree, logits: torch.Tensor, hidden: torch.Tensor | None,
               sampler: Sampler) -> StepResult:
        raise NotImplementedError

    def after_prefill(self, seq: Sequence, logits: torch.Tensor, hidden: torch.Tensor | None, start: int) -> None:
        """Sees every prefill chunk when wants_hidden (its hidden states); logits only on the chunk that ends
        the prompt."""


def _decoding(seq: Sequence) -> bool:
    """Past the prompt, with every token but the last in the KV cache: the next step may guess."""
    return bool(seq.output_ids) and seq.num_computed == seq.num_tokens - 1


def _room(seq: Sequence, context: int) -> int:
    """New tokens the sequence may still produce (its max_tokens and the model's context)."""
    return max(0, min(seq.params.max_tokens - len(seq.output_ids), context - seq.num_tokens))


class Speculative(Strategy):
    """Guess k tokens, verify them in one forward pass of the target: prompt lookup (n-grams copied from the
    context) or a draft model whose guesses the engine computes first (`drafts` is set before plan).

    Greedy requests accept a guess when it equals the target's choice (output identical to plain greedy);
    sampled ones use Leviathan et al.'s rule: accept guess d with probability min(1, p(d) / q(d)), on rejection
    draw from max(p - q, 0) renormalised, so the tokens follow the target distribution p exactly."""

    def __init__(self, mode: str, num_tokens: int, max_ngram: int, context: int) -> None:
        self.mode = mode
        self.num_tokens = num_tokens or DEFAULT_SPECULATIVE_TOKENS
        self.max_ngram = max_ngram or DEFAULT_PROMPT_LOOKUP_NGRAM
        self.context = context
        self.drafts: list[int] = []                  # the draft model's guesses for this step
        self.draft_probs: torch.Tensor | None = None  # [len(drafts), vocab]: q of each guess (sampled requests)

    def span(self, seq: Sequence) -> int:
        return 1 + self.num_tokens if _decoding(seq) else 0

    def max_drafts(self, seq: Sequence) -> int:
        # The last accepted row also yields a bonus token, so k guesses can give k + 1 tokens.
        return max(0, min(self.num_tokens, _room(seq, self.context) - 1))

    def plan(self, seq: Sequence, sampler: Sampler) -> DraftTree | None:
        if self.mode == "prompt_lookup":
            self.drafts = prompt_lookup(seq.prompt_ids + seq.output_ids, self.max_ngram, self.max_drafts(seq))
            self.draft_probs = None
        if not self.drafts:
            return None
        return chain(seq.output_ids[-1], self.drafts)

    def accept(self, seq: Sequence, tree: DraftTree, logits: torch.Tensor, hidden: torch.Tensor | None,
               sampler: Sampler) -> StepResult:
        drafts = tree.tokens[1:]
        rows = [seq] * len(tree.tokens)
        processed = sampler.process(logits, rows, [drafts[:i] for i in range(len(tree.tokens))])
        if seq.params.greedy:
            result = accept_greedy(tree, processed.argmax(dim=-1).tolist())
            tokens, kv_rows = result.tokens, result.kv_rows
        else:
            tokens = self._accept_sampled(seq, drafts, processed.softmax(dim=-1), sampler)
            kv_rows = list(range(len(tokens)))
        return StepResult(tokens, kv_rows, _logprobs(seq, logits[: len(tokens)], tokens), drafted=len(drafts))

    def _accept_sampled(self, seq: Sequence, drafts: list[int], probs: torch.Tensor, sampler: Sampler) -> list[int]:
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


class LookaheadStrategy(Strategy):
    """Lookahead decoding (Fu et al., 2023) through engine_service.drafting.Lookahead: greedy only."""

    def __init__(self, window: int, ngram: int, num_verify: int, context: int) -> None:
        self.window = window or DEFAULT_LOOKAHEAD_WINDOW
        self.ngram = ngram or DEFAULT_LOOKAHEAD_NGRAM
        self.lookahead = Lookahead(self.window, self.ngram, num_verify or DEFAULT_SPECULATIVE_TOKENS)
        self.context = context

    def span(self, seq: Sequence) -> int:
        return 1 + self.window + self.ngram if _decoding(seq) else 0

    def plan(self, seq: Sequence, sampler: Sampler) -> DraftTree | None:
        if _room(seq, self.context) < 2:
            return None
        tree = self.lookahead.plan(seq.prompt_ids + seq.output_ids)
        if max(tree.offsets) >= self.span(seq):
            raise RuntimeError(f"lookahead tree reaches offset {max(tree.offsets)}, past its span {self.span(seq)}")
        return tree

    def accept(self, seq: Sequence, tree: DraftTree, logits: torch.Tensor, hidden: torch.Tensor | None,
               sampler: Sampler) -> StepResult:
        processed = sampler.process(logits, [seq] * len(tree.tokens))
        result: Accepted = self.lookahead.accept(tree, processed.argmax(dim=-1).tolist())
        return StepResult(result.tokens, result.kv_rows, _logprobs(seq, logits[result.kv_rows], result.tokens),
                          drafted=len(tree.tokens) - 1)


class Contrastive(Strategy):
    """Contrastive search (Su et al., 2022): among the top-k tokens of the model's distribution, take
    argmax (1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j), where h_v is the candidate's last hidden state and
    h_j those of every token before it. The k candidates are one tree of rows at the same position (each sees the
    context and itself); the chosen one's keys/values are kept, and its logits give the next candidates, so the
    whole sequence, last token included, is always in the KV cache."""
    consumes_prefill = True
    wants_hidden = True

    def __init__(self, alpha: float, top_k: int) -> None:
        self.alpha = alpha
        self.top_k = top_k
        self.next_logits: torch.Tensor | None = None    # [vocab]: the distribution of the next token
        self.hidden: list[torch.Tensor] = []             # [n, hidden] per computed chunk, in position order
        self.candidate_probs: torch.Tensor | None = None

    def span(self, seq: Sequence) -> int:
        return 1 if self.next_logits is not None and seq.num_computed == seq.num_tokens else 0

    def after_prefill(self, seq: Sequence, logits: torch.Tensor | None, hidden: torch.Tensor | None,
                      start: int) -> None:
        if start == 0:
            self.hidden = []
            self.next_logits = None
        if hidden is not None:
            self.hidden.append(hidden.float())
        if logits is not None:
            self.next_logits = logits

    def plan(self, seq: Sequence, sampler: Sampler) -> DraftTree | None:
        assert self.next_logits is not None
        # The model's distribution after the request's own processors (penalties, bias), as generate does.
        processed = sampler.process(self.next_logits.unsqueeze(0), [seq])[0]
        top = processed.softmax(dim=-1).topk(self.top_k)
        self.candidate_probs = top.values
        k = self.top_k
        return DraftTree(tokens=top.indices.tolist(), offsets=[0] * k,
                         mask=[[i == j for j in range(k)] for i in range(k)])

    def accept(self, seq: Sequence, tree: DraftTree, logits: torch.Tensor, hidden: torch.Tensor | None,
               sampler: Sampler) -> StepResult:
        assert hidden is not None and self.candidate_probs is not None and self.next_logits is not None
        chosen = contrastive_choice(self.candidate_probs, hidden.float(), torch.cat(self.hidden), self.alpha)
        token = tree.tokens[chosen]
        logprobs = _logprobs(seq, self.next_logits.unsqueeze(0), [token])
        self.hidden.append(hidden[chosen: chosen + 1].float())
        self.next_logits = logits[chosen]
        return StepResult([token], [chosen], logprobs)


def contrastive_choice(probs: torch.Tensor, candidates: torch.Tensor, context: torch.Tensor, alpha: float) -> int:
    """probs [k] of the candidates, their hidden states [k, H], the context's [L, H] -> the chosen row."""
    unit_candidates = candidates / candidates.norm(dim=-1, keepdim=True)
    unit_context = context / context.norm(dim=-1, keepdim=True)
    degeneration = (unit_candidates @ unit_context.T).max(dim=-1).values
    return int(((1 - alpha) * probs - alpha * degeneration).argmax())


class BeamGroup(Strategy):
    """Beam search: the request's sequence prefills the prompt; then its beams, sequences of their own that share
    the prompt's blocks, decode side by side in the batched forward pass, and engine_service.beam_search decides
    after each step which continue (the engine forks and frees their blocks). The text arrives when it ends."""
    consumes_prefill = True

    def __init__(self, params: SamplingParams, eos_token_ids: tuple[int, ...], max_new_tokens: int,
                 prompt_len: int) -> None:
        self.search = BeamSearch(params.num_beams, max_new_tokens, eos_token_ids, params.length_penalty,
                                 params.early_stopping, prompt_len)
        self.beams: list[Sequence] = []          # the live beams, in the search's order
        self.leader: Sequence | None = None      # the request's own sequence (set by the engine)
        self.started = False                     # the prompt's logits went to the search

    def span(self, seq: Sequence) -> int:
        return 1 if self.beams else 0

    def release(self, blocks: BlockManager) -> None:
        for beam in self.beams:
            blocks.free(beam)
        self.beams = []


def make_strategy(params: SamplingParams, context: int, draft_layers: int, eos_token_ids: tuple[int, ...] = (),
                  prompt_len: int = 0) -> Strategy | None:
    """The strategy a request asks for (None: plain sampling or greedy). Raises ValueError when the engine
    cannot serve it."""
    if params.num_beams > 1:
        return BeamGroup(params, () if params.ignore_eos else eos_token_ids + params.stop_token_ids,
                         min(params.max_tokens, context - prompt_len), prompt_len)
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
                           context)
    return None
