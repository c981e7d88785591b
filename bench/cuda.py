"""`make bench DEVICE=cuda` (python -m bench.cuda): the engine on a GPU, checked and timed against transformers on
the same random-weight models, with the GPU's own limits measured in the same run -> bench/results/cuda.json.

No weights travel to a GPU machine: the models are built there from a config, seeded (a SmolLM2-shaped model for
the correctness checks, with SmolLM2's tokenizer so that the three services can serve it; a Llama-3.2-1B-shaped
model for speed). Sections:
- limits: HBM bandwidth (a device-to-device copy) and the bf16 matmul rate (8192^3), measured here and now;
- correctness: greedy through the engine (in process, 16 prompts 8 at a time, bf16 and fp32; and through the three
  services on loopback) against `model.generate(do_sample=False)` in the same dtype, up to near-ties (the e2e
  suite's rule); prefix caching, chunked prefill, preemption, eager steps and the gather attention keep the
  graph-replayed engine's tokens; the CUDA tests of the suite (sampler, paged kernel, graphs);
- scenarios (1B-shaped, bf16): one stream (TPOT against the bandwidth floor), 16 and 64 streams against
  generate's static batch, and a 2,048-token prefill against the matmul rate.
`--dry-run` runs the same code on the CPU with tiny shapes (no limits, no graphs): a check of the script itself.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.models import resolve_model
from engine_service.engine import Engine
from engine_service.model_runner import ModelRunner
from engine_service.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0)
LLAMA_1B_SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0)
TINY_SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
FUSED_GPU_OPS = True     # --no-fused-gpu-ops: the engines run without fused_ops and gpu_gemv
KV_GIB = 4.0             # the KV cache of the correctness engines (--dry-run: 0.05)
NEAR_TIE_NATS = 0.5      # tests/e2e: at the first difference, the two tokens' log-probabilities within this


def log(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(folder: Path, shape: dict, device: torch.device, seed: int) -> Path:
    """A seeded random LlamaForCausalLM saved in bf16 (loads in any dtype), with SmolLM2's tokenizer files."""
    config = LlamaConfig(**shape, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         initializer_range=0.3 if shape["hidden_size"] < 1024 else 0.02)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder)
    source = Path(os.environ.get("SPLITSERVE_TOKENIZER") or resolve_model("smollm2"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    del model
    return folder


class Runs:
    """An in-process engine and the requests sent to it: each request's tokens and token arrival times."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype, kv_gib: float | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, block_size: int = 16,
                 prefix_caching: bool = True) -> None:
        kv_bytes = int((kv_gib or KV_GIB) * (1 << 30))
        self.runner = ModelRunner(str(folder), folder.name, device, dtype, kv_cache_bytes=kv_bytes,
                                  block_size=block_size, max_model_len=4096, prefix_caching=prefix_caching,
                                  fused_gpu_ops=FUSED_GPU_OPS)
        self.engine = Engine(self.runner, max_num_seqs, max_num_batched_tokens, max_waiting=1024)
        self.engine.start()
        self.count = 0

    def run(self, prompts: list[list[int]], max_tokens: int, concurrency: int | None = None,
            ignore_eos: bool = True) -> tuple[list[list[int]], list[list[float]], float]:
        """Sends the prompts (at most `concurrency` in flight) -> (tokens, arrival times, seconds in all)."""
        tokens: list[list[int]] = [[] for _ in prompts]
        times: list[list[float]] = [[] for _ in prompts]
        done = threading.Semaphore(0)
        started = time.perf_counter()

        def callback(index: int):
            def on_output(output) -> None:
                now = time.perf_counter()
                tokens[index].extend(output.token_ids)
                times[index].extend([now] * len(output.token_ids))
                if output.finish_reason:
                    done.release()
            return on_output

        limit = concurrency or len(prompts)
        for index, ids in enumerate(prompts):
            if index >= limit:
                assert done.acquire(timeout=600)
            self.count += 1
            self.engine.add_request(f"r{self.count}", ids, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos),
                                    callback(index))
        for _ in range(min(limit, len(prompts))):
            assert done.acquire(timeout=600)
        return tokens, times, time.perf_counter() - started

    def stop(self) -> None:
        self.engine.stop()


def reference(model: torch.nn.Module, ids: list[int], max_tokens: int, ignore_eos: bool = True) -> list[int]:
    device = next(model.parameters()).device
    extra = {"min_new_tokens": max_tokens} if ignore_eos else {}
    with torch.inference_mode():
        x = torch.tensor([ids], device=device)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                             **extra)
    return out[0, len(ids):].tolist()


def compare(model: torch.nn.Module, prompts: list[list[int]], ours: list[list[int]],
            expected: list[list[int]]) -> dict:
    """Our greedy tokens against generate's (`expected`): identical, or apart only from a near-tie (the gap at
    the first difference, in the reference's log-probabilities)."""
    device = next(model.parameters()).device
    identical, gaps, failures, ulps = 0, [], [], []
    for index, (ids, got, want) in enumerate(zip(prompts, ours, expected)):
        if got == want:
            identical += 1
            continue
        position = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if position is None:
            failures.append({"prompt": index, "reason": "one output is a prefix of the other"})
            continue
        with torch.inference_mode():
            logits = model(torch.tensor([ids + want[:position]], device=device)).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        gap = float(logprobs[want[position]] - logprobs[got[position]])
        gaps.append(round(gap, 4))
        if next(model.parameters()).dtype == torch.bfloat16:   # the gap in steps of bf16 at the top logit
            ulp = 2.0 ** (int(torch.log2(logits.abs().max()).floor()) - 7)
            ulps.append(round(gap / ulp, 2))
        if gap > NEAR_TIE_NATS:
            failures.append({"prompt": index, "position": position, "gap_nats": round(gap, 4)})
    result = {"prompts": len(prompts), "identical": identical, "near_tie_gaps_nats": gaps, "failures": failures,
              "passed": not failures}
    if ulps:
        result["gaps_in_bf16_steps_at_the_top_logit"] = ulps
    return result


def measure_limits(device: torch.device) -> dict:
    """HBM bandwidth from a 2 GiB device-to-device copy (bytes read + written), and the bf16 matmul rate."""
    source = torch.empty(1 << 30, dtype=torch.int16, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    sync(device)
    rounds = 20
    started = time.perf_counter()
    for _ in range(rounds):
        target.copy_(source)
    sync(device)
    copy_gb_s = 2 * source.nbytes * rounds / (time.perf_counter() - started) / 1e9
    del source, target
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    rounds = 10
    started = time.perf_counter()
    for _ in range(rounds):
        a @ b
    sync(device)
    tflops = 2 * 8192 ** 3 * rounds / (time.perf_counter() - started) / 1e12
    return {"hbm_copy_gb_s": round(copy_gb_s, 1), "bf16_matmul_tflops": round(tflops, 1)}


def graph_seconds(function, calls: int = 40) -> float:
    """Seconds per call of function(i), i = 0..calls-1, replayed from a CUDA graph of the calls (launch costs as
    in the engine's graphs, none of Python's); on the CPU (--dry-run) plain calls."""
    if not torch.cuda.is_available():
        started = time.perf_counter()
        for i in range(2):
            function(i)
        return (time.perf_counter() - started) / 2
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function(0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            function(i)
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best / calls


def kernels(limits: dict, device: torch.device, dry: bool) -> dict:
    """The batch-1 step's pieces on their own, in graphs: each Llama-3.2-1B product at one row through cuBLAS and
    through gpu_gemv's configurations (us, and TB/s of weights read; successive calls read different copies of the
    weights, over 256 MB in all, so none comes from the 50 MB L2 as in a real step); the paged decode kernel's
    tile sizes at a 128-token context; the greedy argmax over 128,256 logits, torch's and row_argmax."""
    import torch.nn.functional as F

    from engine_service.model import gpu_gemv, paged_decode
    from engine_service.sampler import row_argmax
    shape = dict(TINY_SHAPE, vocab_size=4096) if dry else LLAMA_1B_SHAPE
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = hidden // heads
    products = {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, hidden),
                "gate_up": (2 * inter, hidden), "down": (hidden, inter), "head": (shape["vocab_size"], hidden)}
    configs = [(bn, bk, w) for bn in (4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8)] if not dry else []
    configs += [c for c in {gpu_gemv.config_for(n, k) for n, k in products.values()} if c not in configs]
    result: dict = {"gemv": {}}
    for name, (n, k) in products.items():
        copies = 1 if dry else max(2, -(-(256 << 20) // (n * k * 2)))
        ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        reference = F.linear(x, ws[0])
        entry = {"cublas_us": round(graph_seconds(lambda i: F.linear(x, ws[i % copies])) * 1e6, 2)}
        timings = {}
        for config in configs:
            error = (gpu_gemv.gemv(x, ws[0], None, config).float() - reference.float()).abs().max().item()
            timings[config] = (graph_seconds(lambda i: gpu_gemv.gemv(x, ws[i % copies], None, config)) * 1e6, error)
        best = min(timings, key=lambda c: timings[c][0])
        chosen = gpu_gemv.config_for(n, k)
        entry.update({"best_config": list(best), "best_us": round(timings[best][0], 2),
                      "chosen_config": list(chosen), "chosen_us": round(timings[chosen][0], 2),
                      "max_error_vs_cublas": max(e for _, e in timings.values()),
                      "all_us": {str(c): round(t, 2) for c, (t, _) in timings.items()}})
        if limits:
            entry["cublas_tb_s"] = round(n * k * 2 / entry["cublas_us"] / 1e6, 2)
            entry["best_tb_s"] = round(n * k * 2 / entry["best_us"] / 1e6, 2)
            entry["chosen_tb_s"] = round(n * k * 2 / entry["chosen_us"] / 1e6, 2)
        result["gemv"][name] = entry
        log("gemv", name, {k: v for k, v in entry.items() if k != "all_us"})
    q = torch.randn(1, heads, head_dim, device=device, dtype=torch.bfloat16)
    k_cache = torch.randn(kv_heads, 4096, head_dim, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(256, device=device)[:8].to(torch.int32).view(1, 8)
    lengths = torch.tensor([128], device=device, dtype=torch.int32)
    attention = {}
    for tile in (16, 32, 64, 128):
        for warps in (1, 2, 4):
            name = f"tile{tile}_warps{warps}"
            try:
                attention[name] = round(graph_seconds(lambda i: paged_decode.paged_decode_attention(
                    q, k_cache, v_cache, tables, lengths, 16, 0.125, tile=tile, num_warps=warps)) * 1e6, 2)
            except Exception as exc:   # a configuration that does not compile is reported, the others measured
                attention[name] = repr(exc)[:200]
    result["paged_decode_128_tokens_us"] = attention
    log("paged decode, 128 tokens", attention)
    logits = torch.randn(1, shape["vocab_size"], device=device)
    assert torch.equal(row_argmax(logits), logits.argmax(dim=-1))
    result["argmax_us"] = {"torch": round(graph_seconds(lambda i: logits.argmax(dim=-1)) * 1e6, 2),
                           "row_argmax": round(graph_seconds(lambda i: row_argmax(logits)) * 1e6, 2)}
    log("argmax", result["argmax_us"])
    return result


def correctness(folder: Path, device: torch.device, tokens: int, dry: bool) -> dict:
    from transformers import AutoTokenizer

    from tests.helpers import prompt_ids
    from tests.prompts import CHATS, PROMPTS

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [prompt_ids(tokenizer, p) for p in PROMPTS[:12] + CHATS[:4]]
    result: dict = {}
    shared = prompts[0] * 8                     # a long shared prefix: the second run hits the cache
    prefixed = [shared + p for p in prompts]
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        runs = Runs(folder, device, dtype)
        ours = runs.run(prompts, tokens, concurrency=8)[0]
        model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        expected = [reference(model, ids, tokens) for ids in prompts]
        result[f"greedy_inprocess_{name}"] = compare(model, prompts, ours, expected)
        result[f"greedy_inprocess_{name}"]["graphs"] = runs.runner.graphs is not None
        log(name, "greedy in process", result[f"greedy_inprocess_{name}"])
        if dtype == torch.bfloat16:
            runs.stop()
            # bf16's own spread: transformers' eager attention against its SDPA attention, the same rule.
            eager = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").to(device).eval()
            result["transformers_eager_vs_sdpa_bfloat16"] = compare(
                model, prompts, [reference(eager, ids, tokens) for ids in prompts], expected)
            log("transformers eager vs sdpa", result["transformers_eager_vs_sdpa_bfloat16"])
            del eager
            result["services_bf16"] = services(folder, device, model, prompts, expected, tokens)
            log("services", result["services_bf16"])
            del model
            continue
        # fp32: each feature must keep generate's tokens (the same rule), each run on its own engine state.
        variants: dict[str, tuple[list[list[int]], list[list[int]]]] = {}
        graphs, paged = runs.runner.graphs, runs.runner.paged_kernel
        runs.runner.graphs = None
        variants["eager_steps"] = (prompts, runs.run(prompts, tokens, concurrency=8)[0])
        runs.runner.paged_kernel = False
        variants["gather_attention_eager"] = (prompts, runs.run(prompts, tokens, concurrency=8)[0])
        runs.runner.paged_kernel, runs.runner.graphs = paged, graphs
        runs.run(prefixed[:1], tokens)
        hits_before = runs.engine.scheduler.prefix_hit_tokens
        variants["prefix_cache"] = (prefixed, runs.run(prefixed, tokens, concurrency=8)[0])
        result["prefix_cache_hit_tokens"] = runs.engine.scheduler.prefix_hit_tokens - hits_before
        runs.stop()
        chunked = Runs(folder, device, dtype, max_num_batched_tokens=32, prefix_caching=False)
        variants["chunked_prefill"] = (prefixed, chunked.run(prefixed, tokens, concurrency=8)[0])
        chunked.stop()
        # 20 blocks of 16 slots for 8 requests of ~75-95 tokens each (6 blocks): sequences are preempted.
        per_block = 16 * runs.runner.cache.k[0][:, :1].nbytes * 2 * len(runs.runner.cache.k)
        small = Runs(folder, device, dtype, kv_gib=20 * per_block / (1 << 30), prefix_caching=False)
        variants["preemption"] = (prefixed, small.run(prefixed, tokens, concurrency=8)[0])
        result["preemptions"] = small.engine.scheduler.num_preemptions
        small.stop()
        expected_prefixed = [reference(model, ids, tokens) for ids in prefixed]
        result["features_fp32"] = {
            feature: compare(model, ids, got, expected if ids is prompts else expected_prefixed)
            for feature, (ids, got) in variants.items()}
        log("features", {k: (v["identical"], v["passed"]) for k, v in result["features_fp32"].items()},
            "preemptions", result["preemptions"], "prefix hits", result["prefix_cache_hit_tokens"])
        del model
    if not dry:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "tests/unit/test_cuda.py", "tests/unit/test_sampler.py::"
                                "test_cuda_matches_cpu_processing_and_keeps_seeds_batch_independent"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
        lines = tests.stdout.strip().splitlines()
        failures = [line[:400] for line in lines if line.startswith(("E ", "FAILED", "____", "tests/"))][:80]
        result["cuda_tests"] = {"returncode": tests.returncode, "summary": lines[-1:], "failures": failures}
        log("cuda tests", result["cuda_tests"]["summary"], "\n".join(failures))
    return result


def services(folder: Path, device: torch.device, model: torch.nn.Module, prompts: list[list[int]],
             expected: list[list[int]], tokens: int) -> dict:
    """The three services on loopback serving the model on the device: greedy token ids through the gateway
    (the prompt texts in, 8 at a time) against generate on the ids the tokenizer service makes (`prompts`)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from common.stack import Ports, Stack
    from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
    from tests.prompts import CHATS, PROMPTS

    log_dir = Path(tempfile.mkdtemp(prefix="splitserve-cuda-stack-"))
    stack = Stack(model=str(folder), ports=Ports.free(), log_dir=log_dir,
                  engine_args=["--device", device.type, "--dtype", "bfloat16", "--kv-cache-gb", str(KV_GIB),
                               "--fused-gpu-ops", str(FUSED_GPU_OPS).lower()])
    try:
        stack.start(timeout=300)
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.address("gateway")))

        def call(prompt) -> list[int]:
            request = gateway_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(
                max_tokens=tokens, temperature=0.0, ignore_eos=True))
            if isinstance(prompt, str):
                request.prompt = prompt
            else:
                request.messages.extend(common_pb2.ChatMessage(role=r, content=c) for r, c in prompt)
            return [t for chunk in stub.Generate(request, timeout=300) for t in chunk.token_ids]

        with ThreadPoolExecutor(8) as pool:
            ours = list(pool.map(call, PROMPTS[:12] + CHATS[:4]))
        return compare(model, prompts, ours, expected)
    except Exception as exc:  # reported, not fatal: the other sections still run
        return {"passed": False, "error": repr(exc)[:500], "engine_log": stack.log_tail("engine", 20)}
    finally:
        stack.stop()


def model_bytes(runner: ModelRunner) -> dict:
    """What a batch-1 decode step must read: every layer's weights and the head (the tied embedding, once)."""
    fast = runner.fast
    size = torch.tensor([], dtype=runner.dtype).element_size()
    layer_bytes = sum(linear.fp32_bytes for w in fast.layers for linear in (w.qkv, w.o, w.gate_up, w.down))
    layer_bytes += sum(w.input_norm.nbytes + w.post_norm.nbytes for w in fast.layers)
    head_bytes = fast.lm_head.fp32_bytes
    layer_params = sum(linear.fp32_bytes // size for w in fast.layers for linear in (w.qkv, w.o, w.gate_up, w.down))
    shape = runner.cache.k[0].shape
    kv_bytes_per_token = 2 * len(runner.cache.k) * shape[0] * shape[2] * runner.cache.k[0].element_size()
    return {"layer_bytes": layer_bytes, "head_bytes": head_bytes, "layer_params": layer_params,
            "head_params": head_bytes // size, "kv_bytes_per_token": kv_bytes_per_token,
            "layers": len(fast.layers), "attention_width": shape[0] * shape[2] * runner.fast.groups}


def speed(folder: Path, device: torch.device, limits: dict, dry: bool) -> dict:
    dtype = torch.bfloat16 if not dry else torch.float32
    new_tokens = 128 if not dry else 8
    prompt_len = 32
    generator = torch.Generator().manual_seed(7)
    vocab = LLAMA_1B_SHAPE["vocab_size"] if not dry else TINY_SHAPE["vocab_size"]
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=generator).tolist() for _ in range(64)]
    runs = Runs(folder, device, dtype, kv_gib=8.0 if not dry else 0.25)
    sizes = model_bytes(runs.runner)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    scenarios: dict = {}
    runs.run(prompts[:2], 4)     # warm: kernels compiled, allocator settled
    # One stream: TPOT from the token arrival times; the floor is the bytes a step reads at the copy bandwidth.
    tpots, ttfts = [], []
    for _ in range(3):
        _, times, seconds = runs.run(prompts[:1], new_tokens)
        tpots.append((times[0][-1] - times[0][0]) / (len(times[0]) - 1))
    context = prompt_len + new_tokens / 2
    step_bytes = sizes["layer_bytes"] + sizes["head_bytes"] + context * sizes["kv_bytes_per_token"]
    floor = step_bytes / (limits["hbm_copy_gb_s"] * 1e9) if limits else None
    tpot = sorted(tpots)[1]
    generate_tpot = timed_generate(model, prompts[:1], new_tokens, device, per_token=True)
    graphs = runs.runner.graphs
    runs.runner.graphs = None
    eager = runs.run(prompts[:1], new_tokens)[1][0]
    runs.runner.graphs = graphs
    # Where a step's time goes: the graph alone on the GPU (replayed back to back), against the served step.
    replay = {}
    if graphs is not None:
        for rows in (1, 64):
            graph = graphs.graphs[rows][0]
            graph.replay()
            sync(device)
            started = time.perf_counter()
            for _ in range(50):
                graph.replay()
            sync(device)
            replay[f"graph_replay_{rows}_rows_s"] = (time.perf_counter() - started) / 50
        # One replay at a time: the host's launch call alone, and launch to done (the GPU idle before it starts)
        graph = graphs.graphs[1][0]
        launch, alone = [], []
        for _ in range(20):
            started = time.perf_counter()
            graph.replay()
            launch.append(time.perf_counter() - started)
            sync(device)
            alone.append(time.perf_counter() - started)
        replay["graph_launch_call_1_row_s"] = sorted(launch)[10]
        replay["graph_replay_alone_1_row_s"] = sorted(alone)[10]
    scenarios["single_stream"] = {
        "systems": {"splitserve": {"tpot_s": tpot, "tpot_eager_steps_s": (eager[-1] - eager[0]) / (len(eager) - 1)},
                    "hf_generate": {"tpot_s": generate_tpot}},
        "bytes_per_step": int(step_bytes), "floor_tpot_s": floor,
        "tpot_vs_floor": round(tpot / floor, 2) if floor else None,
        "speedup_vs_generate": round(generate_tpot / tpot, 2), **replay}
    log("single stream", scenarios["single_stream"])
    for streams in (16, 64):
        batch = prompts[:streams]
        runs.run(batch, 4)
        tokens, _, seconds = runs.run(batch, new_tokens)
        ours = sum(len(t) for t in tokens) / seconds
        theirs = streams * new_tokens / timed_generate(model, batch, new_tokens, device)
        entry = {"systems": {"splitserve": {"tokens_per_s": round(ours, 1)},
                             "hf_generate_static_batch": {"tokens_per_s": round(theirs, 1)}},
                 "ratio_vs_generate": round(ours / theirs, 2)}
        if streams == 64:   # the attention variant at full batch: the paged kernel vs the gather + matmuls
            paged = runs.runner.paged_kernel
            runs.runner.paged_kernel, runs.runner.graphs = False, None
            tokens, _, seconds = runs.run(batch, new_tokens)
            entry["systems"]["splitserve_gather_attention_eager"] = {
                "tokens_per_s": round(sum(len(t) for t in tokens) / seconds, 1)}
            runs.runner.paged_kernel = paged
            tokens, _, seconds = runs.run(batch, new_tokens)
            entry["systems"]["splitserve_paged_kernel_eager"] = {
                "tokens_per_s": round(sum(len(t) for t in tokens) / seconds, 1)}
            runs.runner.graphs = graphs
        scenarios[f"concurrency_{streams}"] = entry
        log(f"{streams} streams", entry)
    # Prefill: a 2,048-token prompt, its first token (one step of 2,048 rows; attention is causal).
    long_prompt = torch.randint(3, vocab, (2048,), generator=generator).tolist()
    runs.run([long_prompt[:512]], 1)
    ttfts = []
    for round_ in range(3):
        prompt = [long_prompt[0] + round_ + 1] + long_prompt[1:]     # a new first token: no prefix-cache hit
        _, times, seconds = runs.run([prompt], 1)
        ttfts.append(seconds)
    ttft = sorted(ttfts)[1]
    forward_seconds = timed_forward(runs, [long_prompt[0] + 9] + long_prompt[1:], device)
    heads_width = sizes["attention_width"]
    flops = 2 * sizes["layer_params"] * 2048 + 2 * sizes["head_params"] + \
        sizes["layers"] * 2 * 2 * heads_width * 2048 * 2049 / 2
    x = torch.tensor([long_prompt], device=device)
    with torch.inference_mode():
        model(x, logits_to_keep=1)
        sync(device)
        started = time.perf_counter()
        model(x, logits_to_keep=1)
        sync(device)
    generate_prefill = time.perf_counter() - started
    rate = flops / ttft / 1e12
    scenarios["prefill_2048"] = {
        "systems": {"splitserve": {"ttft_s": ttft, "tflops": round(rate, 1), "forward_pass_s": forward_seconds,
                                   "forward_pass_tflops": round(flops / forward_seconds / 1e12, 1)},
                    "hf_forward": {"seconds": generate_prefill, "tflops": round(flops / generate_prefill / 1e12, 1)}},
        "flops": flops,
        "share_of_matmul_rate": round(rate / limits["bf16_matmul_tflops"], 3) if limits else None}
    log("prefill", scenarios["prefill_2048"])
    if os.environ.get("BENCH_PROFILE"):
        host_profile(runs, prompts[6], 64)
        profile(runs, prompts[5], 16, "kernels of one stream, 16 eager steps")
        profile(runs, [long_prompt[0] + 11] + long_prompt[1:], 1, "kernels of the 2,048-token prefill")
    runs.stop()
    scenarios["model"] = sizes
    return scenarios


def timed_forward(runs: Runs, prompt: list[int], device: torch.device) -> float:
    """The seconds of the prompt's forward pass alone (the model runner's, synchronised), within a served request."""
    runner = runs.runner
    original = runner.forward
    seconds: list[float] = []

    def timed(chunks, *args, **kwargs):
        sync(device)
        started = time.perf_counter()
        out = original(chunks, *args, **kwargs)
        sync(device)
        seconds.append(time.perf_counter() - started)
        return out

    runner.forward = timed
    try:
        runs.run([prompt], 1)
    finally:
        del runner.forward
    return seconds[0]


def profile(runs: Runs, prompt: list[int], max_tokens: int, title: str) -> None:
    """Prints the GPU kernels' time of one request (eager steps: a graph's kernels are not seen one by one)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    graphs, runs.runner.graphs = runs.runner.graphs, None
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        runs.run([prompt], max_tokens)
    runs.runner.graphs = graphs
    log(title + "\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def host_profile(runs: Runs, prompt: list[int], max_tokens: int) -> None:
    """Prints where the loop thread's time goes in the decode steps of one request (cProfile, the engine's steps
    only): the host's share of a graph-replayed step."""
    import cProfile
    import io
    import pstats
    profiler = cProfile.Profile()
    original = runs.engine.step

    def step() -> None:
        profiler.enable()
        try:
            original()
        finally:
            profiler.disable()

    runs.engine.step = step
    try:
        runs.run([prompt], max_tokens)
    finally:
        del runs.engine.step
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(22)
    log("host time of one stream's steps (cProfile, by own time)\n" + text.getvalue()[-6000:])


def timed_generate(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, device: torch.device,
                   per_token: bool = False) -> float:
    """Seconds for generate's static batch of the prompts (all one length) to make new_tokens each; per_token:
    the time per token after the first (two runs, 1 and new_tokens tokens, differenced)."""
    x = torch.tensor(prompts, device=device)
    mask = torch.ones_like(x)

    def once(n: int) -> float:
        sync(device)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        return time.perf_counter() - started

    once(2)
    if per_token:
        return (once(new_tokens) - once(1)) / (new_tokens - 1)
    return once(new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    parser.add_argument("--no-fused-gpu-ops", dest="fused_gpu_ops", action="store_false",
                        help="the engines run without the fused ops and the one-row GEMV (eager torch, cuBLAS)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: kernels, correctness, speed")
    args = parser.parse_args()
    dry = args.dry_run
    global KV_GIB, FUSED_GPU_OPS
    KV_GIB = 0.05 if dry else KV_GIB
    FUSED_GPU_OPS = args.fused_gpu_ops
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        sys.exit("bench.cuda needs a CUDA device (--dry-run checks the script on the CPU)")
    import transformers
    report: dict = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
        "machine": f"{os.cpu_count()} CPU threads",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "model": "Llama-3.2-1B-shaped, random weights (seed 1)", "dtype": "bfloat16",
        "fused_gpu_ops": args.fused_gpu_ops,
    }
    work = Path(tempfile.mkdtemp(prefix="splitserve-cuda-"))
    started = time.perf_counter()
    report["limits"] = measure_limits(device) if not dry else {}
    log("limits", report["limits"])
    skip = set(filter(None, args.skip.split(",")))
    for section in ("kernels", "correctness", "speed"):
        if section in skip:
            continue
        try:   # a section that fails is reported; the other still runs
            if section == "kernels":
                report["kernels"] = kernels(report["limits"], device, dry)
            elif section == "correctness":
                small = build_model(work / "smollm2-shaped", TINY_SHAPE if dry else SMOLLM2_SHAPE, device, seed=0)
                report["correctness"] = correctness(small, device, tokens=24 if not dry else 6, dry=dry)
            else:
                large = build_model(work / "llama-1b-shaped", TINY_SHAPE if dry else LLAMA_1B_SHAPE, device, seed=1)
                report["scenarios"] = speed(large, device, report["limits"], dry)
        except Exception:
            import traceback
            traceback.print_exc()
            report[f"{section}_error"] = traceback.format_exc()[-3000:]
    report["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("cuda.json" if not dry else "cuda-dry-run.json")).write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    log("done in", report["seconds"], "s ->", out)


if __name__ == "__main__":
    main()
