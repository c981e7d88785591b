"""Disaggregated vs colocated serving, two engine processes with one core each in both layouts: colocated, two
`both` engines behind the router; disaggregated, one prefill engine and one decode engine. Workload: 8 running
streams while long prompts arrive every few seconds. Reports the running streams' inter-token latency (p50/p99,
while the arrivals are being served), the arrivals' TTFT, the throughput, and the KV transfer rate: the decode
engine's transfers overlap the prefill engine's compute, so the rate proper is measured apart, by asking the
prefill engine twice for the same prompt's blocks (the second time its prefix cache holds them: nearly all of
that call is sending)."""
from __future__ import annotations

import asyncio
import os
import statistics
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench import report
from common.stack import Ports, Stack
from transformers import AutoConfig, AutoTokenizer

from common.models import resolve_model
from splitserve.v1 import common_pb2, engine_pb2, engine_pb2_grpc, gateway_pb2, gateway_pb2_grpc

RUNNING, ARRIVALS = 8, 3


def _request(prompt: str, max_tokens: int) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


async def _workload(address: str, long_prompts: list[str], gap_s: float, stream_tokens: int) -> dict:
    """The running streams' chunk times, each arrival's TTFT, and the window in which the arrivals were served."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        times: list[list[float]] = [[] for _ in range(RUNNING)]

        async def running(i: int) -> None:
            async for _ in stub.Generate(_request(f"Tell a long story about the number {i}.", stream_tokens)):
                times[i].append(time.perf_counter())

        async def arrival(prompt: str) -> float:
            started = time.perf_counter()
            async for _ in stub.Generate(_request(prompt, 4)):
                return time.perf_counter() - started
            return float("nan")

        streams = [asyncio.create_task(running(i)) for i in range(RUNNING)]
        while sum(1 for t in times if t) < RUNNING:     # every stream decoding before the first arrival
            await asyncio.sleep(0.05)
        window_start = time.perf_counter()
        arrivals = []
        for prompt in long_prompts:
            arrivals.append(asyncio.create_task(arrival(prompt)))
            await asyncio.sleep(gap_s)
        ttfts = await asyncio.gather(*arrivals)
        window_end = time.perf_counter()
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    gaps = [b - a for t in times for a, b in zip(t, t[1:]) if window_start <= a and b <= window_end]
    tokens = sum(1 for t in times for x in t if window_start <= x <= window_end)
    return {"gaps": gaps, "ttfts": ttfts, "tokens": tokens, "seconds": window_end - window_start}


def _transfer_totals(port: int) -> dict[str, float]:
    """The decode engine's received-side KV transfer totals (bytes, seconds, blocks) from its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    wanted = {"splitserve_engine_kv_transfer_bytes_total": "bytes", "splitserve_engine_kv_transfer_seconds_sum":
              "seconds", "splitserve_engine_kv_transfer_blocks_total": "blocks"}
    return {wanted[s.name]: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name in wanted and s.labels.get("direction") == "received"}


