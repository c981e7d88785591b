"""Draft trees: the rows a guessing strategy (speculative, lookahead, contrastive) adds to a step, and the greedy
rule that accepts them.

Pure logic, no model. A strategy proposes a `DraftTree`, the step runs ONE forward pass over its rows (row 0 is
the sequence's last token, the only one not yet in the KV cache), and `accept_greedy` says from the argmax of
every row which tokens are new. The output is token-identical to plain greedy decoding because a row's token is
accepted only if it equals the argmax of its parent row, and a row attends exactly the cached context plus its
ancestors in the tree, at contiguous positions, so the parent's argmax is what plain greedy would have produced
there. A linear chain is written at its own positions in the cache; other trees (several guesses per position)
go through scratch slots until accepted.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DraftTree:
    tokens: list[int]             # row 0 = context[-1]
    offsets: list[int]            # position of each row minus the position of row 0 (row 0: 0)
    mask: list[list[bool]]        # mask[i][j]: row i attends row j (j <= i, mask[i][i] True, all rows attend row 0)

    @property
    def in_place(self) -> bool:
        """A linear run of guesses (offsets 0, 1, 2... each attending all before it): its rows are written at
        their own positions; other trees go through scratch slots until accepted."""
        n = len(self.tokens)
        return self.offsets == list(range(n)) and all(self.mask[i][j] == (j <= i) for i in range(n) for j in range(n))

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
    kv_rows: list[int]            # rows whose keys/values are kept, in position order: [0] + the rows of tokens[:-1]


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


def ancestor_mask(parents: list[int]) -> list[list[bool]]:
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
