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
from tests.integration.test_lifecycle import wait_until
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


def test_sequences_share_one_stream_and_get_the_tokens_they_get_alone(tiny_stack):
    async def together(stub):
        firsts, ids = [], [f"shared-{i}-{time.time()}" for i in range(len(PROMPTS))]
        for request_id, prompt in zip(ids, PROMPTS):
            firsts.append(await prefill(stub, request_id, prompt, 12))
        call = stub.Decode()
        await call.write(engine_pb2.DecodeRequest(
            attach=[engine_pb2.DecodeAttach(request_id=request_id, key=key + 1) for key, request_id in enumerate(ids)]))
        outputs, per_message = await collect(call, {1, 2, 3})
        await call.done_writing()
        assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF   # nothing left on it: the engine ends it
        return [[first.token_id] + tokens(outputs[key + 1]) for key, first in enumerate(firsts)], outputs, per_message

    async def one_by_one(stub):
        results = []
        for i, prompt in enumerate(PROMPTS):
            request_id = f"alone-{i}-{time.time()}"
            first = await prefill(stub, request_id, prompt, 12)
            call = stub.Decode()
            await call.write(engine_pb2.DecodeRequest(attach=[engine_pb2.DecodeAttach(request_id=request_id, key=7)]))
            outputs, _ = await collect(call, {7})
            call.cancel()
            results.append([first.token_id] + tokens(outputs[7]))
        return results

    shared, outputs, per_message = run(tiny_stack.address("engine"), together)
    alone = run(tiny_stack.address("engine"), one_by_one)
    assert shared == alone and all(len(ids) == 12 for ids in shared)
    assert all(outputs[key][-1].finish_reason == "length" for key in outputs)
    assert max(per_message) == len(PROMPTS)   # one step's tokens of every sequence travel in one message


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

    running, never_attached = run(tiny_stack.address("engine"), scenario)
    assert running == idle.running + 3
    # The two attached ones end with the stream; the third when its lease (5 s in the test stack) runs out.
    assert wait_until(lambda: engine.GetStats(engine_pb2.GetStatsRequest()).running == idle.running + 1, timeout=3)
    assert wait_until(lambda: engine.GetStats(engine_pb2.GetStatsRequest()) == idle, timeout=10)

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
