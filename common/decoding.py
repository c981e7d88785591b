"""The decoding limits and rules that both the gateway and the engine apply, written once.

The gateway applies them to the public request (to give users a clear INVALID_ARGUMENT); the engine re-applies
them to what it is sent, because a request that breaks them would corrupt its state. Both hold the same field
names (protobuf `SamplingParams` in the gateway, the engine's dataclass), so the rules read either.
"""
from __future__ import annotations

from typing import Protocol

from common.logs import clip

MAX_LOGPROBS = 20                  # alternatives per token (as vLLM's default max_logprobs)
MAX_LOGIT_BIAS = 300               # entries, as OpenAI
MAX_BEAMS = 16
MAX_SPECULATIVE_TOKENS = 16
MAX_PROMPT_LOOKUP_NGRAM = 8
MAX_LOOKAHEAD_WINDOW = 16
LOOKAHEAD_NGRAM = (2, 8)           # 0 = default, else in this range
# The engine's hard bound on stop_token_ids (the gateway's --max-stop-token-ids, default 128, must stay below it):
# the engine looks each new token up in them, and beam search draws (1 + len(ids)) x num_beams candidates.
MAX_STOP_TOKEN_IDS = 1024
SPECULATIVE_MODES = ("", "prompt_lookup", "draft", "lookahead")
# As vLLM: smaller temperatures are greedy (dividing the logits by 1e-40 would overflow them).
GREEDY_BELOW_TEMPERATURE = 1e-5


class StrategyFields(Protocol):
    temperature: float
    num_beams: int
    penalty_alpha: float
    speculative: str
    num_speculative_tokens: int
    prompt_lookup_max_ngram: int
    lookahead_window: int
    lookahead_ngram: int


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW_TEMPERATURE


def strategy_error(params: StrategyFields, prefix: str = "") -> str | None:
    """What is wrong with the decoding strategy that `params` ask for, or None. `prefix` names the fields as the
    caller's users know them (the gateway: "sampling.").

    The rules: `speculative` is one of SPECULATIVE_MODES; one strategy at a time (beam search, contrastive search,
    speculative decoding run on different step shapes); beam search, contrastive search and lookahead decoding are
    greedy-only strategies (they pick tokens by score, not by sampling)."""
    if params.speculative not in SPECULATIVE_MODES:
        return (f"{prefix}speculative must be one of {', '.join(repr(m) for m in SPECULATIVE_MODES)}, "
                f"got {clip(params.speculative)!r}")
    beams = f"beam search ({prefix}num_beams > 1)"
    contrastive = f"contrastive search ({prefix}penalty_alpha > 0)"
    speculative = f"speculative decoding ({prefix}speculative={params.speculative!r})"
    asked = [name for name, on in ((beams, params.num_beams > 1), (contrastive, params.penalty_alpha > 0),
                                   (speculative, bool(params.speculative))) if on]
    if len(asked) > 1:
        return f"{' and '.join(asked)} are different decoding strategies; choose one"
    if greedy_only_strategy(params) and not is_greedy(params.temperature):
        return f"{asked[0]} is greedy only: {prefix}temperature must be 0, got {params.temperature}"
    return None


def greedy_only_strategy(params: StrategyFields) -> bool:
    """Beam search, contrastive search and lookahead decoding choose tokens by score: they never sample."""
    return params.num_beams > 1 or params.penalty_alpha > 0 or params.speculative == "lookahead"


def range_error(params: StrategyFields, prefix: str = "") -> str | None:
    """The first of the strategies' numeric fields out of its range, as a message, or None."""
    ranges = (("num_beams", 0, MAX_BEAMS, " (0 or 1 = no beam search)"),
              ("num_speculative_tokens", 0, MAX_SPECULATIVE_TOKENS, " (0 = the engine's default)"),
              ("prompt_lookup_max_ngram", 0, MAX_PROMPT_LOOKUP_NGRAM, " (0 = default)"),
              ("lookahead_window", 0, MAX_LOOKAHEAD_WINDOW, " (0 = default)"))
    for name, low, high, meaning in ranges:
        value = getattr(params, name)
        if not low <= value <= high:
            return f"{prefix}{name} must be in [{low}, {high}]{meaning}, got {value}"
    if params.lookahead_ngram and not LOOKAHEAD_NGRAM[0] <= params.lookahead_ngram <= LOOKAHEAD_NGRAM[1]:
        return (f"{prefix}lookahead_ngram must be 0 (default) or in [{LOOKAHEAD_NGRAM[0]}, {LOOKAHEAD_NGRAM[1]}], "
                f"got {params.lookahead_ngram}")
    return None


# Structured output (SamplingParams.structured_output): what one constraint may hold. The engine compiles it
# off its step loop, but a compile still costs CPU time and memory in proportion to its text, so both the gateway
# and the engine bound it.
STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_STRUCTURED_TEXT_CHARS = 65_536   # a JSON schema, regex or grammar
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024              # each choice


def structured_output_error(kind: str | None, value: object, prefix: str = "") -> str | None:
    """What is wrong with a constraint of `kind` holding `value` (a str, True for json_object, the choices'
    strings for choice), or None. `prefix` names the field as the caller's users know it."""
    field = f"{prefix}structured_output"
    if kind not in STRUCTURED_KINDS:
        return f"{field} is set but holds no constraint: set one of {', '.join(STRUCTURED_KINDS)}"
    if kind == "json_object":
        return None if value is True else f"{field}.json_object must be true when it is the constraint"
    if kind == "choice":
        choices = list(value)
        if not choices:
            return f"{field}.choice.choices is empty: give at least one string"
        if len(choices) > MAX_CHOICES:
            return f"{field}.choice.choices has {len(choices)} strings; at most {MAX_CHOICES} are allowed"
        for i, choice in enumerate(choices):
            if not choice:
                return f"{field}.choice.choices[{i}] is empty"
            if len(choice) > MAX_CHOICE_CHARS:
                return f"{field}.choice.choices[{i}] is longer than {MAX_CHOICE_CHARS} characters"
        return None
    if not value:
        return f"{field}.{kind} is empty"
    if len(value) > MAX_STRUCTURED_TEXT_CHARS:
        return f"{field}.{kind} has {len(value)} characters; at most {MAX_STRUCTURED_TEXT_CHARS} are allowed"
    return None
