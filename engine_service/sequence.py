"""A request's state inside the engine: its tokens, status, block table and timings."""
from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine_service.sampling import SamplingParams

if TYPE_CHECKING:
    from engine_service.decoding.base import Strategy
    from engine_service.kv_transfer import KvExport
    from engine_service.structured_output import Matcher


@dataclass(frozen=True)
class TokenLogprobs:
    """A chosen token's log-probability under the model's distribution, and the most likely alternatives."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # (token id, logprob), most likely first


@dataclass(frozen=True)
class SequenceOutput:
    """What the step loop hands a request's caller: its new tokens, and the finish reason once it ends."""
    token_ids: list[int]
    finish_reason: str = ""                     # "" while running; "stop", "length", "abort" or "error"
    logprobs: list[TokenLogprobs] = field(default_factory=list)   # one per token id when the request asked
    queue_seconds: float | None = None          # with the first token: arrival -> first scheduled
    prefill_seconds: float | None = None        # with the first token: first scheduled -> first token


# Called from the step loop thread.
OutputCallback = Callable[[SequenceOutput], None]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RECEIVING = "receiving"      # its prompt's KV cache is on its way from a prefill engine (disaggregated serving)
    READY = "ready"              # that cache arrived whole: it waits for a place in the batch (--max-num-seqs)
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
    num_replayed: int = 0                 # trailing prompt tokens an earlier engine generated (a failover's replay)
    generator_position: int = -1          # the position its generator was last keyed for (engine_service.sampler)
    strategy: Strategy | None = None      # its decoding strategy (engine_service.decoding), set by the engine
    num_steps: int = 0                    # forward passes that computed this sequence (speculative bookkeeping)
    export: KvExport | None = None        # a prefill engine's: sends its blocks to a decode engine as computed
    matcher: Matcher | None = None        # its structured-output constraint's state (engine_service.structured_output)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def generated_ids(self) -> list[int]:
        """Every token generated for the request, on this engine or (replayed) on an earlier one."""
        replayed = self.prompt_ids[len(self.prompt_ids) - self.num_replayed:] if self.num_replayed else []
        return replayed + self.output_ids

    def token_at(self, position: int) -> int:
        prompt_len = len(self.prompt_ids)
        return self.prompt_ids[position] if position < prompt_len else self.output_ids[position - prompt_len]

    def tokens(self, start: int, end: int) -> list[int]:
        if end <= len(self.prompt_ids):
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]

    def append_token(self, token: int, logprobs: TokenLogprobs | None, now: float, eos_token_ids: tuple[int, ...],
                     max_context: int) -> SequenceOutput:
        """Appends a token generated at `now`: the output to deliver, ending the sequence if its finish_reason is
        set (the first token also carries the time queued and in prefill)."""
        self.output_ids.append(token)
        timings = {}
        if self.first_token_time is None:
            self.first_token_time = now
            timings = {"queue_seconds": self.first_scheduled_time - self.arrival_time,
                       "prefill_seconds": now - self.first_scheduled_time}
        return SequenceOutput([token], self.stop_reason(eos_token_ids, max_context),
                              [logprobs] if logprobs is not None else [], **timings)

    def stop_reason(self, eos_token_ids: tuple[int, ...], max_context: int) -> str:
        """Why the sequence ends after its last token: "stop", "length", or "" (it goes on)."""
        token, params = self.output_ids[-1], self.params
        if (not params.ignore_eos and token in eos_token_ids) or token in params.stop_token_ids:
            return "stop"
        if len(self.output_ids) >= params.max_tokens or self.num_tokens >= max_context:
            return "length"
        return ""

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
