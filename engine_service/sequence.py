"""A request's state inside the engine: its tokens, status, block table and timings."""
from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine_service.sampling import SamplingParams


@dataclass(frozen=True)
class TokenLogprobs:
    """A chosen token's log-probability under the model's distribution, and the most likely alternatives."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # (token id, logprob), most likely first


# Called from the step loop with the new token ids, the finish reason ("" while running) and, when the request
# asked for them, one TokenLogprobs per token id (else an empty list).
OutputCallback = Callable[[list[int], str, list[TokenLogprobs]], None]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: OutputCallback
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # prefix-cache keys of the full blocks, in order
    num_computed: int = 0                 # tokens whose keys/values are in the KV cache
    finish_reason: str = ""
    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    generator: torch.Generator | None = None
    strategy: Any = None                  # a multi-row decoding strategy (engine_service.strategies), or None
    num_steps: int = 0                    # forward passes that computed this sequence (speculative bookkeeping)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, position: int) -> int:
        prompt_len = len(self.prompt_ids)
        return self.prompt_ids[position] if position < prompt_len else self.output_ids[position - prompt_len]

    def tokens(self, start: int, end: int) -> list[int]:
        if end <= len(self.prompt_ids):
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
