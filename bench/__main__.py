"""`python -m bench` (`make bench`): every scenario of DESIGN.md, splitserve vs its peers, ratios at the end."""
from __future__ import annotations

import datetime
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import peers, report
from bench.inprocess import inprocess_throughput
from bench.speculative import speculative_scenario
from bench.structured import structured_scenario
from bench.splitserve_client import run_concurrent
from common.config import describe, load_config
from common.logs import setup_logging
from common.models import DEFAULT_MODEL, default_gguf_path, resolve_model
from common.stack import Ports, Stack
from engine_service.engine import Engine
from engine_service.model_runner import ModelRunner
from splitserve.v1 import common_pb2, gateway_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["the ocean", "a city at night", "mountains", "a robot", "coffee", "the moon", "trains", "a library",
          "winter", "music", "a garden", "rivers", "the desert", "a market", "bicycles", "volcanoes"]


@dataclass
class BenchConfig:
    model: str = field(default=DEFAULT_MODEL, metadata={"env": "MODEL"})
    max_tokens: int = field(default=64, metadata={"help": "output tokens per request"})
    concurrency: str = field(default="1,4,16,64", metadata={"help": "concurrency levels"})
    shared_prefix_tokens: int = field(default=1000, metadata={"help": "system prompt length, shared prefix scenario"})
    prompt_lengths: str = field(default="64,256,1024,2048", metadata={"help": "TTFT vs prompt length"})
    threads: int = field(default=0, metadata={"help": "CPU threads for every system; 0 = all cores"})
    llamacpp_python: str = field(default=".bench-venv/bin/python", metadata={"help": "python with llama-cpp-python"})
    speculative_max_tokens: int = field(default=128, metadata={"help": "output tokens, speculative scenario"})
    hf_continuous_batching: bool = field(default=True, metadata={"help": "run transformers' generate_batch"})
    out: str = field(default="bench/results", metadata={"help": "where latest.json and the plots go"})
    scenario: str = field(default="", metadata={
        "help": "run only this scenario (structured), its figures replacing its entry in latest.json"})
    log_level: str = "WARNING"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        cpu += f" + {torch.cuda.get_device_name()}"
    return f"{cpu}, {torch.get_num_threads()} threads, {platform.system()}"


def prompts(tokenizer, count: int) -> tuple[list[str], list[list[int]]]:
    texts = [f"Write a short, vivid paragraph about {TOPICS[i % len(TOPICS)]} (variation {i})." for i in range(count)]
    return texts, [tokenizer(t).input_ids for t in texts]


def random_prompt(tokenizer, length: int, rng: random.Random) -> str:
    """A prompt of about `length` tokens that no cache has seen."""
    words = [f"w{rng.randrange(10**6)}" for _ in range(length)]
    text = " ".join(words)
    ids = tokenizer(text).input_ids[:length]
    return tokenizer.decode(ids, skip_special_tokens=True)


def restart_engine(stack: Stack, args: list[str]) -> None:
    """Restarts the engine with these command-line arguments; the gateway and tokenizer keep running."""
    stack.stop_service("engine")
    stack.services["engine"].args = args
    stack.start_service("engine")
    wait_gateway_ready(stack)


