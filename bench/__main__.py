"""`python -m bench` (`make bench`): every scenario of DESIGN.md, splitserve vs its peers, ratios at the end."""
from __future__ import annotations

import datetime
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import peers, report, roofline
from bench.disaggregated import ARRIVALS, disaggregated_scenario
from bench.inprocess import inprocess_throughput
from bench.server_load import ServerLoadConfig, server_load_scenario
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
    concurrency_rounds: int = field(default=3, metadata={
        "help": "rounds of each concurrency level against generate's static batch, alternating the order"})
    shared_prefix_tokens: int = field(default=1000, metadata={"help": "system prompt length, shared prefix scenario"})
    prompt_lengths: str = field(default="64,256,1024,2048", metadata={"help": "TTFT vs prompt length"})
    threads: int = field(default=0, metadata={"help": "CPU threads for every system; 0 = all cores"})
    llamacpp_python: str = field(default=".bench-venv/bin/python", metadata={"help": "python with llama-cpp-python"})
    llama_server: str = field(default=".bench-llama/bin/llama-server", metadata={
        "help": "llama.cpp's server binary (make bench-peers), for the server_load scenario"})
    server_load_concurrency: str = field(default="1,4,16,64", metadata={"help": "concurrency levels, server_load"})
    server_load_rounds: int = field(default=3, metadata={"help": "rounds of server_load, alternating the order"})
    server_load_requests_per_worker: int = field(default=2, metadata={"help": "requests each server_load worker sends"})
    speculative_max_tokens: int = field(default=128, metadata={"help": "output tokens, speculative scenario"})
    disaggregated_prompt_tokens: int = field(default=2048, metadata={
        "help": "length of the prompts arriving in the disaggregated scenario (0: skip the scenario)"})
    hf_continuous_batching: bool = field(default=True, metadata={"help": "run transformers' generate_batch"})
    out: str = field(default="bench/results", metadata={"help": "where latest.json and the plots go"})
    scenario: str = field(default="", metadata={
        "help": "run only this scenario (structured, server_load), its figures replacing its entry in latest.json"})
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


def prompts(tokenizer, count: int, round_index: int = 0) -> tuple[list[str], list[list[int]]]:
    """count distinct prompts; another round's share no prefix with them (no prefix-cache hit across rounds)."""
    start = "" if round_index == 0 else f"Round {round_index}. "
    texts = [f"{start}Write a short, vivid paragraph about {TOPICS[i % len(TOPICS)]} (variation {i})."
             for i in range(count)]
    return texts, [tokenizer(t).input_ids for t in texts]


def alternate(rounds: int, ours: Callable[[int], dict], peer: Callable[[int], dict | None]
              ) -> tuple[list[dict], list[dict]]:
    """Each system's figures over `rounds` rounds, the two taking turns to go first (this shared machine's speed
    moves by up to 1.6x within minutes: one run of each put that swing into their ratio). Both get the round's
    index; a peer that is not installed returns None and has no runs."""
    ours_runs, peer_runs = [], []
    for round_index in range(rounds):
        for system in ((ours, peer) if round_index % 2 == 0 else (peer, ours)):
            figures = system(round_index)
            if figures is not None:
                (ours_runs if system is ours else peer_runs).append(figures)
    return ours_runs, peer_runs


def medians(runs: list[dict[str, float]], spread: str, digits: int) -> dict:
    """The median of each figure over the runs, with each run's `spread` figure (rounded to `digits`)."""
    out: dict = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    out[f"{spread}_runs"] = [round(run[spread], digits) for run in runs]
    return out


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


def model_info(stack: Stack) -> common_pb2.ModelInfo:
    with grpc.insecure_channel(stack.address("gateway")) as channel:
        return gateway_pb2_grpc.GatewayStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest())


def measure_limits(path: str, device: str) -> roofline.Limits | None:
    """This CPU's limits for the served model (bench/roofline.py); None when the engine serves another device."""
    return roofline.measure(path) if device == "cpu" else None


