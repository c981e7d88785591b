"""Who runs in the next step: decodes first, then chunks of waiting prompts within a per-step token budget.

When the KV cache has no block for a running sequence, the youngest running sequence is preempted (its blocks
freed, its tokens recomputed later) instead of failing a request. Never touches tensors.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from engine_service.kv_cache import BlockManager
from engine_service.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int          # first position computed in this step
    end: int            # one past the last
    # Set by the engine for a decoding strategy's step (speculative, lookahead, contrastive): rows of guessed
    # tokens at positions start + offsets, with their own attention mask among themselves (a DraftTree).
    tree: Any = None
    want_hidden: bool = False   # the runner returns the final hidden state of every row (contrastive search)
    # Filled by the runner: a tree's logits for every row, the hidden states, and the cache slots written.
    logits: Any = None
    hidden: Any = None
    slots: Any = None

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the end of the sequence, so its last logits give the next token."""
        return self.tree is None and self.end == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.start > 0 and self.end - self.start == 1


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order: the last is the youngest
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0      # prompt tokens looked up in the prefix cache / found there
        self.prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Removes seq wherever it is and frees its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        # 1. Running sequences: decodes, and the rest of prompts already being prefilled in chunks.
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            # A strategy step (speculative, lookahead, contrastive) writes up to `span` positions past the cache.
            span = seq.strategy.span(seq) if seq.strategy is not None else 0
            end = seq.num_computed + 1 if span else min(seq.num_tokens, seq.num_computed + budget)
            needed = seq.num_computed + span if span else end
            while not self.blocks.can_allocate(seq, needed):
                victim = self.running[-1]
                self._preempt(victim)   # the youngest is never before seq in the list: it has no chunk yet
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.blocks.allocate(seq, needed)
            chunks.append(ScheduledChunk(seq, seq.num_computed, end))
            budget = max(0, budget - (span or end - seq.num_computed))
        # 2. Waiting sequences, oldest first, while the budget, the sequence limit and the free blocks allow.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._prefix_in_flight(seq):
                break
            # Contrastive search needs every context token's hidden state, which the prefix cache does not keep.
            queried = 0 if seq.strategy is not None and seq.strategy.wants_hidden else self.blocks.match_prefix(seq)
            end = min(seq.num_tokens, seq.num_computed + budget)
            if not self.blocks.can_allocate(seq, end):
                self.blocks.free(seq)
                break
            self.prefix_queried_tokens += queried
            self.prefix_hit_tokens += seq.num_computed
            self.waiting.popleft()
            self.blocks.allocate(seq, end)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.perf_counter()
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, end))
            budget -= end - seq.num_computed
        return chunks

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """True while a running sequence is still computing full blocks of seq's prompt: seq waits and then takes
        them from the prefix cache instead of computing them twice (n > 1 completions of one prompt, a burst of
        requests sharing a system prompt)."""
        if not self.blocks.prefix_caching:
            return False
        size = self.blocks.block_size
        for other in self.running:
            if other.num_computed >= len(other.prompt_ids):
                continue
            shared = 0
            for a, b in zip(seq.prompt_ids, other.prompt_ids):
                if a != b:
                    break
                shared += 1
            if min(shared, seq.num_tokens - 1) // size * size > other.num_computed:
                return True
        return False

    def _preempt(self, seq: Sequence) -> None:
        """Frees seq's blocks and puts it back at the head of the queue; its tokens are recomputed later."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
