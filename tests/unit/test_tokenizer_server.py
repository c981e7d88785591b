"""TokenizerServicer over a real grpc.aio server on 127.0.0.1: statuses, the Detokenize stream, metrics."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import prometheus_client
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.models import resolve_model
from common.server import start_grpc_server
from splitserve.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from tokenizer_service.__main__ import SERVICE_NAME
from tokenizer_service.detokenize_streams import DetokenizeStream
from tokenizer_service.server import INLINE_PROMPT_CHARS, TokenizerServicer
from tokenizer_service.tokenizer import PromptTokenizer

Stub = tokenizer_pb2_grpc.TokenizerStub
LONG_PROMPT = "A long prompt, longer than the inline limit. " * (INLINE_PROMPT_CHARS // 40)


@pytest.fixture(scope="module")
def prompt_tokenizer() -> PromptTokenizer:
    return PromptTokenizer(resolve_model("smollm2"), name="SmolLM2-135M-Instruct")


@pytest.fixture
def call(prompt_tokenizer: PromptTokenizer) -> Callable[[Callable[[Stub], Awaitable]], object]:
    """Runs a client coroutine against a fresh in-process server (port 0) and returns its result."""
    def run(scenario: Callable[[Stub], Awaitable]):
        async def main():
            service = await start_grpc_server(
                lambda server: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(
                    TokenizerServicer(prompt_tokenizer), server),
                [SERVICE_NAME], "127.0.0.1", 0, None)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                    return await scenario(Stub(channel)), await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            finally:
                await service.server.stop(None)
        result, health = asyncio.run(main())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        return result
    return run


def samples(op: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value("splitserve_tokenizer_seconds_count", {"op": op}) or 0.0


def test_tokenize_a_prompt_and_a_chat(call, prompt_tokenizer: PromptTokenizer) -> None:
    before = samples("tokenize")

    async def scenario(stub: Stub):
        prompt = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(prompt="Hello 你好"))
        chat = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(
            messages=[common_pb2.ChatMessage(role="user", content="Hi")]))
        long = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(prompt=LONG_PROMPT))  # encoded off the loop
        return list(prompt.token_ids), list(chat.token_ids), list(long.token_ids)

    prompt_ids, chat_ids, long_ids = call(scenario)
    assert prompt_ids == prompt_tokenizer.encode_prompt("Hello 你好")
    assert chat_ids == prompt_tokenizer.encode_chat([("user", "Hi")])
    assert long_ids == prompt_tokenizer.encode_prompt(LONG_PROMPT)
    assert samples("tokenize") == before + 3


@pytest.mark.parametrize("request_, message", [
    (tokenizer_pb2.TokenizeRequest(), "exactly one of prompt or messages"),
    (tokenizer_pb2.TokenizeRequest(prompt="x", messages=[common_pb2.ChatMessage(role="user", content="y")]),
     "exactly one of prompt or messages"),
    (tokenizer_pb2.TokenizeRequest(messages=[common_pb2.ChatMessage(role="wizard", content="y")]), "'wizard'"),
], ids=["neither", "both", "unknown-role"])
def test_bad_tokenize_requests_are_invalid_argument(call, request_, message: str) -> None:
    async def scenario(stub: Stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Tokenize(request_)
        return caught.value

    error = call(scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details()


def live_sequences() -> float:
    return prometheus_client.REGISTRY.get_sample_value("splitserve_tokenizer_detokenize_sequences") or 0.0


def piece(sequence: int, token_ids: list[int], final: bool = False) -> tokenizer_pb2.DetokenizePiece:
    return tokenizer_pb2.DetokenizePiece(sequence=sequence, token_ids=token_ids, final=final)


def test_one_detokenize_stream_carries_interleaved_sequences(call, prompt_tokenizer: PromptTokenizer) -> None:
    """Two sequences share the stream, their pieces interleaved in the same messages: each one's texts join to its
    own text, one result per piece, in order; final pieces forget them."""
    texts = {1: "Sure! 你好 🙂 done.", 2: "Another 🙂 story, told twice."}
    ids = {n: prompt_tokenizer.backend.encode(t, add_special_tokens=False).ids + prompt_tokenizer.eos_token_ids
           for n, t in texts.items()}
    chunks = {n: [i[k:k + 2] for k in range(0, len(i), 2)] for n, i in ids.items()}
    rounds = max(len(c) for c in chunks.values())
    before = samples("detokenize")

    async def scenario(stub: Stub):
        stream = stub.Detokenize()
        out: dict[int, list[str]] = {1: [], 2: []}
        sent = 0
        for index in range(rounds):
            pieces = [piece(n, c[index], final=index == len(c) - 1) for n, c in chunks.items() if index < len(c)]
            await stream.write(tokenizer_pb2.DetokenizeRequest(pieces=pieces))
            results = (await stream.read()).results
            assert len(results) == len(pieces) and not any(r.error for r in results)
            for p, result in zip(pieces, results):
                out[p.sequence].append(result.text)
            sent += len(pieces)
            if index == 0:
                assert live_sequences() == 2
        live_after = live_sequences()
        await stream.done_writing()
        assert await stream.read() is grpc.aio.EOF
        return out, sent, live_after

    out, sent, live_after = call(scenario)
    assert {n: "".join(parts) for n, parts in out.items()} == texts
    assert samples("detokenize") == before + sent
    assert live_after == 0


def test_a_refused_piece_fails_only_its_sequence(call, prompt_tokenizer: PromptTokenizer) -> None:
    """Out of the vocabulary, a piece after final, a number that does not increase: that piece gets an error,
    the sequence is forgotten, and the stream serves the other sequences on it."""
    hello = prompt_tokenizer.backend.encode("Hello", add_special_tokens=False).ids

    async def scenario(stub: Stub):
        stream = stub.Detokenize()
        messages = [
            [piece(1, hello), piece(2, [10**6])],            # 2: outside the vocabulary
            [piece(3, hello, final=True), piece(1, hello)],   # 3 finishes
            [piece(3, hello), piece(2, hello)],               # both already finished (2 was forgotten)
            [piece(5, hello), piece(4, hello)],               # 4 after 5: numbers must increase
            [piece(1, [], final=True), piece(5, [], final=True)],
        ]
        results = []
        for pieces in messages:
            await stream.write(tokenizer_pb2.DetokenizeRequest(pieces=pieces))
            results.append([(r.text, r.error) for r in (await stream.read()).results])
        live = live_sequences()
        await stream.done_writing()
        return results, live

    results, live = call(scenario)
    assert results[0][0] == ("Hello", "") and "outside the vocabulary" in results[0][1][1]
    assert results[1] == [("Hello", ""), ("Hello", "")]
    assert all("already finished" in error for _, error in results[2])
    assert results[3][0] == ("Hello", "") and "above 5" in results[3][1][1]
    assert results[4] == [("", ""), ("", "")]   # the text was sent; final flushes nothing more
    assert live == 0


def test_a_stream_that_ends_forgets_its_open_sequences(call, prompt_tokenizer: PromptTokenizer) -> None:
    async def scenario(stub: Stub):
        stream = stub.Detokenize()
        await stream.write(tokenizer_pb2.DetokenizeRequest(pieces=[piece(1, [42]), piece(2, [43])]))
        await stream.read()
        open_ = live_sequences()
        stream.cancel()
        for _ in range(100):   # the server sees the cancellation asynchronously
            if live_sequences() == 0:
                break
            await asyncio.sleep(0.02)
        return open_, live_sequences()

    assert call(scenario) == (2, 0)


def test_get_info(call, prompt_tokenizer: PromptTokenizer) -> None:
    async def scenario(stub: Stub):
        return await stub.GetInfo(tokenizer_pb2.GetTokenizerInfoRequest())

    info = call(scenario)
    assert (info.name, info.vocab_size, list(info.eos_token_ids), info.has_chat_template) == (
        "SmolLM2-135M-Instruct", 49152, [2], True)


def test_main_serves_on_free_ports_without_torch_and_stops_on_sigterm(tmp_path) -> None:
    """`python -m tokenizer_service --port 0 --metrics-port 0` binds free ports, serves (chats and detokenizing
    included) without ever loading torch, and exits 0 on SIGTERM."""
    import re
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    log_file = tmp_path / "tokenizer.log"
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tokenizer_service", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
             "--model", resolve_model("smollm2")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"serving .* port=(\d+) metrics_port=(\d+)", log_file.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.1)
        port, metrics_port = int(found[1]), int(found[2])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            assert stub.GetInfo(tokenizer_pb2.GetTokenizerInfoRequest()).vocab_size == 49152
            ids = stub.Tokenize(tokenizer_pb2.TokenizeRequest(
                messages=[common_pb2.ChatMessage(role="user", content="Hi 你好")])).token_ids
            replies = stub.Detokenize(iter([tokenizer_pb2.DetokenizeRequest(pieces=[piece(1, ids, final=True)])]))
            assert "Hi 你好" in next(iter(replies)).results[0].text
        with open(f"/proc/{process.pid}/maps") as maps:   # torch's shared libraries, if it had been imported
            assert "libtorch" not in maps.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert b"splitserve_tokenizer_seconds" in response.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_a_detokenizer_bug_fails_only_its_own_sequence(prompt_tokenizer: PromptTokenizer) -> None:
    """Not a bad piece but a bug (any other exception): that piece gets an internal error, its sequence is
    forgotten, the other sequence of the stream goes on."""
    class Broken:
        def add(self, token_ids, final=False):
            raise RuntimeError("boom")

    made = iter([prompt_tokenizer.detokenizer(), Broken()])
    live = []
    stream = DetokenizeStream(lambda: next(made), live.append)
    hello = prompt_tokenizer.backend.encode("Hello", add_special_tokens=False).ids
    first = TokenizerServicer._detokenize(stream, piece(1, hello))
    broken = TokenizerServicer._detokenize(stream, piece(2, hello))
    assert (first.text, first.error) == ("Hello", "")
    assert broken.error == "internal error: RuntimeError: boom" and stream.live == 1
    assert TokenizerServicer._detokenize(stream, piece(1, hello, final=True)).text == "Hello"
    assert stream.live == 0 and sum(live) == 0


def test_the_gateways_shared_detokenizer_keeps_sequences_apart_and_ends_a_wait_at_the_deadline(
        call, prompt_tokenizer: PromptTokenizer) -> None:
    """The gateway side of the stream (gateway/detokenize.py) against the real servicer: two sequences sent in
    the same turn share one message and get their own texts; a sequence whose deadline passes while it waits
    fails with DEADLINE_EXCEEDED, and the stream serves the others on."""
    from gateway.detokenize import SharedDetokenizer
    from gateway.errors import GatewayError

    hello = prompt_tokenizer.backend.encode("Hello", add_special_tokens=False).ids
    world = prompt_tokenizer.backend.encode(" world", add_special_tokens=False).ids

    async def scenario(stub: Stub):
        shared = SharedDetokenizer(stub, "test")
        first, second = shared.sequence(None), shared.sequence(None)
        texts = await asyncio.gather(first.add(hello, final=False), second.add(world, final=True))
        late = shared.sequence(0.0)   # its deadline passes before the tokenizer can answer
        codes = []
        for _ in range(2):
            try:
                await late.add(hello, final=False)
            except GatewayError as exc:
                codes.append(exc.code)
        late.close()
        texts.append(await first.add(world, final=True))
        first.close()
        second.close()
        shared.close()
        return texts, codes

    texts, codes = call(scenario)
    assert texts == ["Hello", " world", " world"]
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