def wait_gateway_ready(stack: Stack, timeout: float = 60) -> None:
    """The gateway reconnects to a restarted engine by itself; wait until a request goes through."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            run_concurrent(stack.address("gateway"), ["warm up"], 2)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    config = load_config(BenchConfig, description="splitserve benchmarks")
    setup_logging(config.log_level)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    threads = torch.get_num_threads()
    print(f"bench config: {describe(config)}", flush=True)
    out = ROOT / config.out
    path = resolve_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    levels = [int(c) for c in config.concurrency.split(",")]
    texts, ids = prompts(tokenizer, max(levels + [16]))
    n = config.max_tokens
    scenarios: dict[str, dict] = {}

    engine_args = ["--threads", str(threads)]
    stack = Stack(model=config.model, ports=Ports.free(), log_dir=out / "logs", engine_args=engine_args)
    print("starting splitserve...", flush=True)
    stack.start()
    if config.scenario:
        run_one(config, stack, texts, out)
        return
    progress = tqdm(total=9 + 2 * len(levels), desc="bench", unit="step")
    try:
        with grpc.insecure_channel(stack.address("gateway")) as channel:
            info = gateway_pb2_grpc.GatewayStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest())
        dtype = getattr(torch, info.dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        wait_gateway_ready(stack)
        progress.update()

        # single stream
        progress.set_postfix_str("single stream")
        runs = [run_concurrent(stack.address("gateway"), [texts[0]], n)[0][0] for _ in range(3)]
        ours = {"ttft_s": statistics.median(r.ttft for r in runs), "tpot_s": statistics.median(r.tpot for r in runs)}
        hf = peers.hf_single_stream(model, ids[0], n)
        progress.update()
        gguf = default_gguf_path() if config.model == DEFAULT_MODEL else None
        llama = peers.llamacpp(ROOT / config.llamacpp_python, gguf, ids[0], n, threads) if gguf else None
        progress.update()
        scenarios["single_stream"] = {
            "systems": {"splitserve": ours, "hf_generate": hf, "llamacpp": llama},
            "ratios": {"tpot_vs_hf_generate": report.ratio(ours["tpot_s"], hf["tpot_s"]),
                       "tpot_vs_llamacpp": report.ratio(ours["tpot_s"], llama and llama["tpot_s"]),
                       "ttft_vs_hf_generate": report.ratio(ours["ttft_s"], hf["ttft_s"])}}

        # concurrency
        bs1_tokens_per_s = n / (hf["ttft_s"] + (n - 1) * hf["tpot_s"])
        for level in levels:
            progress.set_postfix_str(f"concurrency {level}")
            timings, wall = run_concurrent(stack.address("gateway"), texts[:level], n)
            ours = {"tokens_per_s": sum(t.tokens for t in timings) / wall,
                    "ttft_p50_s": statistics.median(t.ttft for t in timings),
                    "tpot_p50_s": statistics.median(t.tpot for t in timings)}
            static = peers.hf_static_batch(model, tokenizer, ids[:level], n)
            progress.update()
            continuous = peers.hf_continuous_batching(model, ids[:level], n) if config.hf_continuous_batching else None
            progress.update()
            scenarios[f"concurrency_{level}"] = {
                "systems": {"splitserve": ours, "hf_static_batch": static, "hf_continuous_batching": continuous,
                            "hf_generate_bs1": {"tokens_per_s": bs1_tokens_per_s}},
                "ratios": {"throughput_vs_hf_static_batch": report.ratio(ours["tokens_per_s"], static["tokens_per_s"]),
                           "throughput_vs_hf_generate_bs1": report.ratio(ours["tokens_per_s"], bs1_tokens_per_s),
                           "throughput_vs_hf_continuous_batching": report.ratio(
                               ours["tokens_per_s"], continuous and continuous["tokens_per_s"])}}

        progress.set_postfix_str("structured")
        scenarios["structured"] = structured_scenario(stack.address("gateway"), stack.ports.engine_metrics, texts, n)
        progress.update()

        # shared system prompt: prefix caching on (the default) vs off
        progress.set_postfix_str("shared prefix")
        rng = random.Random(0)
        system = random_prompt(tokenizer, config.shared_prefix_tokens, rng)
        chats = [[("system", system), ("user", f"Tell me about {TOPICS[i]}.")] for i in range(16)]
        shared = {}
        default_args = list(stack.services["engine"].args)
        for label in ("prefix_cache_on", "prefix_cache_off"):
            if label == "prefix_cache_off":
                restart_engine(stack, default_args + ["--prefix-caching", "false"])
            run_concurrent(stack.address("gateway"), [[("system", system), ("user", "Hello!")]], 2)  # warm-up
            timings, wall = run_concurrent(stack.address("gateway"), chats, 16)
            shared[label] = {"ttft_p50_s": statistics.median(t.ttft for t in timings),
                             "tokens_per_s": sum(t.tokens for t in timings) / wall}
        restart_engine(stack, default_args)
        scenarios["shared_prefix"] = {
            "systems": shared,
            "ratios": {"ttft_cache_off_over_on": report.ratio(shared["prefix_cache_off"]["ttft_p50_s"],
                                                              shared["prefix_cache_on"]["ttft_p50_s"]),
                       "throughput_cache_on_over_off": report.ratio(shared["prefix_cache_on"]["tokens_per_s"],
                                                                    shared["prefix_cache_off"]["tokens_per_s"])}}
        progress.update()

        # TTFT vs prompt length
        progress.set_postfix_str("ttft vs prompt length")
        ours_len, hf_len = {}, {}
        for length in (int(x) for x in config.prompt_lengths.split(",")):
            text = random_prompt(tokenizer, length, rng)
            timing = run_concurrent(stack.address("gateway"), [text], 1)[0][0]
            ours_len[f"tokens_{length}"] = timing.ttft
            hf_len[f"tokens_{length}"] = peers.hf_single_stream(model, tokenizer(text).input_ids, 2, repeats=1)["ttft_s"]
        scenarios["ttft_vs_prompt_length"] = {"systems": {"splitserve": ours_len, "hf_generate": hf_len},
                                              "ratios": {k: report.ratio(ours_len[k], hf_len[k]) for k in ours_len}}
        progress.update()

        # overhead: the full gRPC path vs the engine's step loop in-process, 16 streams. The engine as the stack
        # serves it (compact decode weights on CPU), minus gRPC; the two alternate three times (the stack idles
        # meanwhile) and each reports its median, so that a noisy minute of this shared machine falls on both.
        progress.set_postfix_str("overhead")
        del model
        runner = ModelRunner(path, "bench", torch.device(info.device), dtype, kv_cache_bytes=1 << 30,
                             block_size=16, max_model_len=0, compact_decode_weights=info.device == "cpu")
        engine = Engine(runner, max_num_seqs=64, max_num_batched_tokens=2048, max_waiting=1024, draft_layers=-1)
        engine.start()
        inprocess_throughput(engine, ids[:2], 4)  # warm-up
        grpc_runs, inproc_runs = [], []
        for _ in range(3):
            timings, wall = run_concurrent(stack.address("gateway"), texts[:16], n)
            grpc_runs.append(sum(t.tokens for t in timings) / wall)
            inproc_runs.append(inprocess_throughput(engine, ids[:16], n)["tokens_per_s"])
        grpc_tps, inproc_tps = statistics.median(grpc_runs), statistics.median(inproc_runs)
    finally:
        stack.stop()
    scenarios["overhead"] = {"systems": {
        "splitserve_grpc": {"tokens_per_s": grpc_tps, "runs": [round(x, 1) for x in grpc_runs]},
        "engine_inprocess": {"tokens_per_s": inproc_tps, "runs": [round(x, 1) for x in inproc_runs]}},
                             "ratios": {"grpc_over_inprocess_throughput": report.ratio(grpc_tps, inproc_tps)}}
    progress.update()
    progress.set_postfix_str("speculative")
    scenarios["speculative"] = speculative_scenario(engine, tokenizer, config.speculative_max_tokens)
    engine.stop()
    progress.update()
    progress.close()

    results = {"machine": machine(), "date": datetime.date.today().isoformat(), "model": info.model,
               "device": info.device, "dtype": info.dtype, "max_tokens": n, "scenarios": scenarios}
    report.write_json(results, out / "latest.json")
    plots = report.plot(results, out)
    print()
    print(report.table(results))
    print(f"wrote {out / 'latest.json'} and {', '.join(str(p) for p in plots)}")


def run_one(config: BenchConfig, stack: Stack, texts: list[str], out: Path) -> None:
    """One scenario alone (`--scenario`), written into latest.json in place of its previous figures."""
    if config.scenario != "structured":
        stack.stop()
        raise SystemExit(f"--scenario: only 'structured' runs alone, got {config.scenario!r}")
    try:
        wait_gateway_ready(stack)
        scenario = structured_scenario(stack.address("gateway"), stack.ports.engine_metrics, texts, config.max_tokens)
    finally:
        stack.stop()
    scenario["measured"] = f"{datetime.date.today().isoformat()}, {machine()}"   # the rest may be older
    path = out / "latest.json"
    results = json.loads(path.read_text()) if path.exists() else {
        "machine": machine(), "date": datetime.date.today().isoformat(), "model": config.model, "device": "",
        "dtype": "", "max_tokens": config.max_tokens, "scenarios": {}}
    results["scenarios"]["structured"] = scenario
    report.write_json(results, path)
    print(report.table({**results, "scenarios": {"structured": scenario}}))


if __name__ == "__main__":
    main()
