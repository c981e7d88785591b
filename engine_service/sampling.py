"""The engine's view of a request's decoding parameters (validated by the gateway; re-checked here)."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.decoding import (MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_TOKEN_IDS, is_greedy, range_error,
                             strategy_error, structured_output_error)


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on the generated text; hashable: it is the key of the engine's compile cache."""
    kind: str                             # one of common.decoding.STRUCTURED_KINDS
    value: str | bool | tuple[str, ...]   # the schema, regex or grammar text; True (json_object); the choices

    def error(self) -> str | None:
        return structured_output_error(self.kind, self.value)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None       # None: none; 0: the chosen token's; N: also the top N alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit)
    # Decoding strategy (at most one): beam search, contrastive search, or a speculative mode.
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    penalty_alpha: float = 0.0        # contrastive search when > 0 (with top_k candidates)
    speculative: str = ""             # "", "prompt_lookup", "draft", "lookahead"
    num_speculative_tokens: int = 0   # 0 = the engine's default
    prompt_lookup_max_ngram: int = 0  # 0 = default
    lookahead_window: int = 0         # 0 = default
    lookahead_ngram: int = 0          # 0 = default
    structured_output: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)

    def validate(self) -> None:
        """Rejects what would corrupt engine state or crash a step; the gateway gives users nicer messages."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        if any(token < 0 for token, _ in self.logit_bias):
            raise ValueError("logit_bias keys must be non-negative token ids")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS}")
        if any(token < 0 for token in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative token ids")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if (problem := range_error(self) or strategy_error(self)) is not None:
            raise ValueError(problem)
        if self.structured_output is not None and (problem := self.structured_output.error()) is not None:
            raise ValueError(problem)
        if self.penalty_alpha > 0 and self.top_k < 2:
            raise ValueError("contrastive search (penalty_alpha > 0) needs top_k >= 2 candidates")
