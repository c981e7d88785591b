"""Cancellation, deadlines, a dead engine, metrics, health and reflection, on the real servers."""
from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from common.stack import Ports, Stack
from tests.helpers import make_request, rpc_error, stream
from splitserve.v1 import engine_pb2, gateway_pb2_grpc

LONG = 1900  # tokens: streams that are still running when the test acts on them


def scrape(port: int) -> dict[str, float]:
    """All samples of a /metrics page as {'name{label="v",...}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_cancelled_streams_free_the_engine(gateway, engine, tiny_stack):
    """Freed by the cancellation (counted as aborts), not by finishing: no bound on the machine's speed."""
    before = engine.GetStats(engine_pb2.GetStatsRequest())
    aborted_before = scrape(tiny_stack.ports.engine_metrics).get(
        'splitserve_engine_requests_finished_total{finish_reason="abort"}', 0.0)
    calls = [gateway.Generate(make_request(f"story number {i}:", max_tokens=LONG, ignore_eos=True), timeout=120)
             for i in range(10)]
    for call in calls:
        next(call)  # every stream is producing
    running = engine.GetStats(engine_pb2.GetStatsRequest())
    assert running.running == 10 and running.kv_blocks_used > before.kv_blocks_used
    for call in calls:
        call.cancel()

    def engine_is_idle() -> bool:
        stats = engine.GetStats(engine_pb2.GetStatsRequest())
        return stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == before.kv_blocks_used

    assert wait_until(engine_is_idle, timeout=60), engine.GetStats(engine_pb2.GetStatsRequest())
    for call in calls:
        assert call.code() == grpc.StatusCode.CANCELLED
    aborted = scrape(tiny_stack.ports.engine_metrics)['splitserve_engine_requests_finished_total{finish_reason="abort"}']
    assert aborted - aborted_before == 10


def test_deadline_that_expires_mid_stream(gateway, engine):
    call = gateway.Generate(make_request("a long story:", max_tokens=LONG, ignore_eos=True), timeout=1.0)
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for chunk in call:
            received.append(chunk)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received, "the deadline should expire mid-stream, after some chunks"
    assert wait_until(lambda: engine.GetStats(engine_pb2.GetStatsRequest()).running == 0, timeout=2.0)


def test_engine_down_is_unavailable_not_a_hang(tiny_stack, tmp_path):
    # A gateway whose engine address has nothing listening; the real tokenizer behind it.
    nothing_there = f"127.0.0.1:{Ports.free().engine}"
    lonely = Stack(ports=Ports.free(), log_dir=tmp_path, tokenizer_address=tiny_stack.address("tokenizer"),
                   engine_address=nothing_there)
    lonely.start_service("gateway", timeout=60, ready=False)   # up, NOT_SERVING: no engine answers
    try:
        with grpc.insecure_channel(lonely.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            started = time.monotonic()
            error = rpc_error(lambda: stub.Generate(make_request("hello", max_tokens=4), timeout=30))
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            assert "engine" in error.details()
            assert time.monotonic() - started < 25  # answered, not timed out
    finally:
        lonely.stop()


def test_gateway_exports_every_phase_after_one_request(gateway, tiny_stack):
    stream(gateway, make_request("metrics please", max_tokens=8, ignore_eos=True))
    gateway_metrics = scrape(tiny_stack.ports.gateway_metrics)
    for phase in ("tokenize", "queue", "prefill", "decode", "detokenize"):
        assert gateway_metrics[f'splitserve_request_phase_seconds_count{{phase="{phase}"}}'] >= 1
    for name in ("splitserve_time_to_first_token_seconds", "splitserve_inter_token_latency_seconds",
                 "splitserve_e2e_request_latency_seconds"):
        assert gateway_metrics[f"{name}_count"] >= 1
    assert gateway_metrics["splitserve_generation_tokens_total"] >= 8
    assert gateway_metrics["splitserve_prompt_tokens_total"] >= 1
    assert gateway_metrics['splitserve_requests_total{code="OK",finish_reason="length"}'] >= 1
    assert "splitserve_requests_in_flight" in gateway_metrics

    engine_metrics = scrape(tiny_stack.ports.engine_metrics)
    assert engine_metrics['splitserve_engine_step_seconds_count{kind="decode"}'] >= 1
    assert engine_metrics["splitserve_engine_batch_size_count"] >= 1
    for name in ("splitserve_engine_requests_running", "splitserve_engine_requests_waiting",
                 "splitserve_engine_kv_cache_usage_ratio", "splitserve_engine_preemptions_total",
                 "splitserve_engine_prefix_cache_queries_total", "splitserve_engine_prefix_cache_hits_total"):
        assert name in engine_metrics

    tokenizer_metrics = scrape(tiny_stack.ports.tokenizer_metrics)
    assert tokenizer_metrics['splitserve_tokenizer_seconds_count{op="tokenize"}'] >= 1
    assert tokenizer_metrics['splitserve_tokenizer_seconds_count{op="detokenize"}'] >= 1


@pytest.mark.parametrize("name,service", [("gateway", "splitserve.v1.Gateway"), ("tokenizer", "splitserve.v1.Tokenizer"),
                                          ("engine", "splitserve.v1.Engine")])
def test_health_is_serving_and_reflection_lists_the_services(tiny_stack, name, service):
    with grpc.insecure_channel(tiny_stack.address(name)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for checked in ("", service):
            reply = health.Check(health_pb2.HealthCheckRequest(service=checked), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert service in services
        assert "grpc.health.v1.Health" in services


def test_gateway_model_info(gateway):
    from splitserve.v1 import common_pb2
    info = gateway.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10)
    assert info.max_context_length == 2048
    assert info.vocab_size == 49152
    assert list(info.eos_token_ids) == [2]
    assert info.device == "cpu"
