"""The peers a user would otherwise pick, run on the same weights and prompts: transformers' `generate` (batch 1
and static batches), transformers' continuous batching (`generate_batch`), and llama.cpp on the same GGUF."""
from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

LLAMACPP_SCRIPT = Path(__file__).with_name("llamacpp_runner.py")
PAGE_TOKENS = 256       # generate_batch's cache page (its default)
CB_BATCH_TOKENS = 512   # tokens per generate_batch step: prompts are prefilled in chunks of this


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@torch.inference_mode()
def hf_single_stream(model, ids: list[int], max_tokens: int, repeats: int = 2) -> dict[str, float]:
    """TTFT = a 1-token generate; TPOT = the rest of a max_tokens generate per token."""
    inputs = torch.tensor([ids])
    mask = torch.ones_like(inputs)

    def generate(n: int) -> None:
        model.generate(inputs, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    generate(2)  # warm-up
    ttft = statistics.median(_timed(lambda: generate(1)) for _ in range(repeats))
    total = statistics.median(_timed(lambda: generate(max_tokens)) for _ in range(repeats))
    return {"ttft_s": ttft, "tpot_s": (total - ttft) / (max_tokens - 1), "total_s": total}


@torch.inference_mode()
def hf_static_batch(model, tokenizer, prompts_ids: list[list[int]], max_tokens: int) -> dict[str, float]:
    """One padded batch through `generate`: every sequence makes max_tokens tokens."""
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts_ids}, return_tensors="pt")
    elapsed = _timed(lambda: model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                            do_sample=False, pad_token_id=tokenizer.pad_token_id))
    return {"tokens": len(prompts_ids) * max_tokens, "seconds": elapsed,
            "tokens_per_s": len(prompts_ids) * max_tokens / elapsed}


@torch.inference_mode()
def hf_continuous_batching(model, prompts_ids: list[list[int]], max_tokens: int) -> dict[str, float]:
    """transformers' `generate_batch`, its cache sized for these requests. Left to size itself on a CPU, it takes
    90 % of the machine's RAM (psutil) and each call spends ~16 CPU-seconds allocating that cache before the first
    step (the former baseline's "1 token in 14 s"); sized here, a call costs its steps. It ignores min_new_tokens,
    so no token counts as EOS (-1), as `ignore_eos` does for the servers, and the count is checked."""
    pages_per_request = -(-(max(map(len, prompts_ids)) + max_tokens) // PAGE_TOKENS)
    cache = ContinuousBatchingConfig(page_size=PAGE_TOKENS, num_blocks=len(prompts_ids) * pages_per_request + 1,
                                     max_batch_tokens=CB_BATCH_TOKENS)
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1,
                              pad_token_id=model.generation_config.pad_token_id)
    started = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts_ids, generation_config=config, continuous_batching_config=cache,
                                   progress_bar=False)
    elapsed = time.perf_counter() - started
    counts = [len(out.generated_tokens) for out in outputs.values()]
    if len(counts) != len(prompts_ids) or any(c != max_tokens for c in counts):
        raise RuntimeError(f"generate_batch produced {counts}, not {max_tokens} tokens per request")
    return {"tokens": sum(counts), "seconds": elapsed, "tokens_per_s": sum(counts) / elapsed}


def llamacpp(python: Path, gguf: Path, ids: list[int], max_tokens: int, threads: int) -> dict[str, float] | None:
    """Runs llama.cpp (llama-cpp-python in its own environment) on the same GGUF; None when not installed."""
    if not python.exists():
        return None
    check = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
    if check.returncode != 0:
        return None
    result = subprocess.run([str(python), str(LLAMACPP_SCRIPT), str(gguf), json.dumps(ids), str(max_tokens),
                             str(threads)], capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp runner failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
