"""Two real engine processes behind one gateway: spreading, prefix affinity, an engine killed mid-load, recovery.

Which engine served what is read from each engine's own /metrics (splitserve_engine_requests_finished_total) and
GetStats, never from the gateway's say-so.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from common.stack import free_port
from splitserve.v1 import common_pb2, engine_pb2, engine_pb2_grpc, gateway_pb2_grpc
from tests.deploy.conftest import REPO, ComposeStack, Process
from tests.helpers import make_request, stream
from tests.integration.test_lifecycle import scrape

SHARED_PREFIX = ("You are the assistant of a very long-winded library. Here are the house rules, which every answer "
                 "must follow to the letter. " * 6)


def finished(engine: Process) -> float:
    """Sequences this engine has finished, all reasons together."""
    return sum(v for k, v in scrape(engine.metrics_port).items()
               if k.startswith("splitserve_engine_requests_finished_total"))


def prefix_cache(engine: Process) -> tuple[float, float]:
    """(prompt tokens looked up, prompt tokens found) in this engine's prefix cache."""
    metrics = scrape(engine.metrics_port)
    return (metrics["splitserve_engine_prefix_cache_queries_total"],
            metrics["splitserve_engine_prefix_cache_hits_total"])


def stats(engine: Process) -> engine_pb2.EngineStats:
    with grpc.insecure_channel(engine.address) as channel:
        return engine_pb2_grpc.EngineStub(channel).GetStats(engine_pb2.GetStatsRequest(), timeout=5)


@pytest.fixture(scope="module")
def gateway(compose_stack: ComposeStack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    """The gateway, once it routes to both engines: it is ready as soon as one answers, and finds the other healthy
    at its next health check, so a few requests at a time go out until each engine has served one."""
    with grpc.insecure_channel(compose_stack.processes["gateway"].address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        before = [finished(e) for e in compose_stack.engines]
        deadline = time.monotonic() + 120
        while any(finished(e) == b for e, b in zip(compose_stack.engines, before)):
            assert time.monotonic() < deadline, "the gateway never sent a request to one of its engines"
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda i: stream(stub, make_request(f"warm {i}", max_tokens=2), timeout=60), range(4)))
            time.sleep(0.2)   # an engine counts a sequence when it leaves; the stream may end a moment before
        yield stub


def served(compose_stack: ComposeStack, send) -> list[float]:
    """How many sequences each engine finished while `send()` ran."""
    before = [finished(e) for e in compose_stack.engines]
    send()
    time.sleep(0.2)   # the engines count a sequence when it leaves; the stream may end a moment before
    return [finished(e) - b for e, b in zip(compose_stack.engines, before)]


def test_requests_spread_over_both_engines_and_model_info_works(compose_stack, gateway):
    info = gateway.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10)
    assert info.max_context_length == 2048 and info.device == "cpu"
    requests = [make_request(f"spread {i}: hello", max_tokens=8, ignore_eos=True) for i in range(16)]

    def send() -> None:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda r: stream(gateway, r, timeout=60), requests))
        assert all(r.last.finish_reason == "length" for r in results)

    counts = served(compose_stack, send)
    assert sum(counts) == 16
    assert min(counts) >= 4, counts


def test_requests_sharing_a_long_prefix_go_to_one_engine(compose_stack, gateway):
    requests = [make_request(SHARED_PREFIX + f"Question {i}: what is rule {i}?", max_tokens=4, ignore_eos=True)
                for i in range(16)]
    before = [prefix_cache(e) for e in compose_stack.engines]

    def send() -> None:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda r: stream(gateway, r, timeout=60), requests))
        assert all(r.last.usage.prompt_tokens > 100 for r in results)

    counts = served(compose_stack, send)
    assert sum(counts) == 16
    assert max(counts) >= 14, counts
    index = counts.index(max(counts))
    (queries, hits), (queries_before, hits_before) = prefix_cache(compose_stack.engines[index]), before[index]
    # ~150 shared tokens, 9 full blocks: every request but the first few running at once finds them cached.
    assert hits - hits_before >= 100 * (max(counts) - 4), (queries - queries_before, hits - hits_before)


def test_killing_an_engine_mid_load_moves_its_streams_and_it_gets_traffic_when_back(compose_stack, gateway):
    engines = compose_stack.engines
    # 8 long streams, spread over both engines; each has produced a chunk when the engine dies.
    calls = [gateway.Generate(make_request(f"long story {i}:", max_tokens=600, ignore_eos=True), timeout=120)
             for i in range(8)]
    for call in calls:
        next(call)
    running = [stats(e).running for e in engines]
    assert sum(running) == 8 and min(running) >= 1, running
    victim, survivor = engines
    victim.stop(signal.SIGKILL)

    outcomes: list[tuple[str, int]] = []
    lock = threading.Lock()

    def finish(call) -> None:
        tokens = 0
        try:
            for chunk in call:
                tokens += len(chunk.token_ids)
            outcome = call.code().name
        except grpc.RpcError as exc:
            outcome = exc.code().name
        with lock:
            outcomes.append((outcome, tokens))

    threads = [threading.Thread(target=finish, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    # New requests while the survivor is still busy with its streams: every one succeeds.
    fresh = [make_request(f"after the crash {i}:", max_tokens=8, ignore_eos=True) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: stream(gateway, r, timeout=60), fresh))
    assert all(r.last.finish_reason == "length" for r in results)
    for thread in threads:
        thread.join(120)
    # The victim's streams fail over to the survivor (--max-failovers 1, the default) and finish whole, as the
    # survivor's own do: the clients see no error (not a hang either: that would be DEADLINE_EXCEEDED).
    assert outcomes == [("OK", 599)] * 8, outcomes     # 600 tokens each, the first read above

    # The victim comes back on the same address: the gateway sends to it again.
    victim.start()
    victim.wait_healthy()
    deadline = time.monotonic() + 30
    got = 0.0
    while got == 0 and time.monotonic() < deadline:
        got = served(compose_stack, lambda: [stream(gateway, make_request(f"back {i}", max_tokens=4, ignore_eos=True))
                                             for i in range(4)])[0]
    assert got > 0, "the restarted engine got no traffic"


def test_a_dns_name_resolving_to_the_engines(compose_stack, tmp_path):
    """dns:///localhost:PORT: the form a Kubernetes headless Service or `compose --scale` gives the gateway."""
    engine = compose_stack.engines[1]
    port = free_port()
    gateway_process = compose_stack.processes["gateway"]
    env = dict(gateway_process.env, GATEWAY_PORT=str(port), GATEWAY_METRICS_PORT=str(free_port()),
               HTTP_PORT=str(free_port()), ENGINE_ADDRESS=f"dns:///localhost:{engine.port}")
    process = subprocess.Popen(gateway_process.command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "gateway.log", "wb"))
    try:
        lonely = Process("dns-gateway", gateway_process.command, env, [sys.executable, "-m", "common.healthcheck",
                         f"127.0.0.1:{port}"], port, 0, tmp_path / "gateway.log", process)
        lonely.wait_healthy(60)
        with grpc.insecure_channel(lonely.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            before = finished(engine)
            result = stream(stub, make_request("resolved by name", max_tokens=4, ignore_eos=True), timeout=60)
            assert result.last.finish_reason == "length"
            time.sleep(0.2)
            assert finished(engine) - before == 1
    finally:
        process.terminate()
        process.wait(30)
