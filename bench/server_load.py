"""The server_load scenario: splitserve against llama.cpp's own `llama-server`, the server a CPU user would pick
instead, through both servers' OpenAI `/v1/completions` endpoints with one streaming client and the same requests.

Each run sends 2×C requests from C workers (each worker one request after the other): distinct ~40-token prompts,
64 greedy tokens each with `ignore_eos`. Every request must come back with exactly that many tokens (the count the
server's `usage` gives and finish_reason "length"): a server that stops early must not look fast. One server runs
at a time (llama-server is started for its turn and stopped after it; splitserve's stack idles meanwhile), the
order alternating over the rounds; each figure is the median over the rounds, with its spread (min-max).
Time to first token is to the first chunk carrying text; inter-token latency is the gap between text chunks.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from bench import report
from bench.roofline import Limits
from common.stack import free_port

FIGURES = ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")


@dataclass
class Completion:
    """One streamed completion as the client saw it."""
    start: float
    chunk_times: list[float] = field(default_factory=list)   # arrival of each chunk that carried text
    tokens: int = 0                                           # completion tokens (the server's usage)
    prompt_tokens: int = 0
    finish_reason: str = ""
    text: str = ""


async def stream_completion(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> Completion:
    """POSTs one streamed greedy completion (EOS ignored) to an OpenAI `/v1/completions` URL and times its chunks."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    done = Completion(start=time.perf_counter())
    async with session.post(url, json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"{url} answered {reply.status}: {(await reply.text())[:500]}")
        async for line in reply.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:   # a mid-stream failure (vLLM's and our error event)
                raise RuntimeError(f"{url} failed mid-stream: {json.dumps(event['error'])[:500]}")
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    done.chunk_times.append(time.perf_counter())
                    done.text += choice["text"]
                done.finish_reason = choice.get("finish_reason") or done.finish_reason
            if event.get("usage"):
                done.tokens = event["usage"]["completion_tokens"]
                done.prompt_tokens = event["usage"]["prompt_tokens"]
    return done


async def _workers(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list[Completion], float]:
    queue = list(reversed(prompts))
    done: list[Completion] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            done.append(await stream_completion(session, url, queue.pop(), max_tokens))

    timeout = aiohttp.ClientTimeout(total=3600)
    # A connection per request, for both servers: llama-server (cpp-httplib) may close a kept-alive connection after
    # a streamed reply without saying so, and the next request written on it failed ("Cannot write to closing
    # transport"). Loopback connects cost a fraction of a millisecond.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return done, time.perf_counter() - started


def run_load(base_url: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list[Completion], float]:
    """All prompts through `concurrency` workers against base_url (".../v1"): each completion and the wall time."""
    try:
        return asyncio.run(_workers(f"{base_url}/completions", prompts, concurrency, max_tokens))
    except aiohttp.ClientError as exc:   # a dropped connection: the run failed, said as such (not a crashed bench)
        raise RuntimeError(f"{base_url}: {type(exc).__name__}: {exc}") from exc


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def figures(completions: list[Completion], wall: float, max_tokens: int) -> dict:
    """One run's figures; raises if any request did not produce max_tokens tokens."""
    short = [c.tokens for c in completions if c.tokens != max_tokens or c.finish_reason != "length"]
    if short:
        raise RuntimeError(f"{len(short)} of {len(completions)} requests did not produce {max_tokens} tokens "
                           f"(got {short[:8]})")
    ttfts = [c.chunk_times[0] - c.start for c in completions]
    gaps = [b - a for c in completions for a, b in zip(c.chunk_times, c.chunk_times[1:])]
    return {"tokens_per_s": sum(c.tokens for c in completions) / wall,
            "ttft_p50_s": _percentile(ttfts, 50), "ttft_p99_s": _percentile(ttfts, 99),
            "itl_p50_s": _percentile(gaps, 50), "itl_p99_s": _percentile(gaps, 99),
            "requests": len(completions), "tokens_per_request": max_tokens,
            "prompt_tokens_mean": statistics.mean(c.prompt_tokens for c in completions)}


