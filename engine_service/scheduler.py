"""Who runs in the next step: decodes first, then chunks of waiting prompts within a per-step token budget.

A decoding strategy's step reserves what it may write: `span` positions past the cache for each of its `members`
(a request's own sequence, or its beams), and `scratch_rows` of the KV cache's scratch slots (guesses that share a
position); a step whose scratch rows are taken waits for the next one. When the KV cache has no block for a
running sequence, the youngest running sequence is preempted (its blocks freed, its tokens recomputed later)
instead of failing a request. Never touches tensors.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine_service.kv_cache import BlockManager
from engine_service.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from engine_service.decoding.tree import DraftTree


@dataclass(eq=False)
class ScheduledChunk:
    """Positions [start, end) of one sequence to compute in a step. What the model computed comes back in the
    model runner's StepOutput; a chunk is never written to after it is made (strategies `replace` it)."""
    seq: Sequence
    start: int          # first position computed in this step
    end: int            # one past the last
    # A decoding strategy's guesses (speculative, lookahead, contrastive): rows of tokens at positions
    # start + offsets, with their own attention mask among themselves.
    tree: DraftTree | None = None
    want_hidden: bool = False   # the runner returns the final hidden state of every row (contrastive search)
    # The chunk reaches the end of its sequence: its last row's logits give the next token.
    yields_token: bool = field(init=False)

    def __post_init__(self) -> None:
        self.yields_token = self.tree is None and self.end == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.start > 0 and self.end - self.start == 1


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    matchers: int = 0       # structured output's grammar matchers held (the engine fills it in)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 scratch_slots: int = 0) -> None:
        self.blocks = blocks
        self.scratch_slots = scratch_slots  # the KV cache's slots for guesses that share a position, per step
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order: the last is the youngest
        self.ready: deque[Sequence] = deque()   # received prompts (their blocks held), waiting for a place to run
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0      # prompt tokens looked up in the prefix cache / found there
        self.prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.ready)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.running), waiting=len(self.waiting) + len(self.ready),
                           kv_blocks_total=self.blocks.num_blocks, kv_blocks_used=self.blocks.num_used)

    def join_running(self, seq: Sequence) -> None:
        """seq's prompt is in the cache already (its KV blocks received from a prefill engine): it runs from the
        next step that has a place for it. Received prompts count against max_num_seqs as any other: they wait,
        in arrival order and ahead of prompts still to prefill, while the batch is full."""
        seq.num_computed = seq.num_tokens
        self.blocks.register_full_blocks(seq)
        seq.status = SequenceStatus.READY
        self.ready.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Removes seq wherever it is and frees its blocks (and its beams')."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.READY:
            self.ready.remove(seq)
        # RECEIVING: in neither queue until its transferred KV cache is complete (Scheduler.join_running)
        for member in seq.strategy.members(seq):
            self.blocks.free(member)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> list[ScheduledChunk]:
        if self.ready:
            rows = sum(_width(seq) for seq in self.running)
            while self.ready and rows + _width(self.ready[0]) <= self.max_num_seqs:
                seq = self.ready.popleft()
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                rows += _width(seq)
        budget = self.max_num_batched_tokens
        scratch = self.scratch_slots
        chunks: list[ScheduledChunk] = []
        # 1. Running sequences: decodes, and the rest of prompts already being prefilled in chunks.
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            # A strategy step (speculative, lookahead, contrastive, beams) writes up to `span` positions past the
            # cache of each of its members; (member, positions to hold, chunk end) of each.
            span = seq.strategy.span(seq)
            rows = seq.strategy.scratch_rows(seq) if span else 0
            if rows > scratch:
                continue    # this step's scratch slots are taken: it waits for the next step
            if span:
                wanted = [(m, m.num_computed + span, m.num_computed + 1) for m in seq.strategy.members(seq)]
            else:
                end = min(seq.num_tokens, seq.num_computed + budget)
                wanted = [(seq, end, end)]
            while sum(self.blocks.blocks_needed(m, needed) for m, needed, _ in wanted) > self.blocks.num_free:
                victim = self.running[-1]
                self._preempt(victim)   # the youngest is never before seq in the list: it has no chunk yet
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            for member, needed, end in wanted:
                self.blocks.allocate(member, needed)
                chunks.append(ScheduledChunk(member, member.num_computed, end))
                budget = max(0, budget - (span or end - member.num_computed))
            scratch -= rows
        # 2. Waiting sequences, oldest first, while the budget, the sequence limit (a beam search counts its beams)
        #    and the free blocks allow.
        rows = sum(_width(seq) for seq in self.running) if self.waiting else 0
        while self.waiting and not self.ready and budget > 0 and rows + _width(self.waiting[0]) <= self.max_num_seqs:
            seq = self.waiting[0]
            if self._prefix_in_flight(seq):
                break
            queried = self.blocks.match_prefix(seq) if seq.strategy.prefix_cacheable else 0
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
            rows += _width(seq)
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


def _width(seq: Sequence) -> int:
    """Rows the sequence takes in a step, now or once its strategy starts: its beams (num_beams is 1 without)."""
    return seq.params.num_beams
