"""The engine's Decode stream carries many sequences (the gateway keeps one per engine): outputs of one step come in
one message, a refused attach fails only its own sequence, ending the stream aborts what is left on it, an
unattached sequence is aborted when its lease runs out, and a draining engine ends its streams once they are done."""
from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from tests.conftest import start_stack
from tests.helpers import make_request, stream
from tests.integration.test_lifecycle import scrape, wait_until
from splitserve.v1 import common_pb2, engine_pb2, engine_pb2_grpc, gateway_pb2_grpc

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23]]


def run(address: str, scenario):
    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            return await scenario(engine_pb2_grpc.EngineStub(channel))
    return asyncio.run(main())


async def prefill(stub, request_id: str, prompt: list[int], max_tokens: int) -> engine_pb2.PrefillResponse:
    return await stub.Prefill(engine_pb2.PrefillRequest(
        request_id=request_id, prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)), timeout=30)


async def collect(call, keys: set[int]) -> tuple[dict[int, list[engine_pb2.SequenceOutput]], list[int]]:
    """Reads until every key has its last output; also returns how many sequences each message carried."""
    outputs: dict[int, list[engine_pb2.SequenceOutput]] = {key: [] for key in keys}
    per_message, open_keys = [], set(keys)
    while open_keys:
        response = await asyncio.wait_for(call.read(), 30)
        assert response is not grpc.aio.EOF
        per_message.append(len(response.outputs))
        for output in response.outputs:
            outputs[output.key].append(output)
            if output.finish_reason or output.error_code:
                open_keys.discard(output.key)
    return outputs, per_message


def tokens(outputs: list[engine_pb2.SequenceOutput]) -> list[int]:
    return [t for output in outputs for t in output.token_ids]


def aborted(stack) -> float:
    return scrape(stack.ports.engine_metrics).get('splitserve_engine_requests_finished_total{finish_reason="abort"}', 0.0)


def engine_log(stack) -> str:
    """The engine's log lines about expired leases (the lease is the only thing that forgets an unattached one)."""
    text = stack.services["engine"].log_path.read_text(errors="replace")
    return "\n".join(line for line in text.splitlines() if "no Decode stream attached in time" in line)


def test_sequences_share_one_stream_and_get_the_tokens_they_get_alone(tiny_stack, engine):
    """Three sequences, all running before they attach (a condition, not a race: long enough that none can finish
    first), share one stream: their first 12 tokens equal what each gets alone, and once all three run, one
    step's outputs of every sequence travel in one message."""
    idle = engine.GetStats(engine_pb2.GetStatsRequest()).running

    async def together(stub):
        firsts, ids = [], [f"shared-{i}-{time.time()}" for i in range(len(PROMPTS))]
        for request_id, prompt in zip(ids, PROMPTS):
            firsts.append(await prefill(stub, request_id, prompt, 1900))
        assert (await stub.GetStats(engine_pb2.GetStatsRequest())).running == idle + len(PROMPTS)
        call = stub.Decode()
        await call.write(engine_pb2.DecodeRequest(
            attach=[engine_pb2.DecodeAttach(request_id=request_id, key=key + 1) for key, request_id in enumerate(ids)]))
        outputs: dict[int, list[int]] = {key + 1: [] for key in range(len(ids))}
        most_in_one_message = 0
        while most_in_one_message < len(ids) or min(len(got) for got in outputs.values()) < 11:
            response = await asyncio.wait_for(call.read(), 30)
            assert response is not grpc.aio.EOF
            assert not any(output.finish_reason or output.error_code for output in response.outputs)
            most_in_one_message = max(most_in_one_message, len(response.outputs))
            for output in response.outputs:
                outputs[output.key].extend(output.token_ids)
        call.cancel()   # aborts the three (checked by the next test's idle engine)
        return [[first.token_id] + outputs[key + 1][:11] for key, first in enumerate(firsts)], most_in_one_message

    async def one_by_one(stub):
        results = []
        for i, prompt in enumerate(PROMPTS):
            request_id = f"alone-{i}-{time.time()}"
            first = await prefill(stub, request_id, prompt, 12)
            call = stub.Decode()
            await call.write(engine_pb2.DecodeRequest(attach=[engine_pb2.DecodeAttach(request_id=request_id, key=7)]))
            outputs, _ = await collect(call, {7})
            call.cancel()
            assert outputs[7][-1].finish_reason == "length"
            results.append([first.token_id] + tokens(outputs[7]))
        return results

    shared, most_in_one_message = run(tiny_stack.address("engine"), together)
    alone = run(tiny_stack.address("engine"), one_by_one)
    assert shared == alone and all(len(ids) == 12 for ids in shared)
    assert most_in_one_message == len(PROMPTS)   # one step's tokens of every sequence travel in one message
    assert wait_until(lambda: engine.GetStats(engine_pb2.GetStatsRequest()).running == idle, timeout=60)