def prompts_for(subjects: list[str], round_index: int, concurrency: int, count: int) -> list[str]:
    """Distinct ~40-token prompts: no request of a run, a round or a level shares a cached prompt with another."""
    return [f"Request {round_index}.{concurrency}.{i}: write a short, vivid paragraph about "
            f"{subjects[i % len(subjects)]}, describing its colours, sounds and smells, the people a visitor "
            f"would meet there and what they would remember most." for i in range(count)]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status
    except OSError:
        return 0


@contextmanager
def llama_server(binary: Path, gguf: Path, threads: int, log_path: Path, parallel: int = 64,
                 context: int = 32768) -> Iterator[str]:
    """llama.cpp's server on the GGUF, continuous batching over `parallel` slots; yields its ".../v1" URL."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen([str(binary), "-m", str(gguf), "-np", str(parallel), "-c", str(context),
                                    "-t", str(threads), "--cont-batching", "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited with code {process.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not healthy after 300 s; see {log_path}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class ServerLoadConfig:
    levels: list[int]
    rounds: int
    requests_per_worker: int
    max_tokens: int
    threads: int
    llama_server: Path              # the binary; missing: llama-server's figures are null, and why is said
    gguf: Path | None               # the GGUF splitserve serves (llama-server needs it)
    log_dir: Path
    subjects: list[str]             # what the prompts are about


def _summary(runs: list[dict]) -> dict:
    """Median over the rounds of each figure, and its spread."""
    out: dict = {}
    for key in FIGURES:
        values = [r[key] for r in runs]
        out[key] = statistics.median(values)
        out[f"{key}_spread"] = [round(min(values), 4), round(max(values), 4)]
    out["rounds"] = len(runs)
    out["requests_per_round"] = runs[0]["requests"]
    out["prompt_tokens_mean"] = round(statistics.mean(r["prompt_tokens_mean"] for r in runs), 1)
    return out


def server_load_scenario(ours_url: str, config: ServerLoadConfig, limits: Limits | None) -> dict:
    """ours_url: splitserve's OpenAI base URL (".../v1")."""
    missing = None
    if config.gguf is None:
        missing = "the served model has no GGUF file for llama-server"
    elif not config.llama_server.exists():
        missing = f"{config.llama_server} not built (make bench-peers)"
    runs: dict[str, dict[int, list[dict]]] = {"splitserve": {c: [] for c in config.levels}}
    if missing is None:
        runs["llama_server"] = {c: [] for c in config.levels}

    def measure(name: str, url: str, round_index: int) -> None:
        run_load(url, prompts_for(config.subjects, -1, 0, 2), 2, config.max_tokens)   # warm-up
        for level in config.levels:
            prompts = prompts_for(config.subjects, round_index, level, config.requests_per_worker * level)
            completions, wall = run_load(url, prompts, level, config.max_tokens)
            runs[name][level].append(figures(completions, wall, config.max_tokens))

    for round_index in range(config.rounds):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for name in order:
            if name == "splitserve":
                measure(name, ours_url, round_index)
            else:
                with llama_server(config.llama_server, config.gguf, config.threads,
                                  config.log_dir / "llama-server.log") as url:
                    measure(name, url, round_index)

    systems: dict[str, dict] = {}
    ratios: dict[str, float | None] = {}
    roofline: dict[str, dict] = {}
    for level in config.levels:
        ours = _summary(runs["splitserve"][level])
        theirs = _summary(runs["llama_server"][level]) if missing is None else None
        systems[f"splitserve_c{level}"] = ours
        systems[f"llama_server_c{level}"] = theirs
        ratios[f"throughput_vs_llamacpp_server_c{level}"] = report.ratio(
            ours["tokens_per_s"], theirs and theirs["tokens_per_s"])
        if limits is not None:   # at a decode step's mean context
            roofline.update(limits.decode_roofline({f"splitserve_c{level}": ours, f"llama_server_c{level}": theirs},
                                                   level, round(ours["prompt_tokens_mean"]) + config.max_tokens // 2))
    scenario = {"systems": systems, "ratios": ratios, "roofline": roofline}
    if missing is not None:
        scenario["llama_server_missing"] = missing
    return scenario