def run_server_load(config: BenchConfig, stack: Stack, out: Path, limits: roofline.Limits | None) -> dict:
    wait_gateway_ready(stack)
    gguf = default_gguf_path() if config.model == DEFAULT_MODEL else None
    load = ServerLoadConfig(levels=[int(c) for c in config.server_load_concurrency.split(",")],
                            rounds=config.server_load_rounds,
                            requests_per_worker=config.server_load_requests_per_worker, max_tokens=config.max_tokens,
                            threads=torch.get_num_threads(), llama_server=ROOT / config.llama_server, gguf=gguf,
                            log_dir=out / "logs", subjects=TOPICS)
    return server_load_scenario(f"http://127.0.0.1:{stack.ports.gateway_http}/v1", load, limits)


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
    progress = tqdm(total=11 + 2 * len(levels), desc="bench", unit="step")
    try:
        info = model_info(stack)
        dtype = getattr(torch, info.dtype)
        progress.set_postfix_str("limits")
        limits = measure_limits(path, info.device)
        progress.update()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        wait_gateway_ready(stack)
        progress.update()

        # single stream
        progress.set_postfix_str("single stream")
        # splitserve and llama.cpp alternate over 3 rounds (medians), as the concurrency levels do.
        gguf = default_gguf_path() if config.model == DEFAULT_MODEL else None

        def ours_single(_: int) -> dict:
            timing = run_concurrent(stack.address("gateway"), [texts[0]], n)[0][0]
            return {"ttft_s": timing.ttft, "tpot_s": timing.tpot}

        def llama_single(_: int) -> dict | None:
            return peers.llamacpp(ROOT / config.llamacpp_python, gguf, ids[0], n, threads) if gguf else None

        runs, llama_runs = alternate(3, ours_single, llama_single)
        ours = medians(runs, "tpot_s", 5)
        llama = medians(llama_runs, "tpot_s", 5) if llama_runs else None
        progress.update()
        hf = peers.hf_single_stream(model, ids[0], n)
        progress.update()
        scenarios["single_stream"] = {
            "systems": {"splitserve": ours, "hf_generate": hf, "llamacpp": llama},
            "ratios": {"tpot_vs_hf_generate": report.ratio(ours["tpot_s"], hf["tpot_s"]),
                       "tpot_vs_llamacpp": report.ratio(ours["tpot_s"], llama and llama["tpot_s"]),
                       "ttft_vs_hf_generate": report.ratio(ours["ttft_s"], hf["ttft_s"])}}
        if limits is not None:   # batch 1: the bandwidth floor
            scenarios["single_stream"]["roofline"] = limits.decode_roofline(
                scenarios["single_stream"]["systems"], 1, len(ids[0]) + n // 2, "tpot_s")

        # concurrency
        bs1_tokens_per_s = n / (hf["ttft_s"] + (n - 1) * hf["tpot_s"])
        for level in levels:
            progress.set_postfix_str(f"concurrency {level}")
            # Each round has prompts of its own, the same for both: a repeated prompt would hit the prefix cache.
            round_prompts = [prompts(tokenizer, level, r) for r in range(config.concurrency_rounds)]

            def ours_level(round_index: int) -> dict:
                timings, wall = run_concurrent(stack.address("gateway"), round_prompts[round_index][0], n)
                return {"tokens_per_s": sum(t.tokens for t in timings) / wall,
                        "ttft_p50_s": statistics.median(t.ttft for t in timings),
                        "tpot_p50_s": statistics.median(t.tpot for t in timings)}

            def static_level(round_index: int) -> dict:
                return peers.hf_static_batch(model, tokenizer, round_prompts[round_index][1], n)

            ours_runs, static_runs = alternate(config.concurrency_rounds, ours_level, static_level)
            ours, static = medians(ours_runs, "tokens_per_s", 1), medians(static_runs, "tokens_per_s", 1)
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
            if limits is not None:
                batched = {"splitserve": ours, "hf_static_batch": static, "hf_continuous_batching": continuous}
                scenarios[f"concurrency_{level}"]["roofline"] = limits.decode_roofline(
                    batched, level, round(statistics.mean(len(i) for i in ids[:level])) + n // 2)

        progress.set_postfix_str("server load")
        try:
            scenarios["server_load"] = run_server_load(config, stack, out, limits)
        except RuntimeError as exc:   # a short request or a peer that did not start: said, not hidden in figures
            scenarios["server_load"] = {"systems": {}, "ratios": {}, "error": str(exc)}
        progress.update()

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
        if limits is not None:   # prefill: a fraction of the FMA rate
            scenarios["ttft_vs_prompt_length"]["roofline"] = {
                name: {k: limits.prefill_fraction(int(k.split("_")[1]), v) for k, v in figures.items()}
                for name, figures in scenarios["ttft_vs_prompt_length"]["systems"].items()}
        progress.update()

        # overhead: the full gRPC path vs the engine's step loop in-process, 16 streams. The engine as the stack
        # serves it (compact decode weights on CPU), minus gRPC; the two alternate three times (the stack idles
        # meanwhile) and each reports its median, so that a noisy minute of this shared machine falls on both.
        progress.set_postfix_str("overhead")
        model = None   # transformers' copy is done with: freed before the in-process engine loads (a closure
        # above names it, so it is rebound rather than deleted)
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
    if limits is not None:
        scenarios["overhead"]["roofline"] = limits.decode_roofline(
            scenarios["overhead"]["systems"], 16, round(statistics.mean(len(i) for i in ids[:16])) + n // 2)
    progress.update()
    progress.set_postfix_str("speculative")
    scenarios["speculative"] = speculative_scenario(engine, tokenizer, config.speculative_max_tokens)
    engine.stop()
    progress.update()
    if config.disaggregated_prompt_tokens:
        progress.set_postfix_str("disaggregated")
        long_prompts = [random_prompt(tokenizer, config.disaggregated_prompt_tokens, rng) for _ in range(ARRIVALS + 1)]
        scenarios["disaggregated"] = disaggregated_scenario(config.model, long_prompts, out / "logs" / "disaggregated")
    progress.close()

    results = {"machine": machine(), "date": datetime.date.today().isoformat(), "model": info.model,
               "device": info.device, "dtype": info.dtype, "max_tokens": n,
               "limits": limits.summary() if limits is not None else None, "scenarios": scenarios}
    report.write_json(results, out / "latest.json")
    plots = report.plot(results, out)
    print()
    print(report.table(results))
    print(f"wrote {out / 'latest.json'} and {', '.join(str(p) for p in plots)}")


def run_one(config: BenchConfig, stack: Stack, texts: list[str], out: Path) -> None:
    """One scenario alone (`--scenario`), written into latest.json in place of its previous figures."""
    if config.scenario not in ("structured", "server_load"):
        stack.stop()
        raise SystemExit(f"--scenario: only 'structured' or 'server_load' run alone, got {config.scenario!r}")
    limits = None
    try:
        wait_gateway_ready(stack)
        info = model_info(stack)
        if config.scenario == "structured":
            scenario = structured_scenario(stack.address("gateway"), stack.ports.engine_metrics, texts,
                                           config.max_tokens)
        else:
            limits = measure_limits(resolve_model(config.model), info.device)
            scenario = run_server_load(config, stack, out, limits)
    finally:
        stack.stop()
    scenario["measured"] = f"{datetime.date.today().isoformat()}, {machine()}"   # the rest may be older
    if limits is not None:
        scenario["limits"] = limits.summary()   # the run's own: the file's top-level limits may be older
    path = out / "latest.json"
    results = json.loads(path.read_text()) if path.exists() else {
        "machine": machine(), "date": datetime.date.today().isoformat(), "model": info.model, "device": info.device,
        "dtype": info.dtype, "max_tokens": config.max_tokens, "scenarios": {}}
    results["scenarios"][config.scenario] = scenario
    report.write_json(results, path)
    print(report.table({**results, "limits": scenario.get("limits"), "scenarios": {config.scenario: scenario}}))


if __name__ == "__main__":
    main()
