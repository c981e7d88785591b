"""Intake: the checks a request passes before it becomes a Sequence the step loop may run.

The engine's gRPC port is reachable by any internal caller, so every bound the loop relies on is checked here
again, whatever the gateway already checked: the sampling parameters (`SamplingParams.validate`), the prompt and
token ids against the model, the decoding strategy the engine can serve, beams that fit `--max-num-seqs`, a
failover's replayed tokens, and a structured-output constraint that arrives compiled.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine_service.decoding import make_strategy
from engine_service.model_runner import ModelSpec
from engine_service.sampling import SamplingParams
from engine_service.sequence import OutputCallback, Sequence
from engine_service.structured_output import CompiledGrammar, Grammars


class RequestError(ValueError):
    """A request the engine cannot take as it is (the servicer answers INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Intake:
    model_spec: ModelSpec
    max_num_seqs: int
    # Speculative "draft" requests draft with the target's first draft_layers layers (0: no draft model; the
    # engine's --draft-layers, -1 meaning a quarter of them, resolved by ModelRunner.draft_layers).
    draft_layers: int
    grammars: Grammars

    def sequence(self, request_id: str, prompt_ids: list[int], params: SamplingParams, on_output: OutputCallback,
                 num_replayed: int = 0, grammar: CompiledGrammar | None = None) -> Sequence:
        """A checked sequence with its decoding strategy and constraint, not yet queued. Raises RequestError.
        num_replayed: the prompt's last tokens were generated for this request elsewhere (a failover's replay)."""
        params.validate()
        if params.num_beams > self.max_num_seqs:   # its beams could never all run at once
            raise RequestError(f"num_beams {params.num_beams} is more than this engine runs at once "
                               f"(--max-num-seqs {self.max_num_seqs})")
        if not 0 <= num_replayed < len(prompt_ids):
            raise RequestError(f"replayed_tokens must be in [0, {len(prompt_ids)}), got {num_replayed}")
        spec = self.model_spec
        seq = Sequence(request_id=request_id, prompt_ids=list(prompt_ids), params=params, on_output=on_output,
                       num_replayed=num_replayed)
        try:
            spec.check_prompt(seq.prompt_ids)
            spec.check_token_ids(params)
            seq.strategy = make_strategy(seq, spec.max_context_length, self.draft_layers, spec.eos_token_ids)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if params.structured_output is not None:
            if grammar is None:
                raise RequestError("structured_output must be compiled before the request is queued")
            seq.matcher = self.grammars.matcher(grammar, seq.prompt_ids[len(seq.prompt_ids) - num_replayed:])
        return seq