def _transfer_rate(model: str, prefill_address: str, prompt: str, gateway_address: str) -> dict:
    """MB/s and ms per 1k tokens of one prompt's KV blocks sent by the prefill engine over loopback, its prefix
    cache holding them (the bench is the receiving end: it checks each chunk and drops it)."""
    with grpc.insecure_channel(gateway_address) as channel:
        info = gateway_pb2_grpc.GatewayStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest())
    config = AutoConfig.from_pretrained(resolve_model(model)).get_text_config()
    layout = engine_pb2.KvLayout(
        model=info.model, dtype=info.dtype, block_size=16, num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads, head_dim=getattr(config, "head_dim", None)
        or config.hidden_size // config.num_attention_heads)
    ids = AutoTokenizer.from_pretrained(resolve_model(model))(prompt).input_ids
    with grpc.insecure_channel(prefill_address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        for attempt in ("compute", "cached"):
            started, payload = time.perf_counter(), 0
            request = engine_pb2.KvTransferRequest(request_id=f"rate-{attempt}", prompt_token_ids=ids,
                                                   sampling=common_pb2.SamplingParams(max_tokens=1), layout=layout)
            for chunk in stub.TransferKV(request, timeout=600):
                payload += len(chunk.payload)
            seconds = time.perf_counter() - started
    return {"kv_transfer_mb_per_s": payload / 1e6 / seconds, "kv_transfer_ms_per_1k_tokens": 1e6 * seconds / len(ids),
            "kv_bytes_per_token": payload / len(ids)}


def _pin(stack: Stack, name: str, core: int) -> None:
    """One core for the engine process (the layouts are compared at equal compute)."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(stack.services[name].process.pid, {cores[core % len(cores)]})


def _layout(model: str, log_dir: Path, disaggregated: bool, prompts: list[str], gap_s: float,
            stream_tokens: int) -> dict:
    engine_args = ["--threads", "1"]
    second = Stack(model=model, ports=Ports.free(), log_dir=log_dir / "second",
                   engine_args=[*engine_args, "--role", "prefill" if disaggregated else "both"])
    second.start_service("engine")
    ports = Ports.free()
    if disaggregated:
        main = Stack(model=model, ports=ports, log_dir=log_dir / "main", engine_args=[*engine_args, "--role", "decode"],
                     gateway_args=["--prefill-engine-address", second.address("engine")])
    else:
        main = Stack(model=model, ports=ports, log_dir=log_dir / "main", engine_args=engine_args,
                     engine_address=f"127.0.0.1:{ports.engine},{second.address('engine')}")
    try:
        main.start()
        _pin(main, "engine", 0)
        _pin(second, "engine", 1)
        asyncio.run(_workload(main.address("gateway"), prompts[:1], 0.0, 8))   # warm-up
        result = asyncio.run(_workload(main.address("gateway"), prompts[1:], gap_s, stream_tokens))
        transfer = _transfer_totals(main.ports.engine_metrics)
        rate = _transfer_rate(model, second.address("engine"), prompts[0], main.address("gateway")) \
            if disaggregated else {}
    finally:
        main.stop()
        second.stop()
    gaps = sorted(result["gaps"])
    figures = {"itl_p50_s": statistics.median(gaps) if gaps else None,
               "itl_p99_s": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else None,
               "arrival_ttft_p50_s": statistics.median(result["ttfts"]),
               "arrival_ttft_max_s": max(result["ttfts"]),
               "running_tokens_per_s": result["tokens"] / result["seconds"]}
    if disaggregated:
        received, seconds, blocks = (transfer.get(k, 0.0) for k in ("bytes", "seconds", "blocks"))
        # Per arrival, request to last block: the prefill engine's compute included (sending overlaps it).
        figures["kv_transfer_with_prefill_ms_per_1k_tokens"] = 1e6 * seconds / (blocks * 16) if blocks else None
        figures["kv_transfer_mb_received"] = received / 1e6
        figures.update(rate)
    return figures


def disaggregated_scenario(model: str, long_prompts: list[str], log_dir: Path, gap_s: float = 4.0,
                           stream_tokens: int = 1024) -> dict:
    """long_prompts: one warm-up prompt, then the arrivals (ARRIVALS of them)."""
    colocated = _layout(model, log_dir, False, long_prompts, gap_s, stream_tokens)
    disaggregated = _layout(model, log_dir, True, long_prompts, gap_s, stream_tokens)
    return {"systems": {"colocated_2x_both": colocated, "disaggregated_prefill_decode": disaggregated},
            "ratios": {"itl_p99_disaggregated_over_colocated": report.ratio(disaggregated["itl_p99_s"],
                                                                            colocated["itl_p99_s"]),
                       "itl_p50_disaggregated_over_colocated": report.ratio(disaggregated["itl_p50_s"],
                                                                            colocated["itl_p50_s"]),
                       "arrival_ttft_disaggregated_over_colocated": report.ratio(
                           disaggregated["arrival_ttft_p50_s"], colocated["arrival_ttft_p50_s"])}}
