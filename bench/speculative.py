"""Speculative and lookahead decoding vs plain greedy decoding, in-process, one request at a time, on a task where
guesses help: rewriting a given text (most of the answer is copied from the prompt)."""
from __future__ import annotations

import threading
import time

from engine_service.engine import Engine
from engine_service.sampling import SamplingParams
from engine_service.sequence import SequenceOutput

EDIT_TASKS = [
    ("Rewrite this Python function with the variable `total` renamed to `result`. Reply with the code only.\n\n"
     "def sum_squares(values):\n    total = 0\n    for value in values:\n        if value > 0:\n"
     "            total += value * value\n        else:\n            total -= value\n    return total\n"),
    ("Copy the following list exactly, one item per line, then add one more fruit at the end:\n"
     "apple\nbanana\ncherry\ndate\nelderberry\nfig\ngrape\nhoneydew\nkiwi\nlemon\nmango\nnectarine\n"),
    ("Fix the spelling in this text and repeat it in full: The quick brown fox jumpd over the lazy dog. "
     "The dog was not amused, and it barkd loudly at the fox, who ran away into the forrest."),
    ("Repeat this JSON with the field \"age\" changed to 31:\n"
     '{"name": "Alice", "age": 30, "city": "Paris", "languages": ["French", "English"], "active": true}'),
]
MODES = {
    "plain": {},
    "prompt_lookup": {"speculative": "prompt_lookup"},
    "draft": {"speculative": "draft"},
    "lookahead": {"speculative": "lookahead"},
}


def _generate(engine: Engine, prompt_ids: list[int], max_tokens: int, params: dict) -> tuple[list[int], int, float]:
    done = threading.Event()
    tokens: list[int] = []

    def on_output(output: SequenceOutput) -> None:
        tokens.extend(output.token_ids)
        if output.finish_reason:
            done.set()

    started = time.perf_counter()
    seq = engine.add_request(f"spec-{started}", prompt_ids, SamplingParams(max_tokens=max_tokens, **params),
                             on_output)
    done.wait()
    return tokens, seq.num_steps, time.perf_counter() - started


def speculative_scenario(engine: Engine, tokenizer, max_tokens: int) -> dict:
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": task}], add_generation_prompt=True)
               for task in EDIT_TASKS]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    _generate(engine, prompts[0], 4, {})   # warm-up
    systems: dict[str, dict] = {}
    reference: list[list[int]] = []
    for mode, params in MODES.items():
        drafts, accepted = engine.guesses_verified, engine.guesses_accepted
        outputs, steps, seconds = [], 0, 0.0
        for ids in prompts:
            tokens, num_steps, elapsed = _generate(engine, ids, max_tokens, params)
            outputs.append(tokens)
            steps += num_steps
            seconds += elapsed
        if mode == "plain":
            reference = outputs
        tokens = sum(len(t) for t in outputs)
        proposed = engine.guesses_verified - drafts
        systems[mode] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                         "forward_passes": steps, "tokens_per_forward_pass": tokens / steps,
                         "draft_tokens": proposed,
                         "acceptance_rate": (engine.guesses_accepted - accepted) / proposed if proposed else None,
                         "identical_to_plain": outputs == reference}
    plain = systems["plain"]
    ratios: dict[str, float | None] = {}
    for mode in MODES:
        if mode != "plain":
            ratios[f"{mode}_speedup"] = plain["seconds"] / systems[mode]["seconds"]
            ratios[f"{mode}_fewer_forward_passes"] = plain["forward_passes"] / systems[mode]["forward_passes"]
    return {"systems": systems, "ratios": ratios}
