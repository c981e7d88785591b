"""Decode step time with the KV cache in fp32, fp16 and bf16 (--kv-cache-dtype), in one process.

    python -m bench.kv_cache_dtype --rows 16 --context 1000 --rounds 8

Three engines (the same model, one cache dtype each) hold the same sequences; their decode steps alternate in
blocks of 4, all on this thread (one OpenMP team), so that the machine's speed, which moves within minutes here,
moves all three alike. Prints each dtype's median step time and, per round, its time over fp32's.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from common.models import DEFAULT_MODEL, resolve_model
from engine_service.engine import Engine
from engine_service.model_runner import ModelRunner
from engine_service.sampling import SamplingParams

CACHES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
STEPS_PER_BLOCK = 4


def decode_ready(model_path: str, cache_dtype: torch.dtype | None, prompts: list[list[int]]) -> Engine:
    """An engine (its loop not started) whose sequences are all prefilled: each step is a plain decode."""
    runner = ModelRunner(model_path, "bench", torch.device("cpu"), torch.float32, kv_cache_bytes=1 << 30,
                         block_size=16, max_model_len=0, compact_decode_weights=True, kv_cache_dtype=cache_dtype)
    engine = Engine(runner, max_num_seqs=len(prompts), max_num_batched_tokens=2048, max_waiting=len(prompts))
    for index, ids in enumerate(prompts):
        engine.add_request(f"r{index}", ids, SamplingParams(max_tokens=1 << 20, ignore_eos=True), lambda *_: None)
    engine._drain_inbox(False)
    while not (len(engine.scheduler.running) == len(prompts)
               and all(seq.num_tokens > len(ids) for seq, ids in zip(engine.scheduler.running, prompts))):
        engine.step()
    return engine


def timed_step(engine: Engine) -> float:
    started = time.perf_counter()
    engine.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="sequences decoding together")
    parser.add_argument("--context", type=int, default=1000, help="prompt tokens per sequence")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    rng = random.Random(5)
    prompts = [[rng.randrange(100, 49000) for _ in range(args.context)] for _ in range(args.rows)]
    engines = {}
    for name, dtype in CACHES.items():
        print(f"prefilling {args.rows} x {args.context} tokens with a {name} cache", flush=True)
        engines[name] = decode_ready(resolve_model(DEFAULT_MODEL), dtype, prompts)
    times: dict[str, list[float]] = {name: [] for name in engines}
    ratios: dict[str, list[float]] = {name: [] for name in engines}
    for round_index in range(args.rounds):
        order = list(engines) if round_index % 2 == 0 else list(reversed(engines))
        block = {}
        for name in order:
            steps = [timed_step(engines[name]) for _ in range(STEPS_PER_BLOCK)]
            block[name] = statistics.median(steps)
            times[name] += steps
        for name in engines:
            ratios[name].append(round(block[name] / block["fp32"], 3))
    for name in engines:
        print(f"{name}: {args.rows} rows at ~{args.context} tokens of context: median step "
              f"{1e3 * statistics.median(times[name]):.1f} ms; time / fp32 per round {ratios[name]}, "
              f"median {statistics.median(ratios[name]):.3f}")


if __name__ == "__main__":
    main()
