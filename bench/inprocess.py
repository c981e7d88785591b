"""The engine's own step loop called in-process (no gRPC, no tokenizer): the ceiling for the overhead scenario."""
from __future__ import annotations

import threading
import time

from engine_service.engine import Engine
from engine_service.sampling import SamplingParams
from engine_service.sequence import SequenceOutput


def inprocess_throughput(engine: Engine, prompts_ids: list[list[int]], max_tokens: int) -> dict[str, float]:
    done = threading.Semaphore(0)
    counts = [0] * len(prompts_ids)

    def callback(index: int):
        def on_output(output: SequenceOutput) -> None:
            counts[index] += len(output.token_ids)
            if output.finish_reason:
                done.release()
        return on_output

    started = time.perf_counter()
    for i, ids in enumerate(prompts_ids):
        engine.add_request(f"inprocess-{i}-{started}", ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                           callback(i))
    for _ in prompts_ids:
        done.acquire()
    elapsed = time.perf_counter() - started
    return {"tokens": sum(counts), "seconds": elapsed, "tokens_per_s": sum(counts) / elapsed}
