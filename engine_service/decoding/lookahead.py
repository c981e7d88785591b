"""Lookahead decoding (Fu et al., 2023): greedy only, output identical to plain greedy. `Lookahead` is the pure
algorithm (the Jacobi window and the n-gram pool, no model); `LookaheadStrategy` runs it in the engine's step."""
from __future__ import annotations

import random
from typing import TYPE_CHECKING

from engine_service.decoding.base import Guessing, Step, StepResult, decoding, logprobs_of, room
from engine_service.decoding.speculative import DEFAULT_SPECULATIVE_TOKENS
from engine_service.decoding.tree import Accepted, DraftTree, accept_greedy, ancestor_mask
from engine_service.scheduler import ScheduledChunk
from engine_service.sequence import Sequence

if TYPE_CHECKING:
    from engine_service.model_runner import StepOutput

DEFAULT_LOOKAHEAD_WINDOW = 5
DEFAULT_LOOKAHEAD_NGRAM = 4


class LookaheadStrategy(Guessing):
    def __init__(self, window: int, ngram: int, num_verify: int, context: int) -> None:
        self.window = window or DEFAULT_LOOKAHEAD_WINDOW
        self.ngram = ngram or DEFAULT_LOOKAHEAD_NGRAM
        self.lookahead = Lookahead(self.window, self.ngram, num_verify or DEFAULT_SPECULATIVE_TOKENS)
        self.context = context

    def span(self, seq: Sequence) -> int:
        return 1 + self.window + self.ngram if decoding(seq) else 0

    def scratch_rows(self, seq: Sequence) -> int:
        return self.lookahead.max_rows(seq.output_ids[-1]) if self.span(seq) else 0

    def guess(self, seq: Sequence, step: Step) -> DraftTree | None:
        if room(seq, self.context) < 2:
            return None
        tree = self.lookahead.plan(seq.prompt_ids + seq.output_ids)
        if max(tree.offsets) >= self.span(seq):
            raise RuntimeError(f"lookahead tree reaches offset {max(tree.offsets)}, past its span {self.span(seq)}")
        return tree

    def verify(self, chunk: ScheduledChunk, out: StepOutput, step: Step) -> StepResult:
        seq, tree = chunk.seq, chunk.tree
        logits = out.logits_of(chunk)
        processed = step.sampler.process(logits, [seq] * len(tree.tokens))
        result: Accepted = self.lookahead.accept(tree, processed.argmax(dim=-1).tolist())
        return StepResult(result.tokens, result.kv_rows, logprobs_of(seq, logits[result.kv_rows], result.tokens),
                          guesses=len(tree.tokens) - 1)