def test_a_refused_attach_fails_only_its_own_sequence(tiny_stack):
    async def scenario(stub):
        request_id = f"refusals-{time.time()}"
        first = await prefill(stub, request_id, PROMPTS[0], 6)
        call = stub.Decode()
        await call.write(engine_pb2.DecodeRequest(attach=[
            engine_pb2.DecodeAttach(request_id="no-such-sequence", key=1),
            engine_pb2.DecodeAttach(request_id=request_id, key=2),
            engine_pb2.DecodeAttach(request_id=request_id, key=3)]))   # attached twice
        outputs, _ = await collect(call, {1, 2, 3})
        call.cancel()
        return first, outputs

    first, outputs = run(tiny_stack.address("engine"), scenario)
    assert outputs[1][-1].error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no-such-sequence" in outputs[1][-1].error
    assert outputs[3][-1].error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "already attached" in outputs[3][-1].error
    assert len(tokens(outputs[2])) == 5 and outputs[2][-1].finish_reason == "length"


def test_ending_the_stream_aborts_its_sequences_and_an_unattached_one_expires(tiny_stack, engine):
    idle = engine.GetStats(engine_pb2.GetStatsRequest())

    async def scenario(stub):
        ids = [f"ended-{i}-{time.time()}" for i in range(2)]
        for request_id, prompt in zip(ids, PROMPTS):
            await prefill(stub, request_id, prompt, 1900)
        never_attached = f"unattached-{time.time()}"
        await prefill(stub, never_attached, PROMPTS[2], 1900)
        call = stub.Decode()
        await call.write(engine_pb2.DecodeRequest(
            attach=[engine_pb2.DecodeAttach(request_id=request_id, key=i + 1) for i, request_id in enumerate(ids)]))
        await asyncio.wait_for(call.read(), 30)
        running = (await stub.GetStats(engine_pb2.GetStatsRequest())).running
        call.cancel()
        return running, never_attached

    aborted_before = aborted(tiny_stack)
    running, never_attached = run(tiny_stack.address("engine"), scenario)
    assert running == idle.running + 3
    # The two attached ones are aborted with the stream (whatever the machine's speed: 1,900 tokens each); the
    # third is forgotten when its lease (5 s in the test stack) runs out, whether it finished by then or not.
    assert wait_until(lambda: aborted(tiny_stack) >= aborted_before + 2, timeout=60)
    assert wait_until(lambda: f"request_id={never_attached!r}" in engine_log(tiny_stack), timeout=60)
    assert wait_until(lambda: engine.GetStats(engine_pb2.GetStatsRequest()) == idle, timeout=60)

    async def attach_late(stub):
        call = stub.Decode()
        await call.write(engine_pb2.DecodeRequest(attach=[engine_pb2.DecodeAttach(request_id=never_attached, key=1)]))
        outputs, _ = await collect(call, {1})
        call.cancel()
        return outputs[1][-1]

    late = run(tiny_stack.address("engine"), attach_late)
    assert late.error_code == grpc.StatusCode.NOT_FOUND.value[0]


@pytest.fixture
def own_stack(tiny_model_dir, tmp_path):
    stack = start_stack(tiny_model_dir, tmp_path / "logs", ["--shutdown-grace-seconds", "60"])
    yield stack
    stack.stop()


def test_a_draining_engine_finishes_its_streams_then_exits_without_waiting_out_the_grace(own_stack):
    """The gateway keeps its Decode stream open: on SIGTERM the engine still ends it once its sequences are done
    (not after the 60 s grace), and the running request completes."""
    with grpc.insecure_channel(own_stack.address("gateway")) as channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        stream(gateway, make_request("warm up", max_tokens=4))   # the gateway's Decode stream is open now
        call = gateway.Generate(make_request("a story:", max_tokens=300, ignore_eos=True), timeout=60)
        first = next(call)
        engine = own_stack.services["engine"].process
        engine.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        rest = list(call)
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 300
    assert rest[-1].finish_reason == "length"
    assert engine.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 30
