"""Draft proposers for greedy speculative decoding: prompt lookup, lookahead decoding, and the rule that accepts them.

Pure logic, no model. Each step the engine asks for a `DraftTree`, runs ONE forward pass over its rows (row 0 is
the sequence's last token, the only one not yet in the KV cache), takes the argmax of every row and asks
`accept_greedy` (or `Lookahead.accept`) which tokens are new. The output is token-identical to plain greedy
decoding because a row's token is accepted only if it equals the argmax of its parent row, and a row attends
exactly the cached context plus its ancestors in the tree, at contiguous positions, so the parent's argmax is
what plain greedy would have produced there.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class DraftTree:
    tokens: list[int]             # row 0 = context[-1]
    offsets: list[int]            # position of each row minus the position of row 0 (row 0: 0)
    mask: list[list[bool]]        # mask[i][j]: row i attends row j (j <= i, mask[i][i] True, all rows attend row 0)

    def parent(self, row: int) -> int:
        """The row's predecessor on its path: the attended row one position earlier (row 0 has none: -1)."""
        if row == 0:
            return -1
        for j in range(row - 1, -1, -1):
            if self.mask[row][j] and self.offsets[j] == self.offsets[row] - 1:
                return j
        raise ValueError(f"row {row} attends no row at the position before its own")


@dataclass
class Accepted:
    tokens: list[int]             # new tokens, >= 1; tokens[0] is always argmax of row 0 (plain greedy decoding)
    kv_rows: list[int]            # rows whose keys/values must be kept, in position order: [0] + the rows of tokens[:-1]


def chain(context_last: int, drafts: list[int]) -> DraftTree:
    """Linear drafts after the last token: row i sits at offset i and attends rows 0..i (a causal mask)."""
    n = 1 + len(drafts)
    return DraftTree(tokens=[context_last, *drafts], offsets=list(range(n)),
                     mask=[[j <= i for j in range(n)] for i in range(n)])


def accept_greedy(tree: DraftTree, argmax: list[int]) -> Accepted:
    """The longest path from row 0 whose every token equals the argmax of its parent row, plus the bonus token
    (the argmax of the path's last row). For a chain this is the usual greedy speculative rule.

    Ties between equally long paths go to the lowest row index, so the answer does not depend on anything but the
    tree and the argmax.
    """
    if len(argmax) != len(tree.tokens):
        raise ValueError(f"{len(argmax)} argmax values for {len(tree.tokens)} rows")
    # Parents precede children (mask[i][j] only for j <= i), so one pass in row order decides every row.
    accepted = [True] + [False] * (len(tree.tokens) - 1)
    best = 0
    for row in range(1, len(tree.tokens)):
        parent = tree.parent(row)
        accepted[row] = accepted[parent] and tree.tokens[row] == argmax[parent]
        if accepted[row] and tree.offsets[row] > tree.offsets[best]:
            best = row
    path = [best]
    while path[-1] != 0:
        path.append(tree.parent(path[-1]))
    path.reverse()                # row 0 first, in position order
    return Accepted(tokens=[tree.tokens[row] for row in path[1:]] + [argmax[best]], kv_rows=path)


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
        self._tree = DraftTree(tokens=tokens, offsets=offsets, mask=_ancestor_mask(parents))
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


def _ancestor_mask(parents: list[int]) -> list[list[bool]]:
    """Each row attends itself and its ancestors."""
    mask = []
    for row, parent in enumerate(parents):
        attended = [False] * len(parents)
        attended[row] = True
        if parent >= 0:
            attended[:row] = mask[parent][:row]
            attended[parent] = True
        mask.append(attended)
    return mask