class Lookahead:
    """Lookahead decoding (Fu et al., 2023, "Break the Sequential Dependency of LLM Inference Using Lookahead
    Decoding"): a Jacobi window of W future positions iterated N-1 times collects n-grams into a pool; n-grams in
    the pool that start with the last token are verified in the same forward pass. Greedy output identical to
    plain greedy.

    The window follows the authors' LADE code. It has N-1 levels of past Jacobi guesses; level l, column i holds a
    guess for offset l+i (level 0 keeps columns 1..W-1: its column 0 is row 0 itself, the last real token). The
    row of level l, column i attends row 0, level 0 columns 1..i and levels 1..l of column i: a path of contiguous
    offsets 0..l+i, so every window row is a valid tree row and its argmax is a Jacobi update for offset l+i+1.
    Each forward:
    - the argmax of the top level's rows (plus row 0 while level 0 is the top) becomes a new level;
    - once the window is full, column i read top to bottom plus its new argmax is an N-gram
      (key = the column's level-0 token, or row 0 for column 0) entering the pool;
    - the window slides one position (as LADE's default does, whatever the number of tokens accepted): a full
      window drops its oldest level, a filling one drops the first column of every level.
    Verification branch: the pool's most recent `max_verify` n-grams keyed by row 0's token, merged into a prefix
    tree at offsets 1..N-1, each row attending row 0 and its prefix.
    Acceptance is `accept_greedy` over the whole tree: a window row whose path matches greedy is accepted too,
    which is plain Jacobi decoding's own acceptance and exact for the same reason.
    Initial guesses are tokens drawn from the context with a fixed seed (LADE's default `copy_from`), as many as
    needed for the levels to shrink to their full size while the window fills (W+N-3).
    """

    def __init__(self, window: int, ngram: int, max_verify: int) -> None:
        if window < 1 or ngram < 2 or max_verify < 0:
            raise ValueError(f"need window >= 1, ngram >= 2, max_verify >= 0; got {window}, {ngram}, {max_verify}")
        self.window = window
        self.ngram = ngram
        self.max_verify = max_verify
        self.levels: list[list[int]] = []            # [] until the first plan
        self.pool: dict[int, list[tuple[int, ...]]] = {}  # first token -> the n-grams' other N-1 tokens, oldest first
        self._random = random.Random(0)              # fixed seed: the same prompt plans the same trees
        self._tree: DraftTree | None = None
        self._window_rows: list[list[int]] = []      # tree row of each window entry, same shape as levels

    def max_rows(self, last_token: int) -> int:
        """Rows of the next plan at most (n-grams sharing a start share rows): its scratch-slot reservation."""
        window = sum(map(len, self.levels)) if self.levels else self.window + self.ngram - 3
        candidates = self.pool.get(last_token, [])
        return 1 + window + sum(map(len, candidates[max(0, len(candidates) - self.max_verify):]))

    def plan(self, context: list[int]) -> DraftTree:
        """Lookahead branch (the window) and verification branch (pool n-grams after context[-1]) in one tree."""
        if not self.levels:
            self.levels = [[self._random.choice(context) for _ in range(self.window + self.ngram - 3)]]
        tokens, offsets, parents = [context[-1]], [0], [-1]
        # Level 0 lacks column 0: that position is row 0. Along level 0 a row follows its left neighbour; above it,
        # the row below it in its column.
        row_at = {(0, 0): 0}
        self._window_rows = []
        for level, guesses in enumerate(self.levels):
            first = 1 if level == 0 else 0
            for column, token in enumerate(guesses, start=first):
                row_at[level, column] = len(tokens)
                tokens.append(token)
                offsets.append(level + column)
                parents.append(row_at[(0, column - 1) if level == 0 else (level - 1, column)])
            self._window_rows.append([row_at[level, c] for c in range(first, first + len(guesses))])
        # Verification branch: a prefix tree of the candidates, so n-grams that share a start share rows.
        children: dict[tuple[int, int], int] = {}    # (parent row, token) -> row
        candidates = self.pool.get(context[-1], [])
        for gram in candidates[max(0, len(candidates) - self.max_verify):]:   # the most recent max_verify
            parent = 0
            for token in gram:
                if (parent, token) not in children:
                    children[parent, token] = len(tokens)
                    tokens.append(token)
                    offsets.append(offsets[parent] + 1)
                    parents.append(parent)
                parent = children[parent, token]
        self._tree = DraftTree(tokens=tokens, offsets=offsets, mask=ancestor_mask(parents))
        return self._tree

    def accept(self, tree: DraftTree, argmax: list[int]) -> Accepted:
        """Accepts like `accept_greedy`, then feeds the window's new guesses to the pool and slides the window."""
        if tree is not self._tree:
            raise ValueError("accept() needs the tree of the latest plan()")
        accepted = accept_greedy(tree, argmax)
        top = len(self.levels) - 1
        new_level = [argmax[row] for row in self._window_rows[top]]
        if top == 0:
            new_level.insert(0, argmax[0])          # level 0's column 0 is row 0
        if len(self.levels) == self.ngram - 1:      # full window: every column yields an N-gram
            for column in range(self.window):
                key = tree.tokens[0] if column == 0 else self.levels[0][column - 1]
                rest = tuple(self.levels[level][column] for level in range(1, len(self.levels)))
                self._remember(key, rest + (new_level[column],))
        self.levels.append(new_level)
        if len(self.levels) > self.ngram - 1:       # slide: drop the oldest level; level 1 becomes level 0
            self.levels = self.levels[1:]
            self.levels[0] = self.levels[0][1:]
        else:                                       # still filling: slide every level by one column
            self.levels = [guesses[1:] for guesses in self.levels]
        self._tree = None
        return accepted

    def _remember(self, key: int, gram: tuple[int, ...]) -> None:
        # Most recent last; a repeated n-gram moves to the end; at most max_verify per key (LADE's LRU guess set),
        # so the pool's whole list for a key is what one step verifies.
        if self.max_verify == 0:
            return
        grams = self.pool.setdefault(key, [])
        if gram in grams:
            grams.remove(gram)
        grams.append(gram)
        if len(grams) > self.max_verify:
            del grams[0]
