"""Small helpers shared by the integration and end-to-end tests."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


@dataclass
class Streamed:
    chunks: list[gateway_pb2.GenerateResponse]

    @property
    def token_ids(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def last(self) -> gateway_pb2.GenerateResponse:
        return self.chunks[-1]


def make_request(prompt: str | list[tuple[str, str]], request_id: str = "",
                 **sampling: object) -> gateway_pb2.GenerateRequest:
    request = gateway_pb2.GenerateRequest(request_id=request_id, sampling=common_pb2.SamplingParams(**sampling))
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.messages.extend(common_pb2.ChatMessage(role=r, content=c) for r, c in prompt)
    return request


def stream(stub: gateway_pb2_grpc.GatewayStub, request: gateway_pb2.GenerateRequest,
           timeout: float | None = 120) -> Streamed:
    return Streamed(list(stub.Generate(request, timeout=timeout)))


def stream_all(stub: gateway_pb2_grpc.GatewayStub, requests: list[gateway_pb2.GenerateRequest],
               concurrency: int = 8) -> list[Streamed]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda r: stream(stub, r), requests))


def prompt_ids(tokenizer, prompt: str | list[tuple[str, str]]) -> list[int]:
    """The ids the tokenizer service makes for a prompt or chat: what `generate` gets as input."""
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    messages = [{"role": r, "content": c} for r, c in prompt]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def reference_greedy(model, ids: list[int], max_new_tokens: int, **generate_kwargs: object) -> list[int]:
    """transformers' own greedy decoding, stopping at the model's EOS like the engine does."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    return out[0, len(ids):].tolist()


def greedy_batch(stub: gateway_pb2_grpc.GatewayStub, prompts: list, max_tokens: int) -> list[Streamed]:
    """The equivalence tests' requests: every prompt, greedy, sent 8 at a time so that batching is exercised."""
    return stream_all(stub, [make_request(p, max_tokens=max_tokens, temperature=0.0) for p in prompts],
                      concurrency=8)


def assert_equals_generate(got: Streamed, model, tokenizer, prompt, max_tokens: int) -> None:
    """Streamed token ids == transformers' greedy `generate`; finish reason and usage agree with it."""
    ids = prompt_ids(tokenizer, prompt)
    expected = reference_greedy(model, ids, max_tokens)
    assert got.token_ids == expected
    assert got.last.finish_reason == ("stop" if len(expected) < max_tokens else "length")
    assert got.last.usage.prompt_tokens == len(ids)
    assert got.last.usage.completion_tokens == len(expected)


def assert_text_is_decode_of_ids(got: Streamed, tokenizer) -> None:
    """The chunks' text concatenates to the decode of the streamed ids; no broken character unless the decode
    has one; only the last chunk may be textless (an EOS, or a partial character flushed at the end)."""
    full = tokenizer.decode(got.token_ids, skip_special_tokens=True)
    assert got.text == full
    if "\ufffd" not in full:
        assert all("\ufffd" not in chunk.text for chunk in got.chunks)
    assert all(chunk.text for chunk in got.chunks[:-1])


def rpc_error(call) -> grpc.RpcError:
    """Runs a call expected to fail and returns its error."""
    try:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded but should have failed")


def start_extra_gateway(stack, log_dir, gateway_args: list[str]):
    """Another gateway process, with its own flags, in front of `stack`'s tokenizer and engine."""
    from common.stack import Ports, Stack
    extra = Stack(ports=Ports.free(), log_dir=log_dir, tokenizer_address=stack.address("tokenizer"),
                  engine_address=stack.address("engine"), gateway_args=gateway_args)
    extra.start_service("gateway", timeout=120)
    return extra


def openai_client(stack):
    """The official OpenAI SDK pointed at a stack's gateway (no retries: each call is one request)."""
    import openai
    return openai.OpenAI(base_url=f"http://127.0.0.1:{stack.ports.gateway_http}/v1", api_key="unused",
                         max_retries=0, timeout=120)


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


def check_greedy_close(model, ids: list[int], got: list[int], expected: list[int], tolerance: float) -> None:
    """Greedy output in a reduced precision may leave transformers' only at a near-tie: at the first differing
    position, the reference's log-probabilities of the two tokens must be within `tolerance` (vLLM's
    logprob-closeness check). Token-identical outputs pass at once."""
    if got == expected:
        return
    position = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    assert position is not None, f"one output is a prefix of the other: {got} vs {expected}"
    with torch.inference_mode():
        logits = model(torch.tensor([ids + expected[:position]])).logits[0, -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    gap = float(logprobs[expected[position]] - logprobs[got[position]])
    assert gap <= tolerance, (f"diverged at token {position}: ours {got[position]} is {gap:.3f} nats below "
                              f"transformers' {expected[position]}, more than a near-tie ({tolerance})")
